"""Upstream calls per source per day, against WeChat's daily quota.

WeChat counts the calls of an appid per day, China time (UTC+8), and answers 45009 once
the quota is spent (2000 a day for an official account's or a mini program's token).  The
count lives in Redis, so it sums over every instance and survives restarts:

``<prefix>NAME:calls:YYYYMMDD``
    Calls made for source NAME on that China day (``INCR``), kept two days.  On a Redis
    Cluster ``{<prefix>NAME}:calls:YYYYMMDD``, in the slot of NAME's value (the name comes from
    :class:`server.store.Keys`, as every key of a source).

The day is Redis's (``TIME``, read inside the script): the one clock every instance shares,
so two hosts whose clocks disagree near midnight still count into the same key.  (On a
cluster each source's day is its node's: nodes whose clocks disagree near midnight may
briefly show two sources on different days.)

Counting happens in the background, next to the call it counts
(:meth:`server.fetcher.Fetcher._upstream_fetch` calls :meth:`DailyCalls.record`): a slow or
unreachable Redis never delays or fails a fetch; a call counted while Redis is unreachable
is lost to the figure (the figure is for humans and a warning, never a decision).  Reads of
a token never touch these keys; ``/status`` and ``/metrics`` ask Redis once (within
:data:`SYNC_TIMEOUT`) for every source's figure, including other instances' calls.

At :data:`WARN_RATIO` of a source's quota one warning is logged, by the instance whose call
crossed it (``INCR`` answers each count to exactly one caller), so the cluster warns once a day.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.store import Keys

logger = logging.getLogger(__name__)

CHINA_OFFSET = 8 * 3600  # seconds east of UTC of the day WeChat's quotas follow
KEEP_SECONDS = 2 * 86400  # a day's key outlives its day, so yesterday's figure can still be read
WARN_RATIO = 0.8
SYNC_TIMEOUT = 0.5  # seconds /status and /metrics wait for Redis's figures before showing ours

# KEYS: one stem per source, "<prefix>NAME:calls:"; the script appends the day to each.
#   (A key built in the script: on a cluster the stem's hash tag keeps the built key in the
#   stem's slot, and a call carries the stems of one source only, see DailyCalls._read.)
# ARGV[1] seconds east of UTC of the quota's day (28800: China), ARGV[2] "1": count a call
#   on KEYS[1]; "0": only read every stem, ARGV[3] seconds to keep a day's key.
# Returns {day "YYYYMMDD", milliseconds until that day ends, count of KEYS[1], count of KEYS[2], ...}.
# The date is computed from days since 1970 with Howard Hinnant's civil_from_days (Lua has
# no date functions that take a given time without the server's own zone).
_CALLS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local days = math.floor(now / 86400)
local left_ms = math.floor(((days + 1) * 86400 - now) * 1000)
local z = days + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local d = doy - math.floor((153 * mp + 2) / 5) + 1
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400
if m <= 2 then y = y + 1 end
local day = string.format('%04d%02d%02d', y, m, d)
local out = {day, left_ms}
if ARGV[2] == '1' then
  local n = redis.call('INCR', KEYS[1] .. day)
  redis.call('EXPIRE', KEYS[1] .. day, ARGV[3])
  out[3] = n
else
  for i, stem in ipairs(KEYS) do
    out[i + 2] = tonumber(redis.call('GET', stem .. day) or '0') or 0
  end
end
return out
"""


@dataclass
class _Figure:
    """What this process knows of one source's count: ``calls`` on ``day``, which ends at
    ``day_ends`` (``time.monotonic()`` seconds, from Redis's clock)."""

    day: str = ""
    calls: int = 0
    day_ends: float = 0.0


