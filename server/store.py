"""Redis: the plain value keys direct readers use, plus metadata, locks and fencing.

Layout for a source ``NAME`` under the configured ``prefix`` (source names cannot contain
``:``, so these never collide):

``<prefix>NAME``
    The bare value (``redis-cli GET access_token``) with a TTL equal to its remaining
    life, so a direct reader never sees an expired value.
``<prefix>NAME:meta``
    A hash: ``version`` (integer, +1 per write), ``fetched_at`` and ``expires_at`` (unix
    seconds), ``field`` (``access_token`` or ``ticket``: the name our API answers with),
    ``same_until`` (upstream confirmed this value: no ordinary refresh before then).
    No TTL: the version must outlive the value so fencing still works after expiry.
``<prefix>NAME:lock``
    ``SET NX PX`` lock a process holds while it fetches NAME; its value is a random
    token so only the holder deletes it.
``<prefix>NAME:blocked``
    JSON ``{"kind": "fatal"|"quota", "errcode", "errmsg"}`` while no instance may call
    upstream for NAME (a fatal error until a value is stored, 45009 until midnight China
    time); an operator's forced refresh or a restart tries again.
``<prefix>NAME:backoff`` and ``<prefix>NAME:failures``
    Present (with a TTL) while no instance should retry NAME after a failed fetch, and
    the count of consecutive failures (deleted by the next write): several instances back
    off together, the delay growing with the failures of all of them.

Fencing: a fetch reads ``version`` after it takes the lock, and its write succeeds only
if ``version`` is still the same (one Lua script).  A slow fetch whose lock expired and
whose source was refreshed meanwhile by another process can therefore never overwrite
the newer value.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from server.config import RedisConfig

logger = logging.getLogger(__name__)

#: Connections to Redis per process.  Reads of one source are coalesced by the refresher,
#: so this bounds concurrent commands across sources, locks and scripts.
MAX_CONNECTIONS = 50

# KEYS[1] value key, KEYS[2] meta key, KEYS[3] backoff key, KEYS[4] failures key,
# KEYS[5] blocked key
# ARGV[1] value, ARGV[2] TTL in ms, ARGV[3] version the writer read, ARGV[4] fetched_at,
# ARGV[5] expires_at, ARGV[6] field
# Returns the new version, or -(current version) when the writer was fenced out.
# A stored value ends any backoff or block the instances were following.
_WRITE_LUA = """
local current = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if current ~= tonumber(ARGV[3]) then
  return -current
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'version', current + 1, 'fetched_at', ARGV[4],
           'expires_at', ARGV[5], 'field', ARGV[6], 'same_until', 0)
return current + 1
"""

# Put back a value held in memory that Redis lacks or holds an older version of (Redis
# restarted empty, came back with old data, or failed over to a lagging replica).
# KEYS[1] value key, KEYS[2] meta key, KEYS[3] backoff, KEYS[4] failures, KEYS[5] blocked
# ARGV[1] value, ARGV[2] TTL in ms, ARGV[3] the value's version, ARGV[4] fetched_at,
# ARGV[5] expires_at, ARGV[6] field
# Newer means a higher version, or the same version and a later fetched_at (a value fetched
# while Redis was unreachable carries the version it was based on + 1); the very same
# version is put back when only its value key is gone (evicted, or deleted by hand).  The new version
# is above every version Redis held, so a fenced writer that read an older one fails.
# Returns the new version, or 0 when Redis's is as new or newer.
_RESTORE_LUA = """
local v = tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0
local f = tonumber(redis.call('HGET', KEYS[2], 'fetched_at') or '0') or 0
local ev, ef = tonumber(ARGV[3]), tonumber(ARGV[4])
local same = (v == ev and f == ef)
if v > ev or (v == ev and f > ef) or (same and redis.call('EXISTS', KEYS[1]) == 1) then
  return 0
end
-- the same value whose key alone was lost (evicted, deleted) keeps its version
local nv = same and v or math.max(v + 1, ev)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'version', nv, 'fetched_at', ARGV[4],
           'expires_at', ARGV[5], 'field', ARGV[6], 'same_until', 0)
if nv > v then
  -- a newer value ends any backoff or block, as a write does
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
end
return nv
"""

# Upstream answered with the value already stored (stable_token in normal mode): note
# until when no ordinary refresh should ask again, without a new version.  An answer is a
# success: it ends the backoff the instances follow.
# KEYS[1] value key, KEYS[2] meta key, KEYS[3] backoff key, KEYS[4] failures key
# ARGV[1] value, ARGV[2] same_until (unix seconds)
_SAME_LUA = """
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'same_until', ARGV[2])
  return 1
