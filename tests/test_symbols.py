"""tv_symbol: TradingView tickers to ccxt symbols."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fksroute.symbols import KNOWN_QUOTES, tv_symbol

MARKETS = ("BTC/USDT", "ETH/USDT", "ETH/BTC", "BTC/USDT:USDT", "BTC/USD:BTC", "1000PEPE/USDT:USDT", "USDC/USDT",
           "WBTC/BTC", "BTC/FDUSD")


@pytest.mark.parametrize("ticker, expected", [
    ("BTCUSDT", "BTC/USDT"),
    ("BINANCE:ETHUSDT", "ETH/USDT"),
    ("BTCUSDT.P", "BTC/USDT:USDT"),
    ("BYBIT:BTCUSDT.P", "BTC/USDT:USDT"),
    ("ETHBTC", "ETH/BTC"),
    ("BTCFDUSD", "BTC/FDUSD"),
    ("btcusdt", "BTC/USDT"),
    (" BTCUSDT ", "BTC/USDT"),
])
def test_without_markets_known_quotes_split_the_ticker(ticker, expected):
    assert tv_symbol(ticker) == expected


@pytest.mark.parametrize("ticker, expected", [
    ("BTCUSDT", "BTC/USDT"),
    ("BTCUSDT.P", "BTC/USDT:USDT"),
    ("BTCUSD.P", "BTC/USD:BTC"),  # no linear BTC/USD:USD market: the inverse one
    ("1000PEPEUSDT.P", "1000PEPE/USDT:USDT"),
    ("USDCUSDT", "USDC/USDT"),
    ("WBTCBTC", "WBTC/BTC"),
])
def test_loaded_markets_pick_the_split(ticker, expected):
    assert tv_symbol(ticker, MARKETS) == expected


def test_markets_win_over_known_quotes():
    # without markets, BTC is a known quote and ABCBTC splits as ABC/BTC; the venue says otherwise
    assert tv_symbol("ABCBTC") == "ABC/BTC"
    assert tv_symbol("ABCBTC", ["AB/CBTC"]) == "AB/CBTC"


def test_an_explicit_map_entry_wins():
    symbols = {"BTCUSDT": "BTC/USDC", "BINANCE:ETHUSDT": "ETH/FDUSD", "ES1!": "ES 12-26"}
    assert tv_symbol("BTCUSDT", MARKETS, symbols) == "BTC/USDC"
    assert tv_symbol("COINBASE:BTCUSDT", MARKETS, symbols) == "BTC/USDC"  # found without the prefix
    assert tv_symbol("BINANCE:ETHUSDT", MARKETS, symbols) == "ETH/FDUSD"
    assert tv_symbol("ES1!", (), symbols) == "ES 12-26"
    assert tv_symbol("ETHUSDT", MARKETS, symbols) == "ETH/USDT"


@pytest.mark.parametrize("symbol", ["BTC/USDT", "BTC/USDT:USDT", "ETH/USD:ETH-251226"])
def test_a_ccxt_symbol_passes_through(symbol):
    assert tv_symbol(symbol) == symbol
    assert tv_symbol(symbol, MARKETS) == symbol


@pytest.mark.parametrize("ticker", ["ES1!", "NQ1!", "XYZ", "USDT"])
def test_a_ticker_no_rule_fits_comes_back_unchanged(ticker):
    assert tv_symbol(ticker) == ticker


_asset = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=2, max_size=8)


@given(base=_asset, quote=st.sampled_from(KNOWN_QUOTES), perpetual=st.booleans(), prefix=st.sampled_from(["", "BINANCE:"]))
def test_every_listed_market_is_found_from_its_ticker(base, quote, perpetual, prefix):
    symbol = f"{base}/{quote}" + (f":{quote}" if perpetual else "")
    ticker = prefix + base + quote + (".P" if perpetual else "")
    assert tv_symbol(ticker, [symbol, "BTC/USDT", "ETH/BTC"]) == symbol
