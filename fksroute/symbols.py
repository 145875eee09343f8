"""TradingView tickers to ccxt symbols: `BINANCE:ETHUSDT` -> `ETH/USDT`, `BTCUSDT.P` -> `BTC/USDT:USDT`."""

from __future__ import annotations

from typing import Collection, Mapping

# Quote currencies recognised when no market list is at hand; longer names are tried first so
# that `BTCFDUSD` splits as BTC/FDUSD and `BTCTUSD` as BTC/TUSD, not .../USD.
KNOWN_QUOTES: tuple[str, ...] = tuple(sorted(
    ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USDE", "USD1", "DAI", "USD", "EUR", "GBP", "TRY", "BRL",
     "JPY", "AUD", "UAH", "BTC", "ETH", "BNB", "SOL"),
    key=len, reverse=True))

PERPETUAL_SUFFIX = ".P"  # TradingView's mark for a perpetual swap, e.g. BTCUSDT.P


def tv_symbol(ticker: str, markets: Collection[str] = (), symbols: Mapping[str, str] = {}) -> str:
    """The ccxt symbol for a TradingView ticker (`BINANCE:BTCUSDT.P` -> `BTC/USDT:USDT`).

    An entry of `symbols` (keyed by the ticker with or without its exchange prefix) wins; a ccxt
    symbol passes through; otherwise the split is the one found in `markets` (the venue's loaded
    symbols), else the one a known quote currency gives; a ticker no rule fits comes back unchanged.
    """
    text = ticker.strip()
    bare = text.rpartition(":")[2]
    for key in (text, bare):
        if key in symbols:
            return symbols[key]
    if "/" in text:
        return text
    perpetual = bare.upper().endswith(PERPETUAL_SUFFIX)
    pair = (bare[: -len(PERPETUAL_SUFFIX)] if perpetual else bare).upper()
    if markets:
        known = set(markets)
        for base, quote in _splits(pair):
            for candidate in _candidates(base, quote, perpetual):
                if candidate in known:
                    return candidate
    for quote in KNOWN_QUOTES:
        if pair.endswith(quote) and len(pair) > len(quote):
            return _candidates(pair[: -len(quote)], quote, perpetual)[0]
    return text


def _splits(pair: str) -> list[tuple[str, str]]:
    """Every base/quote split of `pair`, those ending in a known quote first (longest quote first)."""
    splits = [(pair[:i], pair[i:]) for i in range(1, len(pair))]
    return sorted(splits, key=lambda s: (s[1] not in KNOWN_QUOTES, -len(s[1])))


def _candidates(base: str, quote: str, perpetual: bool) -> list[str]:
    """The ccxt symbols a split may stand for: spot, or a linear then an inverse perpetual."""
    if not perpetual:
        return [f"{base}/{quote}"]
    return [f"{base}/{quote}:{quote}", f"{base}/{quote}:{base}"]
