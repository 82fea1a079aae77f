"""Rate limits shared by every instance: counted in Redis by the ``limits`` library.

Two limits use it: failed authentications per client IP, and forced refreshes that start
an upstream call, per client and source.  Counting in Redis makes a limit hold for the
whole deployment: N instances behind a load balancer allow the configured number, not N
times it.  ``limits`` (the library behind Flask-Limiter) does the counting with its own
atomic Redis scripts, on the same connection pool as the store, so nothing here is a
hand-written window.

Fixed windows of one minute (``limits``' FixedWindowRateLimiter): at most ``2 * limit - 1``
events can fall in a 60-second span straddling two windows, fine for these limits.

While Redis is unreachable or slow (no answer within ``REDIS_WAIT``) the counts fall back
to this process's memory (``limits``' MemoryStorage) for a second: the auth path keeps
working without Redis, at N times the limit, and a hung Redis slows no request.

Reads of a count (``retry_after``) sit on the path of every authenticated request, so
they are cached for ``CACHE_SECONDS`` per key: a request costs Redis one round trip per
key and second, and an IP over its limit in one instance is refused by every other one
within that second.  Events (``hit``) always go to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

CACHE_SECONDS = 1.0  # how long a count read from Redis is believed
MAX_CACHED_KEYS = 10_000
REDIS_WAIT = 0.25  # seconds a request waits for Redis before counting in memory
REDIS_RETRY_DELAY = 1.0  # seconds during which counts stay in memory after a Redis failure

T = TypeVar("T")


class RedisSlow(Exception):
    """Redis did not answer within REDIS_WAIT (the command goes on in the background)."""


class SharedLimit:
    """At most ``per_minute`` events per key per minute, counted in Redis under
    ``<prefix>wechat-token:limits:`` (in memory while Redis is unreachable)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, name: str, per_minute: int) -> None:
        self.name = name
        self.item = RateLimitItemPerMinute(per_minute)
        # limits types its options as scalars, but its redispy bridge takes a connection pool
        # (and so shares the store's connections, Sentinel included).
        pool: Any = redis.connection_pool
        storage = RedisStorage("async+redis://", implementation="redispy", connection_pool=pool, key_prefix=f"{prefix}wechat-token:limits")
        self._shared = FixedWindowRateLimiter(storage)
        self._local = FixedWindowRateLimiter(MemoryStorage())
        self._cache: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (believed until, wait)
        self._redis_down_logged = False
        self._skip_redis_until = 0.0  # monotonic

    def __repr__(self) -> str:
        return f"SharedLimit({self.name}, {self.item})"

    async def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may have another event; 0.0 when it may now (nothing counted)."""
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            wait = await self._redis(lambda: self._wait(self._shared, key))
        except (RedisError, RedisSlow) as e:
            self._redis_failed(e)
            wait = await self._wait(self._local, key)
        self._remember(key, now, wait)
        return wait

    async def hit(self, key: str) -> float:
        """Count one event for ``key`` if the limit allows it and return 0.0; else the
        seconds to wait (nothing counted)."""
        try:
            allowed = await self._redis(lambda: self._shared.hit(self.item, self.name, key))
            limiter = self._shared
        except (RedisError, RedisSlow) as e:
            self._redis_failed(e)
            allowed, limiter = await self._local.hit(self.item, self.name, key), self._local
        wait = 0.0 if allowed else await self._wait(limiter, key)
        self._cache.pop(key, None)  # the next read asks again
        return wait

    async def _redis(self, command: Callable[[], Awaitable[T]]) -> T:
        """``command()``'s result within REDIS_WAIT seconds; RedisSlow after that (the command
        is not cancelled: a redis-py connection cut mid-command is lost), and at once while
        Redis is skipped after a failure."""
        if time.monotonic() < self._skip_redis_until:
            raise RedisSlow()
        task = asyncio.ensure_future(command())
        try:
            result = await asyncio.wait_for(asyncio.shield(task), REDIS_WAIT)
        except asyncio.TimeoutError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" noise
            raise RedisSlow() from None
        self._redis_back()
        return result

    async def _wait(self, limiter: FixedWindowRateLimiter, key: str) -> float:
        if await limiter.test(self.item, self.name, key):
            return 0.0
        reset, _ = await limiter.get_window_stats(self.item, self.name, key)
        return max(0.0, reset - time.time())  # limits keeps the window's end as a unix time

    def _remember(self, key: str, now: float, wait: float) -> None:
        self._cache[key] = (now + CACHE_SECONDS, wait)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)

    def _redis_failed(self, e: Exception) -> None:
        self._skip_redis_until = time.monotonic() + REDIS_RETRY_DELAY
        if not self._redis_down_logged:
            logger.warning("rate limit %s: redis unreachable (%s): counting in this process until it returns", self.name, type(e).__name__)
            self._redis_down_logged = True

    def _redis_back(self) -> None:
        if self._redis_down_logged:
            logger.info("rate limit %s: counting in redis again", self.name)
            self._redis_down_logged = False


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
