"""Prometheus metrics, on a registry of our own (never the process-global default).

- ``wechat_token_upstream_requests_total{source,result}``: calls to WeChat; result is ``ok``
  or the error kind (``transient``, ``fatal``, ``quota``, ``stale_token``).
- ``wechat_token_upstream_request_seconds{source}``: their duration.
- ``wechat_token_seconds_left{source}``: life left of the value this process knows (0: none).
- ``wechat_token_source_state{source,state}``: 1 for the source's state (ok, backoff, blocked, quota).
- ``wechat_token_source_failures{source}``: consecutive failed fetches.

Alert on ``wechat_token_source_state{state="blocked"} == 1`` and on ``seconds_left < 300``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

STATES = ("ok", "backoff", "blocked", "quota")


class Metrics:
    """The counters the refresher feeds, and the gauges read from its status on scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.upstream_requests = Counter(
            "wechat_token_upstream_requests", "Calls to WeChat by source and result", ["source", "result"], registry=self.registry
        )
        self.upstream_seconds = Histogram(
            "wechat_token_upstream_request_seconds", "Duration of calls to WeChat", ["source"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def observe_upstream(self, source: str, result: str, seconds: float) -> None:
        self.upstream_requests.labels(source, result).inc()
        self.upstream_seconds.labels(source).observe(seconds)

    def watch(self, status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Publish gauges computed from ``status()`` (Refresher.status) at each scrape."""
        self.registry.register(_StatusCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector:
    def __init__(self, status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        left = GaugeMetricFamily("wechat_token_seconds_left", "Seconds of life left of the current value", labels=["source"])
        state = GaugeMetricFamily("wechat_token_source_state", "1 for the state the source is in", labels=["source", "state"])
        failures = GaugeMetricFamily("wechat_token_source_failures", "Consecutive failed fetches", labels=["source"])
        for name, s in self.status().items():
            left.add_metric([name], s["expires_in"])
            failures.add_metric([name], s["failures"])
            for st in STATES:
                state.add_metric([name, st], 1.0 if s["state"] == st else 0.0)
        yield left
        yield state
        yield failures
