"""Every metric fksroute exports, defined in one place with fixed label sets."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Alert outcomes (fixed set): accepted, duplicate, skipped_<reason>, and rejected_<reason>.
REJECT_REASONS = ("auth", "address", "rate", "too_large", "invalid", "unmatched", "schema", "template",
                  "limits", "journal", "not_ready")
SKIP_REASONS = ("disabled", "schedule", "stale", "confidence", "unmatched")


class Metrics:
    """One registry per daemon, so that tests can run several side by side."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.alerts = Counter("fksroute_alerts_received_total", "Alerts received, by outcome", ["outcome"], registry=r)
        self.route_matches = Counter("fksroute_route_matches_total", "Alerts matched, by route", ["route"], registry=r)
        self.orders = Counter("fksroute_orders_total", "Orders by plugin and result status", ["plugin", "status"],
                              registry=r)
        self.latency = LatencyHistogram("fksroute_webhook_latency_seconds", "Time from request to answer",
                                        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        r.register(self.latency)
        self.plugin_up = Gauge("fksroute_plugin_up", "1 when the plugin reports itself healthy", ["plugin"], registry=r)
        self.unknown_orders = Gauge("fksroute_orders_unknown", "Orders whose outcome is unknown after a restart",
                                    registry=r)
        self.reload_ok = Gauge("fksroute_config_last_reload_successful",
                               "1 when the last reload succeeded", registry=r)
        self.reload_time = Gauge("fksroute_config_last_reload_success_timestamp_seconds",
                                 "When the last successful reload happened", registry=r)
        self.config_hash = Gauge("fksroute_config_hash", "Hash of the table in force, as a number", registry=r)
        self.config_info = Gauge("fksroute_config_info", "The table in force", ["version", "generation"], registry=r)
        self.reloads = Counter("fksroute_config_reloads_total", "Reloads, by trigger and result",
                               ["trigger", "result"], registry=r)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Counts of the hot path, added to their counters when the metrics are read: a plain
        # dict entry per alert rather than a labelled child's lock, three or four times.
        self._counts: defaultdict[tuple[Any, tuple[str, ...]], int] = defaultdict(int)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: it takes a lock and builds a key every time."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def alert(self, outcome: str) -> None:
        self._counts[self.alerts, (outcome,)] += 1

    def route_matched(self, route: str) -> None:
        self._counts[self.route_matches, (route,)] += 1

    def order(self, plugin: str, status: str) -> None:
        self._counts[self.orders, (plugin, status)] += 1

    def render(self) -> tuple[bytes, str]:
        counts, self._counts = self._counts, defaultdict(int)
        for (metric, labels), count in counts.items():
            self._child(metric, *labels).inc(count)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LatencyHistogram:
    """A histogram the hot path fills with a bisect and an addition (prometheus_client's own
    takes a lock and walks its buckets on every observation, eight times as long); the registry
    reads it as a collector, so it is exposed exactly as a Histogram would be."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = (*buckets, math.inf)
        self._counts = [0] * len(self._bounds)  # observations at most each bound, not yet cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> list[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, self._counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        return [HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self._sum)]
