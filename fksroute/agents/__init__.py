"""The fksroute agent: runs on Windows beside NinjaTrader 8 or MetaTrader 5 and takes orders over rpyc with mutual TLS.

`service` holds the rpyc service and server, `ninjatrader` and `mt5` the two backends, and `main`
the `fksroute agent` and `fksroute certs` commands.
"""