end
return 0
"""

# Shorten a value's life, if it is still the stored one and lives longer than that.
# KEYS[1] value key, KEYS[2] meta key; ARGV[1] value, ARGV[2] life in ms, ARGV[3] expires_at
_CAP_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- same_until no longer holds: the shortened value must be refreshed in time
  redis.call('HSET', KEYS[2], 'expires_at', ARGV[3], 'same_until', 0)
  return 1
end
return 0
"""

# KEYS[1] lock key; ARGV[1] the holder's token, ARGV[2] lease in ms.  Renews the lease only
# if we still hold the lock.
_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock key; ARGV[1] the holder's token.  Deletes the lock only if we still hold it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Entry:
    """A credential value and what we know about it.  Times are unix seconds."""

    value: str
    expires_at: float
    fetched_at: float
    version: int
    field: str
    same_until: float = 0.0  # upstream confirmed this value: no ordinary refresh before this


    def remaining(self, now: float | None = None) -> float:
        """Seconds of life left (negative once expired)."""
        return self.expires_at - (time.time() if now is None else now)

    def __repr__(self) -> str:
        return f"Entry({self.value[:6]}..., v{self.version}, {self.remaining():.0f}s left)"


@dataclass(frozen=True)
class Block:
    """Why a source makes no upstream call: ``kind`` "fatal" or "quota", WeChat's errcode and errmsg."""

    kind: str
    errcode: int
    errmsg: str


def _number(raw: str | None) -> float:
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


def _blocked(raw: str | None) -> Block | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Block(str(data["kind"]), int(data["errcode"]), str(data["errmsg"]))
    except (ValueError, KeyError, TypeError):
        return Block("fatal", 0, "unreadable block marker")


@dataclass(frozen=True)
class Snapshot:
    """What Redis holds for a source: the live entry (None when absent), the version, and
    the seconds left of a backoff another instance announced (0: none)."""

    entry: Entry | None
    version: int
    backoff: float = 0.0
    failures: int = 0  # consecutive failures the announced backoff follows
    blocked: Block | None = None  # set by the instance that got a fatal error or 45009


def build_redis(cfg: RedisConfig, url: str | None = None) -> aioredis.Redis:
    """A redis.asyncio client for ``url`` (default: cfg.url) or for cfg.sentinel.

    Commands fail fast (one quick retry, ``socket_timeout`` seconds) so a Redis outage
    turns into a fallback to memory instead of hung requests.
    """
    common: dict[str, Any] = dict(
        socket_timeout=cfg.socket_timeout,
        socket_connect_timeout=cfg.socket_timeout,
        decode_responses=True,
        # One quick retry for a connection reset (a restarted Redis), none for a timeout:
        # a hung Redis must cost one socket_timeout, not two.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )
    if cfg.password is not None:
        common["password"] = cfg.password
    if cfg.sentinel is not None:
        from redis.asyncio.sentinel import Sentinel

        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in cfg.sentinel.hosts]
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": cfg.socket_timeout}
        if cfg.sentinel.sentinel_password:
            sentinel_kwargs["password"] = cfg.sentinel.sentinel_password
        if cfg.sentinel.password is not None:
            common["password"] = cfg.sentinel.password
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **common)
        # The sentinel pool does not block: give it room for a burst instead.
        return sentinel.master_for(cfg.sentinel.service_name, max_connections=10 * MAX_CONNECTIONS, **common)
    target = url or cfg.url
    assert target, "build_redis needs a URL or a sentinel config"
    # Blocking pool: a burst of requests waits (socket_timeout at most) for one of
    # MAX_CONNECTIONS connections instead of failing with MaxConnectionsError.
    pool = aioredis.BlockingConnectionPool.from_url(target, max_connections=MAX_CONNECTIONS, timeout=cfg.socket_timeout, **common)
    return aioredis.Redis(connection_pool=pool)


