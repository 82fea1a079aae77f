"""Rate limits shared by every instance: counted in Redis by the ``limits`` library.

Two limits use it: failed authentications per client IP, and forced refreshes that start
an upstream call, per client and source.  Counting in Redis makes a limit hold for the
whole deployment: N instances behind a load balancer allow the configured number, not N
times it.  ``limits`` (the library behind Flask-Limiter) does the counting with its own
atomic Redis scripts, on the same connection pool as the store, so nothing here is a
hand-written window.  On a Redis Cluster (``redis.cluster``) it is ``limits``' cluster
storage on our cluster client: each of its commands touches one key, so the keys need no
hash tag (a client's count lives in whichever slot its key hashes to).

Fixed windows of one minute (``limits``' FixedWindowRateLimiter): at most ``2 * limit - 1``
events can fall in a 60-second span straddling two windows, fine for these limits.

The shared count is cached for ``CACHE_SECONDS`` per key, since ``retry_after`` sits on the
path of every authenticated request: a request costs Redis one round trip per key and
second, and a key over its limit in one instance is refused by every other one within that
second.  Events (``hit``) always go to Redis, and while one is on its way it is counted as
pending, so a burst of concurrent requests cannot all slip through before the first of them
is counted (``over_here`` is checked without a round trip, right before the guarded work).

While Redis is unreachable or slow (no answer within ``REDIS_WAIT``), each process counts
alone in memory (``limits``' MemoryStorage) for a second at a time: the auth path keeps
working without Redis, at N times the limit, and a hung Redis slows no request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits import strategies as sync_strategies
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import MemoryStorage
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

CACHE_SECONDS = 1.0  # how long a count read from Redis is believed
MAX_CACHED_KEYS = 10_000
REDIS_WAIT = 0.25  # seconds a request waits for Redis before counting in memory
REDIS_RETRY_DELAY = 1.0  # seconds during which counts stay in memory after a Redis failure

T = TypeVar("T")


class RedisSlow(Exception):
    """Redis did not answer within REDIS_WAIT (the command goes on in the background)."""


@dataclass
class _Count:
    believed_until: float  # monotonic
    remaining: int  # events left in the window, by Redis's count
    reset: float  # unix time the window ends (limits keeps it so)


class SharedLimit:
    """At most ``per_minute`` events per key per minute, counted in Redis under
    ``<prefix>wechat-token:limits:`` (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, name: str, per_minute: int) -> None:
        self.name = name
        self.item = RateLimitItemPerMinute(per_minute)
        key_prefix = f"{prefix}wechat-token:limits"
        storage: RedisStorage
        if isinstance(redis, RedisCluster):
            storage = _ClusterStorage(redis, key_prefix)
        else:
            # limits types its options as scalars, but its redispy bridge takes a connection pool
            # (and so shares the store's connections, Sentinel included).
            pool: Any = redis.connection_pool
            storage = RedisStorage("async+redis://", implementation="redispy", connection_pool=pool, key_prefix=key_prefix)
        self._shared = FixedWindowRateLimiter(storage)
        self._alone = sync_strategies.FixedWindowRateLimiter(MemoryStorage())  # while Redis is away
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._pending: dict[str, int] = {}  # events on their way to Redis
        self._redis_down_logged = False
        self._skip_redis_until = 0.0  # monotonic
        self._reads: dict[str, asyncio.Future[bool]] = {}  # counts being read, one read per key

    def set_rate(self, per_minute: int) -> None:
        """A reloaded limit: counts so far stay, the next check uses the new rate."""
        self.item = RateLimitItemPerMinute(per_minute)

    def __repr__(self) -> str:
        return f"SharedLimit({self.name}, {self.item})"

    def over_here(self, key: str) -> float:
        """Seconds to wait by what this process knows now (the cached count less the events
        on their way), with no round trip: 0.0 when ``key`` may have another event."""
        count = self._counts.get(key)
        if count is None or count.remaining - self._pending.get(key, 0) > 0:
            return 0.0
        return max(0.001, count.reset - time.time())

    async def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may have another event; 0.0 when it may now (nothing counted).

        A count older than ``CACHE_SECONDS`` is read again, once however many requests ask
        (a crowd on one key costs Redis one command).  While that read is under way, a key
        whose last count showed no event is answered from it; one without a count, or with
        any event counted, waits for the read (so a count another instance raised is seen as
        soon as the cache ends)."""
        count = self._counts.get(key)
        if count is None or count.believed_until <= time.monotonic():
            reading = self._reads.get(key)
            if reading is None:
                reading = asyncio.ensure_future(self._read_count(key))
                self._reads[key] = reading
                reading.add_done_callback(lambda f: self._reads.pop(key) if self._reads.get(key) is f else None)
            if count is None or count.remaining < self.item.amount or self._pending.get(key, 0):
                if not await asyncio.shield(reading):
                    return 0.0 if self._alone.test(self.item, self.name, key) else self._alone_wait(key)
        return self.over_here(key)

    async def _read_count(self, key: str) -> bool:
        """Read ``key``'s shared count into the cache; False when Redis did not answer."""
        try:
            reset, remaining = await self._redis(lambda: self._shared.get_window_stats(self.item, self.name, key))
        except (RedisError, RedisSlow) as e:
            self._redis_failed(e)
            return False
        self._remember(key, remaining, reset)
        return True

    async def hit(self, key: str) -> float:
        """Count one event for ``key`` if the limit allows it and return 0.0; else the
        seconds to wait (nothing counted)."""
        self._pending[key] = self._pending.get(key, 0) + 1
        try:
            allowed = await self._redis(lambda: self._shared.hit(self.item, self.name, key))
            reset, remaining = await self._redis(lambda: self._shared.get_window_stats(self.item, self.name, key))
            self._remember(key, remaining, reset)
        except (RedisError, RedisSlow) as e:
            self._redis_failed(e)
            return 0.0 if self._alone.hit(self.item, self.name, key) else self._alone_wait(key)
        finally:
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
        return 0.0 if allowed else max(0.001, reset - time.time())

    def _alone_wait(self, key: str) -> float:
        """Seconds until this process's own window for ``key`` ends (limits keeps it as a unix time)."""
        return max(0.001, self._alone.get_window_stats(self.item, self.name, key)[0] - time.time())

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

    def _remember(self, key: str, remaining: int, reset: float) -> None:
        self._counts[key] = _Count(time.monotonic() + CACHE_SECONDS, remaining, reset)
        self._counts.move_to_end(key)
        while len(self._counts) > MAX_CACHED_KEYS:
            self._counts.popitem(last=False)

    def _redis_failed(self, e: Exception) -> None:
        self._skip_redis_until = time.monotonic() + REDIS_RETRY_DELAY
        if not self._redis_down_logged:
            logger.warning("rate limit %s: redis unreachable (%s): counting in this process until it returns", self.name, type(e).__name__)
            self._redis_down_logged = True

    def _redis_back(self) -> None:
        if self._redis_down_logged:
            logger.info("rate limit %s: counting in redis again", self.name)
            self._redis_down_logged = False


class _ClusterStorage(RedisClusterStorage):
    """``limits``' Redis Cluster storage on a cluster client of ours (server.redis_client.build_redis),
    so its connections are the ones app.stop closes: left alone, it would build a RedisCluster
    of its own per limit from a URI, connections nobody closes.

    ``configure_bridge`` is where ``limits``' own storages pick their client (basic, sentinel,
    cluster); the bridge's ``storage`` and ``connection_getter`` are what its commands use
    (limits 5.x).
    """

    def __init__(self, client: RedisCluster, key_prefix: str) -> None:
        self._client = client
        # The URI only chooses the scheme: the client already knows the cluster.
        super().__init__("async+redis+cluster://", implementation="redispy", key_prefix=key_prefix)

    def configure_bridge(self) -> None:
        bridge: Any = self.bridge
        bridge.storage = self._client
        bridge.connection_getter = lambda _readonly: self._client


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
