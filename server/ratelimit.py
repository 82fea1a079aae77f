"""A small in-memory rate limiter: at most ``limit`` events per key per window.

Used for failed authentications per client IP and for forced refreshes per client.  The
state lives in this process on purpose: the auth path must keep working while Redis is
down.  With N instances behind a load balancer the effective limit is therefore N times
the configured one.

Fixed windows anchored at a key's first event: the first event of a key opens a window of
``window`` seconds; ``limit`` events fit in it; past that, :meth:`RateLimiter.retry_after`
says how many seconds remain until the window closes, and the next event after that opens
a new one.  (So at most ``2 * limit - 1`` events can fall in any ``window``-second span
straddling two windows: fine for a brute-force limit, and O(1) memory per key.)

Memory is bounded: windows are kept in the order they opened (all have the same length, so
that is also the order they close), closed ones are dropped as time passes, and when
``max_keys`` windows are open the oldest is dropped to make room.  Only events create
keys; asking :meth:`retry_after` never does, so ordinary traffic costs nothing.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """``limit`` events per key per ``window`` seconds; see the module docstring.

    ``clock`` returns seconds (default ``time.monotonic``); tests pass or set a fake one.
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, events in it], oldest window first
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """Keys with an open window (after dropping closed ones)."""
        self._expire(self.clock())
        return len(self._windows)

    def __repr__(self) -> str:
        return f"RateLimiter({self.limit}/{self.window:g}s, {len(self._windows)} keys)"

    def _expire(self, now: float) -> None:
        while self._windows:
            start, _ = next(iter(self._windows.values()))
            if start + self.window > now:
                break
            self._windows.popitem(last=False)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may have another event; 0.0 when it may now."""
        now = self.clock()
        self._expire(now)
        w = self._windows.get(key)
        if w is None or w[1] < self.limit:
            return 0.0
        return max(0.0, w[0] + self.window - now)

    def hit(self, key: str) -> None:
        """Record one event for ``key`` (even past the limit: the window does not move)."""
        now = self.clock()
        self._expire(now)
        w = self._windows.get(key)
        if w is not None:
            w[1] += 1
            return
        while len(self._windows) >= self.max_keys:
            self._windows.popitem(last=False)  # the window closest to closing anyway
        self._windows[key] = [now, 1]

    def acquire(self, key: str) -> float:
        """Record an event if one is allowed and return 0.0; else the seconds to wait (nothing recorded)."""
        wait = self.retry_after(key)
        if wait == 0.0:
            self.hit(key)
        return wait


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
