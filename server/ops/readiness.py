"""Readiness: may this instance take traffic?  ``GET /readyz`` for load balancers and Kubernetes.

Ready when Redis answers a ``PING`` within :data:`PING_TIMEOUT` seconds and every source holds
a valid value.  ``/healthz`` stays pure liveness (the process answers HTTP): a restart cures
neither a Redis outage nor a blocked source, so only readiness looks at them.

The answer names what is wrong (Redis, and each source without a valid value with the
reason: its errcode when blocked), never a value, a secret or WeChat's errmsg (which may
carry an IP).  The probe needs no secret and skips ``server.allow_ips`` (``server.probe_ips``
peers are let through at accept), like ``/healthz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from server.handlers import BaseHandler
from server.refresher import Refresher
from server.store import Store

logger = logging.getLogger(__name__)

#: Seconds a probe waits for Redis's PONG: a hung Redis makes the probe say "unreachable"
#: at once instead of holding it for ``redis.socket_timeout`` (probes time out at 1 s or so).
PING_TIMEOUT = 0.5


class Readiness:
    """The readiness check over the store and the refresher's per-source state."""

    def __init__(
        self, store: Store, refresher: Refresher, timeout: float = PING_TIMEOUT, explain: Callable[[], dict[str, str]] | None = None
    ) -> None:
        self.store = store
        self.refresher = refresher
        self.timeout = timeout
        #: sources whose "no valid value" has a better reason (a platform waiting for its verify ticket)
        self.explain = explain
        self._ping: asyncio.Future[bool] | None = None  # the PING under way, shared by concurrent probes
        self._last: tuple[str, ...] | None = None  # the problems last reported, to log changes only

    def __repr__(self) -> str:
        return f"Readiness(timeout={self.timeout})"

    async def check(self) -> dict[str, Any]:
        """``{"status": "ready"}``, or ``{"status": "not ready", "redis": "ok" | "unreachable",
        "sources": {NAME: reason}}`` naming each source without a valid value."""
        redis_ok = await self._redis_answers()
        sources = self.source_problems()
        if self.explain is not None:
            sources.update({n: why for n, why in self.explain().items() if n in sources})
        problems = (() if redis_ok else ("redis unreachable",)) + tuple(f"{n}: {why}" for n, why in sources.items())
        self._log_change(problems)
        if not problems:
            return {"status": "ready"}
        return {"status": "not ready", "redis": "ok" if redis_ok else "unreachable", "sources": sources}

    async def _redis_answers(self) -> bool:
        """True when Redis answers a PING within ``timeout`` seconds.

        The PING is shared by the probes that arrive while it is under way, and left to finish
        in the background when it takes too long: a hung Redis costs one connection, not one
        per probe, and never a probe's own time beyond ``timeout``.
        """
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self.store.ping())
            self._ping.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(self._ping), self.timeout)
        except (asyncio.TimeoutError, RedisError, OSError):
            return False

    def source_problems(self) -> dict[str, str]:
        """Each source without a valid value, with why: ``blocked: 40164``, ``daily quota
        reached: 45009``, or ``no valid value`` (never fetched, failing, or waiting for the
        source it templates in).  A source that is failing but still serves a valid value is
        no problem here: it answers reads (see /status and /metrics for its state)."""
        now = time.monotonic()
        out = {}
        for name, state in self.refresher.states.items():
            if state.entry is not None and state.entry.remaining() > 0:
                continue
            block = state.blocked(now)
            if block is not None and block.kind == "quota":
                out[name] = f"daily quota reached: {block.errcode}"
            elif block is not None:
                out[name] = f"blocked: {block.errcode}"
            else:
                out[name] = "no valid value"
        return out

    def _log_change(self, problems: tuple[str, ...]) -> None:
        # Probes come every few seconds: log when the answer changes, not on each probe.
        if problems == self._last:
            return
        if problems:
            logger.warning("not ready: %s", "; ".join(problems))
        elif self._last is not None:
            logger.info("ready again")
        self._last = problems


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a PING nobody awaits any more, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


class ReadyHandler(BaseHandler):
    """Outside the IP allowlist and without a secret, like /healthz: probes call it."""

    needs_auth = False
    check_ip = False

    def initialize(self, readiness: Readiness, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.readiness = readiness

    async def get(self) -> None:
        """Readiness: ``GET /readyz`` -> ``200 {"status": "ready"}``, or ``503 {"status": "not ready",
        "redis": "unreachable", "sources": {"shop.access_token": "blocked: 40164", "ticket": "no valid value"}}``.
        """
        body = await self.readiness.check()
        if body["status"] != "ready":
            self.set_status(503)
        self.finish(body)