class DailyCalls:
    """Counts upstream calls per source and China day in Redis (see the module docstring).

    ``quotas`` maps each source to its daily quota (None: none known; its calls are still
    counted).  Implements the :class:`server.fetcher.CallCounter` the refresher is given.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, quotas: Mapping[str, int | None]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys.of(redis, prefix)
        self.quotas = dict(quotas)
        self._script = redis.register_script(_CALLS_LUA)
        self._figures = {name: _Figure() for name in self.quotas}
        self._tasks: set[asyncio.Future[None]] = set()
        self._failing = False  # a Redis error was logged; the next success says so
        self._reading: asyncio.Future[Any] | None = None  # the sync read under way

    def __repr__(self) -> str:
        return f"DailyCalls({len(self.quotas)} sources, prefix={self.prefix!r})"

    def _stem(self, name: str) -> str:
        return self.keys.aux(name, "calls:")

    def key(self, name: str, day: str) -> str:
        """The Redis key of ``name``'s count on ``day`` (YYYYMMDD, China time)."""
        return self.keys.aux(name, f"calls:{day}")

    # --- counting --------------------------------------------------------------------------

    def record(self, name: str) -> None:
        """Count one upstream call of ``name``, in the background: never waits, never raises."""
        task = asyncio.ensure_future(self._count(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count(self, name: str) -> None:
        try:
            day, left_ms, calls = await self._script(keys=[self._stem(name)], args=[CHINA_OFFSET, "1", KEEP_SECONDS])
        except (RedisError, OSError) as e:
            self._redis_failed(e)
            return
        self._redis_answered()
        self._learn(name, str(day), int(calls), int(left_ms))
        quota = self.quotas.get(name)
        if quota and int(calls) == self.threshold(quota):
            logger.warning(
                "source %s: %d upstream calls today (China time), %d%% of its daily quota of %d; "
                "WeChat answers 45009 past it, until midnight China time: look for what forces refreshes",
                name, calls, round(100 * WARN_RATIO), quota,
            )

    @staticmethod
    def threshold(quota: int) -> int:
        """The count at which the warning is logged: :data:`WARN_RATIO` of ``quota``, rounded up."""
        return max(1, math.ceil(WARN_RATIO * quota))

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for counts under way (before Redis is closed)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # --- reading ---------------------------------------------------------------------------

    async def sync(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Read every source's count from Redis (one round trip, every instance's calls).

        Waits at most ``timeout`` seconds; False (the figures stay what this process last
        knew) when Redis did not answer in time.
        """
        names = list(self.quotas)
        if not names:
            return True
        # Concurrent syncs share one read; a hung Redis must not hold /status: the read goes
        # on alone (one connection, not one per request) and is dropped when it lands.
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read(names))
            self._reading.add_done_callback(_retrieve)
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._reading), timeout)
        except asyncio.TimeoutError:
            return False
        except (RedisError, OSError) as e:
            self._redis_failed(e)
            return False
        self._redis_answered()
        for name, (day, left_ms, calls) in zip(names, answer, strict=True):
            self._learn(name, day, calls, left_ms)
        return True

    async def _read(self, names: list[str]) -> list[tuple[str, int, int]]:
        """``(day, milliseconds left in it, calls)`` per name: one script for all on a single
        Redis; on a cluster one per source (a script's keys share one slot), concurrently."""
        groups = [[n] for n in names] if self.keys.cluster else [names]
        answers = await asyncio.gather(
            *(self._script(keys=[self._stem(n) for n in group], args=[CHINA_OFFSET, "0", KEEP_SECONDS]) for group in groups)
        )
        return [(str(a[0]), int(a[1]), int(calls)) for a in answers for calls in a[2:]]

    def _learn(self, name: str, day: str, calls: int, left_ms: int) -> None:
        figure = self._figures.setdefault(name, _Figure())
        # Answers may land out of order (counts run concurrently): a day's count only grows,
        # and an earlier day's figure never replaces a later one.
        if day > figure.day:
            figure.day, figure.calls = day, calls
        elif day == figure.day:
            figure.calls = max(figure.calls, calls)
        else:
            return
        figure.day_ends = time.monotonic() + left_ms / 1000.0

    def today(self, name: str) -> tuple[int, int | None]:
        """``(calls today, daily quota)`` for ``name``, as last seen in Redis (0 once the
        China day of that figure has ended); the quota is None when none is configured."""
        figure = self._figures.get(name)
        calls = figure.calls if figure is not None and time.monotonic() < figure.day_ends else 0
        return calls, self.quotas.get(name)

    # --- Redis errors: logged once per outage -----------------------------------------------

    def _redis_failed(self, e: Exception) -> None:
        if not self._failing:
            logger.warning("cannot count upstream calls in Redis (%s); fetches go on, the daily figures miss these calls", type(e).__name__)
            self._failing = True

    def _redis_answered(self) -> None:
        if self._failing:
            logger.info("counting upstream calls in Redis again")
            self._failing = False


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Retrieve a result nobody awaits any more, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()
