"""The ccxt plugin when the exchange misbehaves: retries, look-ups, time bounds, circuit breaker, start-up."""

import asyncio
import time

from binance_imitation import BinanceImitation, free_port, imitation, plugin_settings  # noqa: F401
from test_ccxt_plugin import make_plugin, request, seed_order, until_healthy

BUY = {"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 0.01}


async def started(settings):
    plugin = make_plugin(settings)
    await plugin.start()
    await until_healthy(plugin)
    return plugin


def execute(settings, order=BUY, cid="fks-fault"):
    async def scenario():
        plugin = await started(settings)
        try:
            return await plugin.execute(request(order, cid))
        finally:
            await plugin.close()
    return asyncio.run(scenario())


def test_503_twice_then_accepted_places_exactly_one_order_under_one_client_order_id(imitation):
    imitation.fail_next(2, status=503)
    result = execute(plugin_settings(imitation), seed_order("seed-buy-market.json"))
    assert result.status == "filled"
    assert len(imitation.orders) == 1
    assert result.order_id == str(imitation.orders[0]["orderId"])
    assert [r["newClientOrderId"] for r in imitation.order_requests] == ["fks-fault"] * 3
    # every resend was preceded by a look-up: a 503 from Binance leaves the outcome unknown
    paths = [(m, p) for m, p, _ in imitation.requests if p in ("/api/v3/order", "/api/v3/allOrders")]
    assert paths[0] == ("POST", "/api/v3/order") and paths[-1] == ("POST", "/api/v3/order")
    assert ("GET", "/api/v3/order") in paths[1:-1]
    assert result.detail["attempts"] == 3


def test_a_create_hanging_past_the_timeout_is_looked_up_not_sent_twice(imitation):
    imitation.hang_next(1, seconds=2.0)  # accepted and kept, but answered only after ccxt gave up
    started_at = time.monotonic()
    result = execute(plugin_settings(imitation, timeout=0.3))
    assert time.monotonic() - started_at < 2.0
    assert len(imitation.order_requests) == 1
    assert len(imitation.orders) == 1
    assert result.status == "filled"
    assert result.order_id == str(imitation.orders[0]["orderId"])
    assert result.detail["found_by_lookup"] is True
    lookup = [p for m, p, params in imitation.requests if m == "GET" and p == "/api/v3/order"]
    assert lookup, "the order was not looked up"


def test_when_neither_the_order_nor_its_lookup_answer_the_outcome_is_unknown_and_not_resent(imitation):
    imitation.hang_next(1, seconds=3.0)
    imitation.fail_next(3, status=503, method="GET", path="/api/v3/order")
    result = execute(plugin_settings(imitation, timeout=0.3, retries=2))
    assert result.status == "unknown"
    assert "not resent" in result.error
    assert len(imitation.order_requests) == 1
    assert result.detail["lookups"] == 3


def test_an_exchange_that_hangs_on_everything_is_given_up_on_at_order_timeout(imitation):
    imitation.hang_next(1, seconds=3.0)
    imitation.hang_next(100, seconds=3.0, method="GET", path="/api/v3/order")
    started_at = time.monotonic()
    result = execute(plugin_settings(imitation, timeout=0.3, order_timeout=1.2, retries=10))
    assert 1.0 < time.monotonic() - started_at < 2.0
    assert result.status == "unknown"
    assert len(imitation.order_requests) == 1


def test_network_errors_until_the_end_fail_the_order_once_a_lookup_shows_nothing_was_placed(imitation):
    imitation.fail_next(100, status=502)
    result = execute(plugin_settings(imitation, retries=2))
    assert result.status == "failed"
    assert "after 3 attempts" in result.error and "502" in result.error
    assert len(imitation.order_requests) == 3
    assert imitation.orders == []


def test_a_rate_limit_answer_is_resent_without_a_lookup(imitation):
    imitation.fail_next(1, status=429)
    result = execute(plugin_settings(imitation))
    assert result.status == "filled"
    assert len(imitation.order_requests) == 2
    assert [p for m, p, _ in imitation.requests if m == "GET" and p in ("/api/v3/order", "/api/v3/allOrders")] == []


def test_an_unreachable_exchange_refuses_orders_without_sending_and_without_unknowns():
    port = free_port()  # nothing listens there
    settings = plugin_settings(BinanceImitation(port=port), retries=1)

    async def scenario():
        plugin = make_plugin(settings)
        await plugin.start()
        try:
            # The first load of the markets fails at once (nothing listens), but on a busy machine
            # not always within a fixed sleep: wait for its error, a few seconds at most.
            for _ in range(100):
                health = await plugin.health()
                if health["last_error"]:
                    break
                await asyncio.sleep(0.05)
            return health, await plugin.execute(request(BUY))
        finally:
            await plugin.close()

    health, result = asyncio.run(scenario())
    assert health["healthy"] is False and health["markets_loaded"] is False
    assert "markets not loaded" in health["last_error"]
    assert result.status == "failed"
    assert "not loaded" in result.error


def test_the_daemon_starts_with_the_exchange_down_and_becomes_healthy_when_it_comes_up():
    port = free_port()
    exchange = BinanceImitation(port=port)

    async def scenario():
        plugin = make_plugin(plugin_settings(exchange))
        await asyncio.wait_for(plugin.start(), 1)  # start never waits for the exchange
        try:
            await asyncio.sleep(0.3)
            down = await plugin.health()
            exchange.start()
            await until_healthy(plugin, timeout=3)
            up = await plugin.health()
            result = await plugin.execute(request(BUY))
            return down, up, result
        finally:
            await plugin.close()

    try:
        down, up, result = asyncio.run(scenario())
    finally:
        exchange.stop()
    assert down["healthy"] is False and down["markets_loaded"] is False
    assert up["healthy"] is True and up["markets"] == 3 and up["last_error"] is None
    assert result.status == "filled"
    exchange_info = [p for m, p, _ in exchange.requests if p == "/api/v3/exchangeInfo"]
    assert len(exchange_info) == 1


def test_the_circuit_opens_after_five_failures_fails_fast_then_lets_one_trial_through(imitation):
    imitation.fail_next(10, status=503)  # 5 orders x 2 attempts

    async def scenario():
        plugin = await started(plugin_settings(imitation, retries=1, circuit_breaker={"failures": 5, "cooldown": 0.5}))
        try:
            failures = [await plugin.execute(request(BUY, f"fks-cb-{i}")) for i in range(5)]
            seen = len(imitation.requests)
            fast = await plugin.execute(request(BUY, "fks-cb-fast"))
            untouched = len(imitation.requests) == seen
            open_health = await plugin.health()
            await asyncio.sleep(0.6)
            # one trial after the cool-down; a second order meanwhile still fails fast
            trial, meanwhile = await asyncio.gather(plugin.execute(request(BUY, "fks-cb-trial")),
                                                    plugin.execute(request(BUY, "fks-cb-other")))
            return failures, fast, untouched, open_health, trial, meanwhile, await plugin.health()
        finally:
            await plugin.close()

    failures, fast, untouched, open_health, trial, meanwhile, closed_health = asyncio.run(scenario())
    assert [r.status for r in failures] == ["failed"] * 5
    assert fast.status == "failed" and fast.error == "circuit_open"
    assert untouched, "an order went to the exchange while the circuit was open"
    assert open_health["circuit"] == "open" and open_health["healthy"] is False
    assert open_health["consecutive_failures"] == 5
    assert trial.status == "filled"
    assert meanwhile.error == "circuit_open"
    assert closed_health["circuit"] == "closed" and closed_health["healthy"] is True
    assert [o["clientOrderId"] for o in imitation.orders] == ["fks-cb-trial"]


def test_exchange_answers_and_refusals_do_not_trip_the_circuit(imitation):
    imitation.reject_next(6)

    async def scenario():
        plugin = await started(plugin_settings(imitation, circuit_breaker={"failures": 2}))
        try:
            for i in range(3):
                await plugin.execute(request(BUY, f"fks-rej-{i}"))  # the exchange answers: it is there
                await plugin.execute(request({**BUY, "quantity": 1e-9}, f"fks-small-{i}"))  # never sent
            return await plugin.health()
        finally:
            await plugin.close()

    health = asyncio.run(scenario())
    assert health["circuit"] == "closed" and health["consecutive_failures"] == 0