class Store:
    """All Redis access.  Every method may raise redis.RedisError; callers decide the fallback."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "") -> None:
        self.redis = redis
        self.prefix = prefix
        self._write = redis.register_script(_WRITE_LUA)
        self._restore = redis.register_script(_RESTORE_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._cap = redis.register_script(_CAP_LUA)
        self._extend = redis.register_script(_EXTEND_LUA)
        self._same = redis.register_script(_SAME_LUA)

    def __repr__(self) -> str:
        # The client's repr would show its connection kwargs; say only the prefix.
        return f"Store(prefix={self.prefix!r})"

    def key(self, name: str) -> str:
        return self.prefix + name

    async def close(self) -> None:
        # The pool was built by us (build_redis) and passed in: close its connections too.
        await self.redis.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def read(self, name: str) -> Snapshot:
        """The value, its remaining life and its metadata in one round trip."""
        key = self.key(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            pipe.hmget(key + ":meta", "version", "fetched_at", "field", "same_until")
            pipe.get(key + ":failures")
            pipe.pttl(key + ":backoff")
            pipe.get(key + ":blocked")
            value, pttl, (version, fetched_at, field, same_until), failures, backoff_ms, blocked = await pipe.execute()
        # Metadata someone garbled must not turn every read into an error.
        v = int(_number(version))
        backoff = max(0, backoff_ms or 0) / 1000.0
        block = _blocked(blocked)
        if value is None or pttl is None or pttl <= 0:
            return Snapshot(None, v, backoff, int(_number(failures)), block)
        now = time.time()
        entry = Entry(value, now + pttl / 1000.0, _number(fetched_at) or now, v, field or "access_token", _number(same_until))
        return Snapshot(entry, v, backoff, int(_number(failures)), block)

    async def write(self, name: str, value: str, life: float, fetched_at: float, field: str, read_version: int) -> Entry | None:
        """Store a freshly fetched value with ``life`` seconds to live.

        Returns the stored Entry, or None when the version moved since ``read_version``
        (another process wrote a newer value: ours must not replace it).
        """
        key = self.key(name)
        expires_at = fetched_at + life
        ttl_ms = max(1, int((expires_at - time.time()) * 1000))
        result = int(
            await self._write(
                keys=[key, key + ":meta", key + ":backoff", key + ":failures", key + ":blocked"],
                args=[value, ttl_ms, read_version, repr(fetched_at), repr(expires_at), field],
            )
        )
        if result <= 0:
            return None
        return Entry(value, expires_at, fetched_at, result, field)

    async def restore(self, name: str, entry: Entry) -> bool:
        """Put back a still-valid value that Redis lacks or holds an older version of.

        False when Redis's is as new or newer (see _RESTORE_LUA for "newer").
        """
        ttl_ms = int(entry.remaining() * 1000)
        if ttl_ms <= 0:
            return False
        key = self.key(name)
        return bool(
            await self._restore(
                keys=[key, key + ":meta", key + ":backoff", key + ":failures", key + ":blocked"],
                args=[entry.value, ttl_ms, entry.version, repr(entry.fetched_at), repr(entry.expires_at), entry.field],
            )
        )

    async def cap_life(self, name: str, value: str, life: float) -> bool:
        """Make ``value``, if still stored, expire within ``life`` seconds; True if shortened."""
        key = self.key(name)
        ms = max(1, int(life * 1000))
        return bool(await self._cap(keys=[key, key + ":meta"], args=[value, ms, repr(time.time() + life)]))

    async def mark_same(self, name: str, value: str, until: float) -> bool:
        """Note that upstream confirmed the stored ``value``: no ordinary refresh before ``until``."""
        key = self.key(name)
        return bool(await self._same(keys=[key, key + ":meta", key + ":backoff", key + ":failures"], args=[value, repr(until)]))

    async def clear_blocked(self, name: str) -> bool:
        """Lift the block every instance follows (a restart: the operator says try again)."""
        return bool(await self.redis.delete(self.key(name) + ":blocked"))

    async def set_blocked(self, name: str, block: Block, ttl: float | None) -> None:
        """Tell every instance to make no call for ``name`` (a fatal error, or the daily
        quota), for ``ttl`` seconds or until a value is stored (None)."""
        data = json.dumps({"kind": block.kind, "errcode": block.errcode, "errmsg": block.errmsg[:300]})
        await self.redis.set(self.key(name) + ":blocked", data, px=None if ttl is None else max(1, int(ttl * 1000)))

    async def set_backoff(self, name: str, delay: float, failures: int) -> None:
        """Tell every instance not to retry ``name`` for ``delay`` seconds (forced refreshes
        still may), after ``failures`` consecutive failed fetches."""
        key = self.key(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key + ":backoff", "1", px=max(1, int(delay * 1000)))
            # The count outlives the backoff (the next failure grows from it) and ends with
            # the next stored value (_WRITE_LUA) or after an hour of silence.
            pipe.set(key + ":failures", str(failures), ex=3600)
            await pipe.execute()

    async def acquire(self, name: str, lease: float) -> str | None:
        """Take the refresh lock of ``name`` for ``lease`` seconds; the token to release it, or None."""
        token = secrets.token_hex(16)
        ok = await self.redis.set(self.key(name) + ":lock", token, nx=True, px=max(1, int(lease * 1000)))
        return token if ok else None

    async def release(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it (compare-and-delete)."""
        return bool(await self._release(keys=[self.key(name) + ":lock"], args=[token]))

    async def extend(self, name: str, token: str, lease: float) -> bool:
        """Renew the lock for ``lease`` seconds if ``token`` still holds it."""
        return bool(await self._extend(keys=[self.key(name) + ":lock"], args=[token, max(1, int(lease * 1000))]))

    async def locked(self, name: str) -> bool:
        return bool(await self.redis.exists(self.key(name) + ":lock"))
