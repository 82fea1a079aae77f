"""Prometheus metrics, on a registry of our own (never the process-global default).

- ``wechat_token_upstream_requests_total{source,result}``: calls to WeChat; result is ``ok``
  or the error kind (``transient``, ``fatal``, ``quota``, ``stale_token``).
- ``wechat_token_upstream_request_seconds{source}``: their duration.
- ``wechat_token_seconds_left{source}``: life left of the value this process knows (0: none).
- ``wechat_token_source_state{source,state}``: 1 for the source's state (ok, backoff, blocked, quota).
- ``wechat_token_source_failures{source}``: consecutive failed fetches.
- ``wechat_token_upstream_calls_today{source}``: calls to WeChat today (China time) by every
  instance, as counted in Redis (server.ops.quota).
- ``wechat_token_daily_quota{source}``: the source's daily quota (sources with one only).
- ``wechat_token_build_info{version,python}``: always 1; the labels say what runs.
- ``wechat_token_webhook_delivered_total{source}``: webhook POSTs a receiver accepted (2xx),
  counted by the one instance that sent each (server.ops.webhooks).
- ``wechat_token_webhook_retries_total{source}``: failed attempts followed by another.
- ``wechat_token_webhook_failed_total{source,reason}``: deliveries given up: ``gave_up`` (the
  retry window ended), ``shutdown`` (dropped at stop), ``overflow`` (too many in flight, not
  claimed), ``redis`` (no claim: Redis failed), ``forged`` (a message above the stored version:
  no stored change made it), ``error`` (a bug: see the log).

Alert on ``wechat_token_source_state{state="blocked"} == 1``, on ``seconds_left < 300``, on
``upstream_calls_today > 0.8 * daily_quota`` and on ``increase(webhook_failed_total[1h]) > 0``.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from server import __version__

STATES = ("ok", "backoff", "blocked", "quota", "waiting")


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
        self.webhook_delivered = Counter(
            "wechat_token_webhook_delivered", "Webhook deliveries a receiver accepted (2xx), by source", ["source"], registry=self.registry
        )
        self.webhook_retries = Counter(
            "wechat_token_webhook_retries", "Failed webhook attempts that were retried, by source", ["source"], registry=self.registry
        )
        self.webhook_failed = Counter(
            "wechat_token_webhook_failed", "Webhook deliveries given up, by source and reason", ["source", "reason"], registry=self.registry
        )
        # The usual Prometheus idiom for "what runs here": a constant 1 whose labels say it
        # (join on it to tell instances running different versions apart).
        Info("wechat_token_build", "Version of wechat-token-server and of Python", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
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
        calls = GaugeMetricFamily(
            "wechat_token_upstream_calls_today", "Calls to WeChat today (China time) by every instance, counted in Redis", labels=["source"]
        )
        quota = GaugeMetricFamily("wechat_token_daily_quota", "Calls to WeChat allowed per day (China time)", labels=["source"])
        for name, s in self.status().items():
            left.add_metric([name], s["expires_in"])
            failures.add_metric([name], s["failures"])
            calls.add_metric([name], s.get("calls_today", 0))
            if s.get("quota"):
                quota.add_metric([name], s["quota"])
            for st in STATES:
                state.add_metric([name, st], 1.0 if s["state"] == st else 0.0)
        yield left
        yield state
        yield failures
        yield calls
        yield quota
