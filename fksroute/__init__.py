"""fksroute: a routing daemon for trading alerts."""

__version__ = "0.1.0"
