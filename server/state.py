"""Per-source state and the vocabulary of the refresher: what a caller wants, why a value
cannot be had, and the arithmetic of backoff and quota resets.  Data and pure functions only."""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.store import Block, Entry

CHINA = datetime.timezone(datetime.timedelta(hours=8))
BACKOFF_BASE = 1.0  # seconds before the first retry (before jitter)


def until_quota_reset(now: float) -> float:
    """Seconds from unix time ``now`` (Redis's clock) to the next midnight in China (UTC+8),
    when WeChat's daily quotas reset."""
    day = datetime.datetime.fromtimestamp(now, CHINA).date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(day, datetime.time(0), CHINA).timestamp() - now


class Unavailable(Exception):
    """No valid value can be had now; ``str()`` is the short reason shown to clients."""


class Blocked(Unavailable):
    """The source is blocked (fatal errcode) or out of daily quota: no call was made."""


class BackingOff(Unavailable):
    """A fetch failed recently (here or in another instance): wait ``delay`` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class NotPermitted(Exception):
    """A caller's ``permit`` refused the upstream call it would have started (a rate
    limit): raised by the permit, passed through untouched; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DependencyUnavailable(Unavailable):
    """A source this one templates in (``<<name>>``) has no valid value and may not be fetched now."""


@dataclass(frozen=True)
class Want:
    """What a caller of :meth:`Refresher.refresh` asks for.

    ``force``: a new value even if the current one is fresh.  ``old``: the value the
    caller holds (and WeChat rejected); when it is still the current one, it is replaced
    whatever its age; when it is no longer current nothing is fetched.  ``min_interval``:
    a forced refresh without ``old`` within ``refresh.force_min_interval`` of the last
    fetch returns that fetch.  ``retry_blocked``: try a blocked or out-of-quota source
    again (an operator, a restart).  ``ignore_backoff``: call even while backing off (an
    operator).  ``permit``: awaited just before this caller's own upstream call (never
    for a request answered without one); it raises to refuse the call (a rate limit).
    """

    force: bool = False
    old: str | None = None
    min_interval: bool = True
    retry_blocked: bool = False
    ignore_backoff: bool = False
    permit: Callable[[], Awaitable[None]] | None = None


@dataclass
class SourceState:
    """What this process knows about one source.  Times are ``time.monotonic()`` seconds."""

    entry: Entry | None = None
    failures: int = 0
    retry_at: float = 0.0  # no fetch before this (backoff), unless an operator forces one
    block: Block | None = None  # a fatal errcode or 45009: no fetch until retried
    block_until: float = 0.0  # when the block ends by itself (midnight for 45009, inf for fatal)
    last_error: str = ""
    upstream_calls: int = 0
    flight: asyncio.Future[Entry] | None = None  # the fetch under way (single flight)
    stale_recovery_failed: bool = False  # 40001 again after refreshing the dependency
    lost_answers: int = 0  # calls in a row whose answer this process lost (Redis's NAME:lost may be lost with its data)
    force_spent_until: float = 0.0  # 45009 on a forced call (stable_token: 20 a day): no forced call before this
    retry_handle: object | None = None
    # The value ``entry`` replaced, and when (monotonic): WeChat keeps it valid a few more
    # minutes, and the face (server.face.issued) still accepts it from SDKs during them.
    previous: Entry | None = None
    replaced_at: float = 0.0
    # When (monotonic) a Redis read, sent at that moment, found ``entry`` current: the
    # mirror serves memory without asking Redis for ``refresh.read_max_age`` after it.
    confirmed_at: float = -math.inf

    def adopt(self, entry: Entry) -> None:
        """Hold ``entry``, remembering the value it replaces when it is a different one."""
        old = self.entry
        if old is not None and old.value != entry.value:
            self.previous, self.replaced_at = old, time.monotonic()
        self.entry = entry

    def healthy(self) -> None:
        """Forget past failures (an upstream answer, or another instance's new value)."""
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""

    def blocked(self, now: float) -> Block | None:
        return self.block if self.block is not None and now < self.block_until else None


def why_unavailable(name: str, state: SourceState, now: float) -> str:
    """The short reason, safe for clients, why ``name`` has no value to serve."""
    block = state.blocked(now)
    if block is not None and block.kind == "quota":
        return f"source {name}: daily quota reached (45009)"
    if block is not None:
        return f"source {name} is blocked after errcode {block.errcode}; see the server log"
    return f"source {name} has no valid value; upstream is failing"


def backoff_floor(backoff_max: float, failures: int, retry_after: float = 0.0) -> float:
    """Seconds to wait at least after ``failures`` consecutive failures (the jittered delay
    is between this and twice this): 0.5, 1, 2 ... up to half of ``backoff_max``, and at
    least ``retry_after`` (what the errcode asks: 45011, a minute)."""
    cap = min(backoff_max, BACKOFF_BASE * 2 ** max(0, failures - 1))
    return max(cap / 2, retry_after)
