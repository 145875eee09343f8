"""The metrics: the hot path's cheap counting is exposed exactly as prometheus_client's own would be."""

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fksroute.metrics import Metrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def lines(text: bytes, name: str) -> list[str]:
    return [l for l in text.decode().splitlines() if name in l and "_created" not in l]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=20) | st.sampled_from(BUCKETS), max_size=40))
def test_the_latency_histogram_reads_as_prometheus_clients_own(values):
    metrics = Metrics()
    registry = CollectorRegistry()
    reference = Histogram("fksroute_webhook_latency_seconds", "Time from request to answer", buckets=BUCKETS,
                          registry=registry)
    for value in values:
        metrics.latency.observe(value)
        reference.observe(value)
    mine, theirs = metrics.render()[0], generate_latest(registry)
    name = "fksroute_webhook_latency_seconds"
    assert lines(mine, name) == lines(theirs, name)


def test_counts_of_the_hot_path_reach_their_counters_when_read():
    metrics = Metrics()
    registry = CollectorRegistry()
    reference = Counter("fksroute_orders_total", "Orders by plugin and result status", ["plugin", "status"],
                        registry=registry)
    for plugin, status in [("paper", "filled")] * 3 + [("binance", "failed")]:
        metrics.order(plugin, status)
        reference.labels(plugin, status).inc()
    assert lines(metrics.render()[0], "fksroute_orders_total") == lines(generate_latest(registry), "fksroute_orders_total")
    metrics.order("paper", "filled")                 # counted again after a read: added, not replaced
    assert 'fksroute_orders_total{plugin="paper",status="filled"} 4.0' in metrics.render()[0].decode()
