-- wrk script: POST the seed-buy-market alert, a distinct "id" per request so that the
-- daemon's 60 s de-duplication never short-cuts execution, and print the figures as JSON.
-- Usage: wrk -s post.lua URL -- RUN_TAG [SYMBOLS]
--   RUN_TAG keeps ids distinct across runs; SYMBOLS > 1 spreads alerts over that many symbols
--   (S0/USDT, S1/USDT, ...), since alerts for one symbol execute one after another.

local threads = {}
local counter = 0
local tag = "run"
local symbols = 1
duplicates = 0   -- globals, so that done() can read them from each thread
unsuccessful = 0

function setup(thread)
  thread:set("thread_no", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  tag = args[1] or tag
  symbols = tonumber(args[2]) or symbols
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local symbol = symbols > 1 and string.format("S%d/USDT", counter % symbols) or "BTC/USDT"
  local body = string.format(
    '{"symbol": "%s", "action": "buy", "order_type": "market", "quantity": 0.01, '
    .. '"confidence": 0.85, "id": "%s-%d-%d"}', symbol, tag, thread_no, counter)
  return wrk.format(nil, nil, nil, body)
end

-- Proves every request was really executed: not answered as a duplicate, and filled.
function response(status, headers, body)
  if body:find('"duplicate":%s*true') then duplicates = duplicates + 1 end
  if not body:find('"success":%s*true') then unsuccessful = unsuccessful + 1 end
end

function done(summary, latency, requests)
  local e = summary.errors
  local dups, failed = 0, 0
  for _, thread in ipairs(threads) do
    dups = dups + thread:get("duplicates")
    failed = failed + thread:get("unsuccessful")
  end
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "non_2xx": %d, "socket_errors": %d, "duplicates": %d, "unsuccessful": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout,
    dups, failed))
end
