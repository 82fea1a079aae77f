"""Redis: the plain value keys direct readers use, plus metadata, locks and fencing.

Layout for a source ``NAME`` under the configured ``prefix`` (source names cannot contain
``:``, so these never collide).  The names below are a plain Redis's (or Sentinel's); on a
Redis Cluster the auxiliary keys carry a hash tag, see *Redis Cluster* below.  Every name
comes from :class:`Keys`, the one place that spells them:

``<prefix>NAME``
    The bare value (``redis-cli GET access_token``) with a TTL equal to its remaining
    life, so a direct reader never sees an expired value.
``<prefix>NAME:meta``
    A hash: ``version`` (the value's place in the order of values, see below),
    ``fetched_at`` and ``expires_at`` (seconds on Redis's clock), ``field``
    (``access_token`` or ``ticket``: the name our API answers with), ``same_until``
    (upstream confirmed this value: no ordinary refresh before then, Redis's clock) and
    ``claimed`` (the highest version handed to a fetch).  No TTL: the version must
    outlive the value so fencing still works after expiry.
``<prefix>NAME:lock``
    ``SET NX PX`` lock a process holds while it fetches NAME; its value is
    ``INSTANCE/RANDOM``: the random part makes sure only the holder deletes it, the instance
    (host:pid) tells the operator who is fetching.
``<prefix>NAME:blocked``
    JSON ``{"kind": "fatal"|"quota", "errcode", "errmsg"}`` while no instance may call
    upstream for NAME (a fatal error until a value is stored, 45009 until midnight China
    time); an operator's forced refresh or a restart tries again.
``<prefix>NAME:backoff``, ``<prefix>NAME:failures`` and ``<prefix>NAME:lost``
    Present (with a TTL) while no instance should retry NAME after a failed fetch, the
    count of consecutive failures, and of consecutive lost answers (a call that got no
    answer may have issued a token nobody received); the counts are deleted by the next
    stored value.  Several instances back off together, the delay growing with the
    failures of all of them, and wait longer for an answer after answers were lost.
``<prefix>NAME:rejected``
    The SHA-256 of a value WeChat rejected right after it was fetched in answer to a
    rejected one (the API proxy's retry failed again), while that value lives: no proxied
    call rotates it again, in any instance.
``<prefix>NAME:slow``
    How many times ``refresh.timeout`` was doubled for the last call that got its answer
    (kept an hour): while WeChat stays slow, the next rotation waits as long at once
    instead of losing answers again.

**The order of values survives the loss of Redis's data.**  A version is a hybrid clock
in microseconds: when a process takes the lock to fetch, it gets
``max(Redis TIME, stored version + 1, claimed + 1, the highest version it knows + 1)``.
Within one Redis dataset versions only grow; after Redis restarts empty, rolls back to an
old dump or fails over to a lagging replica, a new fetch still gets a version above every
value fetched before it (by Redis's clock, and above whatever the fetching instance
holds), so the value WeChat issued last always has the highest version.  What it cannot
order: two values fetched while Redis was unreachable (each carries its host's clock), or
a failover to a host whose clock is behind by more than the time between two fetches.

Fencing: a write succeeds only if its version is above the stored one (one Lua script),
so a slow fetch whose lock expired never overwrites a value fetched after it, while a
fetch that was in the air when Redis lost or rolled back its data still lands.

**Redis Cluster** (``redis.cluster: true``): a Lua script or a MULTI may only touch keys of
one hash slot, so every key of a source lives in the slot of its plain value key.  The plain
key keeps its exact name (``redis-cli -c GET access_token`` still works); each auxiliary key
is named ``{<prefix>NAME}:PART`` (``{access_token}:meta``, ``{access_token}:lock``, ...): the
hash tag is the whole plain key, so CRC16 puts it in the plain key's slot.  A prefix that
already holds a hash tag (``{wechat}:``) keeps the plain layout: every key then shares that
tag (and so do all sources: one slot, one node); server.config refuses any other brace in a
cluster's prefix.  The rate limits' keys
(:mod:`server.ratelimit`) need no tag: each of their commands touches one key.

Tags are given on a cluster only: outside one the layout stays as operators, scripts and
docs know it (``access_token:meta``), and no existing deployment has to migrate for a change
it does not need.  A cluster that holds a plain layout (copied from a single Redis by a
migration tool, which keeps the keys' names) is adopted on the first read of each source by
each process: when ``{NAME}:meta`` has no version yet, ``NAME:meta`` (and a ``NAME:blocked``)
is copied into the tagged keys, so the version order and the values' times carry on and no
upstream call is made (:meth:`Store.read`).  The old keys are left in place (delete them
once every instance runs in cluster mode).  The events the scripts PUBLISH are broadcast by
the cluster to every node: a subscriber on any node gets them (server.redis_client's :class:`ClusterClient`
pubsub follows a failover).

Clocks: moments other hosts compare (``fetched_at``, ``expires_at``, ``same_until``) are
on Redis's clock (``TIME``, read inside the scripts); this module turns them into this
process's ``time.monotonic()`` on read, and takes durations (never wall-clock moments)
on write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

logger = logging.getLogger(__name__)


# Lua numbers are doubles: microseconds since 1970 (about 1.8e15) are exact below 2^53, but
# Redis turns a Lua number into a string with "%.17g", so every version written or
# returned goes through string.format('%.0f') (and comes back to Python as a string).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS[1] lock key, KEYS[2] meta key
# ARGV[1] the holder's random token, ARGV[2] lease in ms, ARGV[3] highest version the caller knows
# Takes the lock and hands out the version of the value this fetch will store (see the
# module docstring); returns it as a string, or false when the lock is taken.
_ACQUIRE_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
local t = redis.call('TIME')
local v = tonumber(t[1]) * 1000000 + tonumber(t[2])
v = math.max(v, (tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0) + 1)
v = math.max(v, (tonumber(redis.call('HGET', KEYS[2], 'claimed') or '0') or 0) + 1)
v = math.max(v, (tonumber(ARGV[3]) or 0) + 1)
local s = string.format('%.0f', v)
redis.call('HSET', KEYS[2], 'claimed', s)
return s
"""

# KEYS[1] value, KEYS[2] meta, KEYS[3] backoff, KEYS[4] failures, KEYS[5] blocked, KEYS[6] lost
# ARGV[1] value, ARGV[2] TTL in ms, ARGV[3] its version, ARGV[4] seconds since it was fetched,
# ARGV[5] field, ARGV[6] 1 = put back, ARGV[7] events channel, ARGV[8] the event's JSON
# without its closing brace (see _event_head), ARGV[9] the same for an "unblocked" event
# Stores the value if its version is above the stored one (fencing), or equal to it with no
# value stored: a put-back of a value whose key alone was lost, or the fetch that follows a
# drop (which raised the version by one, to at most the lease of the fetch under way; lease
# versions are unique, so no other value can have it).  A fetched value, and a put-back
# newer one, end any backoff or block the instances were following.  A new version (not a
# put-back of the same one) is published as a "rotated" event, in the same script so that
# exactly one message goes out per stored value whichever instance stored it.  Returns 1,
# or 0 when fenced out.
_WRITE_LUA = _NOW + """
local current = tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0
local v = tonumber(ARGV[3])
if v < current or (v == current and redis.call('EXISTS', KEYS[1]) == 1) then
  return 0
end
local fetched = now - tonumber(ARGV[4])
local expires = now + tonumber(ARGV[2]) / 1000
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'version', ARGV[3], 'fetched_at', string.format('%.6f', fetched),
           'expires_at', string.format('%.6f', expires), 'field', ARGV[5], 'same_until', 0)
if v > current or ARGV[6] ~= '1' then
  local was_blocked = redis.call('EXISTS', KEYS[5]) == 1
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  if was_blocked then
    redis.call('PUBLISH', ARGV[7], ARGV[9] .. ', "version": ' .. ARGV[3] .. ', "expires_at": ' .. string.format('%.3f', expires) .. '}')
  end
end
if v > current then
  redis.call('PUBLISH', ARGV[7], ARGV[8] .. ', "version": ' .. ARGV[3] .. ', "expires_at": ' .. string.format('%.3f', expires) .. '}')
end
return 1
"""

# Upstream answered with the value already stored (stable_token in normal mode): note
# until when no ordinary refresh should ask again, without a new version.  An answer is a
# success: it ends the backoff the instances follow.
# KEYS[1] value key, KEYS[2] meta key, KEYS[3] backoff key, KEYS[4] failures key, KEYS[5] lost key
# ARGV[1] value, ARGV[2] seconds from now
_SAME_LUA = _NOW + """
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'same_until', string.format('%.6f', now + tonumber(ARGV[2])))
  return 1
end
return 0
"""

# Shorten a value's life, if it is still the stored one and lives longer than that.
# KEYS[1] value key, KEYS[2] meta key; ARGV[1] value, ARGV[2] life in ms
_CAP_LUA = _NOW + """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- same_until no longer holds: the shortened value must be refreshed in time
  redis.call('HSET', KEYS[2], 'expires_at', string.format('%.6f', now + tonumber(ARGV[2]) / 1000), 'same_until', 0)
  return 1
end
return 0
"""

# KEYS[1] value key, KEYS[2] meta key; ARGV[1] value, ARGV[2] events channel, ARGV[3] a
# "dropped" event's JSON without its closing brace.  Deletes the value if it is still
# the stored one (WeChat rejected it) and raises the version by one, so no instance puts its
# copy back and every instance stops serving it; every lease handed out since that value
# was stored is at least that high, so the fetch under way still lands.
_DROP_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local v = (tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0) + 1
local s = string.format('%.0f', v)
redis.call('HSET', KEYS[2], 'version', s)
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ', "version": ' .. s .. ', "expires_at": null}')
return 1
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

# Cluster: a snapshot in one round trip, atomic, with the clock of the node holding the keys
# (a cluster's MULTI cannot carry TIME, and another node's clock is another host's); a single
# Redis reads the same with a MULTI (Store.read).  Read-only.
# KEYS[1] value, KEYS[2] meta, KEYS[3] failures, KEYS[4] backoff, KEYS[5] blocked, KEYS[6] lost,
# KEYS[7] slow.  Returns {seconds, microseconds, value, value PTTL ms, {version, fetched_at,
# field, same_until}, failures, backoff PTTL ms, blocked, blocked PTTL ms, lost, slow}; a
# missing key or field is nil (false in Lua, so the table keeps its length).
_READ_LUA = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]),
        redis.call('HMGET', KEYS[2], 'version', 'fetched_at', 'field', 'same_until'),
        redis.call('GET', KEYS[3]), redis.call('PTTL', KEYS[4]), redis.call('GET', KEYS[5]),
        redis.call('PTTL', KEYS[5]), redis.call('GET', KEYS[6]), redis.call('GET', KEYS[7])}
"""

# KEYS[1] backoff, KEYS[2] failures, KEYS[3] lost; ARGV[1] backoff in ms, ARGV[2] failures,
# ARGV[3] "1": this failure lost its answer.  The counts outlive the backoff (the next failure
# grows from them) and end with the next stored value (_WRITE_LUA) or after an hour of silence.
_BACKOFF_LUA = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', 3600)
if ARGV[3] == '1' then
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 3600)
end
return 1
"""

# Cluster only: adopt a plain layout's metadata (see the module docstring), unless the tagged
# meta already has a version (another process adopted it, or a value was stored since).
# KEYS[1] tagged meta, KEYS[2] tagged blocked; ARGV[1] blocked marker ('' for none), ARGV[2]
# its PTTL in ms (-1: none), ARGV[3..] the plain meta's field, value pairs.  Returns 1 if copied.
_ADOPT_LUA = """
if redis.call('HEXISTS', KEYS[1], 'version') == 1 then
  return 0
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
end
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[2]) == 0 then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  else
    redis.call('SET', KEYS[2], ARGV[1])
  end
end
return 1
"""


@dataclass(frozen=True)
class Entry:
    """A credential value and what we know about it.

    ``expires_at``, ``fetched_at`` and ``same_until`` are this process's
    ``time.monotonic()`` seconds (converted from Redis's clock on read); ``version`` is the
    value's place in the order of values (see the module docstring).
    """

    value: str
    expires_at: float
    fetched_at: float
    version: int
    field: str
    same_until: float = 0.0  # upstream confirmed this value: no ordinary refresh before this (0: none)

    def remaining(self) -> float:
        """Seconds of life left (negative once expired)."""
        return self.expires_at - time.monotonic()

    def age(self) -> float:
        """Seconds since the value was fetched."""
        return time.monotonic() - self.fetched_at

    def __repr__(self) -> str:
        return f"Entry({self.value[:6]}..., v{self.version}, {self.remaining():.0f}s left)"


@dataclass(frozen=True)
class Block:
    """Why a source makes no upstream call: ``kind`` "fatal" or "quota", WeChat's errcode and errmsg."""

    kind: str
    errcode: int
    errmsg: str


@dataclass(frozen=True)
class Lease:
    """The refresh lock: ``token`` releases it; ``version`` is the one the fetch stores its value with."""

    token: str
    version: int


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


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
    """What Redis holds for a source: the live entry (None when absent), the version, the
    seconds left of a backoff another instance announced (0: none) and what it follows."""

    entry: Entry | None
    version: int
    backoff: float = 0.0
    failures: int = 0  # consecutive failures the announced backoff follows
    blocked: Block | None = None  # set by the instance that got a fatal error or 45009
    blocked_for: float = float("inf")  # seconds until the block ends by itself
    lost: int = 0  # consecutive calls whose answer was lost
    slow: int = 0  # times refresh.timeout was doubled for the last answered call


def _hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it is not the whole key: the text between
    the first ``{`` and the first ``}`` after it, if not empty (None otherwise)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1:end] if end > start + 1 else None


@dataclass(frozen=True)
class Keys:
    """The names of a source's keys (see the module docstring): the one place that spells them.

    ``cluster``: name auxiliary keys ``{<prefix>NAME}:PART`` so they share the slot of the
    plain key ``<prefix>NAME`` (see *Redis Cluster* in the module docstring).
    """

    prefix: str = ""
    cluster: bool = False

    @classmethod
    def of(cls, redis: Any, prefix: str) -> Keys:
        """The layout for keys stored through ``redis``: tagged on a cluster client."""
        return cls(prefix, isinstance(redis, RedisCluster))

    def value(self, name: str) -> str:
        """The plain value key, ``<prefix>NAME``, in every layout."""
        return self.prefix + name

    def aux(self, name: str, part: str) -> str:
        """The auxiliary key ``part`` (``meta``, ``lock``, ``calls:20240501`` ...) of source ``name``."""
        plain = self.value(name)
        if not self.cluster or _hash_tag(plain) is not None:
            # A plain key that has a tag of its own (a "{app}:" prefix) lends it to "plain:PART".
            return f"{plain}:{part}"
        return f"{{{plain}}}:{part}"

    def plain_aux(self, name: str, part: str) -> str:
        """The name ``part`` has outside a cluster (the layout :meth:`Store.read` adopts)."""
        return f"{self.value(name)}:{part}"


def events_channel(prefix: str) -> str:
    """The Redis channel on which every stored change is published (see server.ops.events)."""
    return prefix + "wechat-token:events"


class Store:
    """All Redis access.  Every method may raise redis.RedisError; callers decide the fallback."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "", instance: str = "", owners: Mapping[str, str] | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys.of(redis, prefix)
        self.instance = instance  # shown as the lock holder (host:pid), never a secret
        #: source -> the account it belongs to, named in events (a live reload replaces it)
        self.owners: Mapping[str, str] = owners or {}
        #: the Redis channel every stored change is announced on (see events_channel)
        self.channel = events_channel(prefix)
        self._adopted: set[str] = set()  # cluster: sources whose plain layout was looked for
        self._read = redis.register_script(_READ_LUA)
        self._backoff = redis.register_script(_BACKOFF_LUA)
        self._adopt = redis.register_script(_ADOPT_LUA)
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._write = redis.register_script(_WRITE_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._cap = redis.register_script(_CAP_LUA)
        self._drop = redis.register_script(_DROP_LUA)
        self._extend = redis.register_script(_EXTEND_LUA)
        self._same = redis.register_script(_SAME_LUA)

    def __repr__(self) -> str:
        # The client's repr would show its connection kwargs; say only the prefix.
        return f"Store(prefix={self.prefix!r})"

    def key(self, name: str) -> str:
        """The plain value key of ``name`` (``<prefix>NAME``)."""
        return self.keys.value(name)

    def aux(self, name: str, part: str) -> str:
        """The auxiliary key ``part`` of ``name`` (``meta``, ``lock`` ...; see :class:`Keys`)."""
        return self.keys.aux(name, part)

    def _write_keys(self, name: str) -> list[str]:
        return [self.key(name), *(self.aux(name, part) for part in ("meta", "backoff", "failures", "blocked", "lost"))]

    def _pipeline(self) -> Any:
        """A pipeline of commands on one source's keys (one slot): a MULTI on a single Redis; on
        a cluster a plain pipeline, one round trip to the slot's node (redis-py 8.1 runs each
        command queued in a cluster MULTI through a thread and an event loop of its own)."""
        return self.redis.pipeline(transaction=not self.keys.cluster)

    def _event_head(self, event: str, name: str) -> str:
        """An event's JSON without its closing brace: the scripts add ``version`` and
        ``expires_at``, which only they know.  ``id`` is unique per message (receivers and
        webhook deliveries de-duplicate on it); the value itself is never in an event."""
        head = json.dumps({"event": event, "source": name, "account": self.owners.get(name), "id": secrets.token_hex(12)})
        return head[:-1]

    async def _announce(self, event: str, name: str, version: str | None) -> None:
        """Publish an event about a change with no new value (``expires_at`` null)."""
        await self.redis.publish(self.channel, self._event_head(event, name) + f', "version": {int(_number(version))}, "expires_at": null}}')

    async def close(self) -> None:
        # The pool was built by us (build_redis) and passed in: close its connections too.
        await self.redis.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def time(self) -> float:
        """Redis's clock, in unix seconds: the one clock every instance shares."""
        seconds, micros = await self.redis.time()
        return float(seconds) + micros / 1e6

    async def read(self, name: str) -> Snapshot:
        """The value, its remaining life and its metadata in one round trip (atomic, and on the
        clock of the node that holds them).

        On a cluster, the first read of ``name`` in this process that finds no version adopts a
        plain layout's metadata, if any (see the module docstring): one more round trip, once.
        """
        if self.keys.cluster:
            # One script: a cluster's MULTI cannot carry TIME, which another node would answer.
            raw = await self._read(keys=[self.key(name), *(self.aux(name, p) for p in ("meta", "failures", "backoff", "blocked", "lost", "slow"))])
            if raw[4][0] is None and name not in self._adopted and await self._adopt_plain_layout(name):
                return await self.read(name)
        else:
            key = self.key(name)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.get(key)
                pipe.pttl(key)
                pipe.hmget(key + ":meta", "version", "fetched_at", "field", "same_until")
                pipe.get(key + ":failures")
                pipe.pttl(key + ":backoff")
                pipe.get(key + ":blocked")
                pipe.pttl(key + ":blocked")
                pipe.get(key + ":lost")
                pipe.get(key + ":slow")
                (clock, *rest) = await pipe.execute()
            raw = [*clock, *rest]
        seconds, micros, value, pttl, (version, fetched_at, field, same_until), failures, backoff_ms, blocked, blocked_ms, lost, slow = raw
        mono = time.monotonic()
        now = float(seconds) + float(micros) / 1e6
        # Metadata someone garbled must not turn every read into an error.
        v = int(_number(version))
        block = _blocked(blocked)
        extra = dict(
            backoff=max(0, backoff_ms or 0) / 1000.0,
            failures=int(_number(failures)),
            blocked=block,
            blocked_for=blocked_ms / 1000.0 if block is not None and blocked_ms and blocked_ms > 0 else float("inf"),
            lost=int(_number(lost)),
            slow=int(_number(slow)),
        )
        if value is None or pttl is None or pttl <= 0:
            return Snapshot(None, v, **extra)  # type: ignore[arg-type]
        fetched = _number(fetched_at)
        until = _number(same_until)
        entry = Entry(
            value,
            mono + pttl / 1000.0,
            mono - (now - fetched) if fetched else mono,
            v,
            field or "access_token",
            mono + (until - now) if until else 0.0,
        )
        return Snapshot(entry, v, **extra)  # type: ignore[arg-type]

    async def _adopt_plain_layout(self, name: str) -> bool:
        """Cluster: copy the plain layout's ``NAME:meta`` and ``NAME:blocked`` into the tagged
        keys, unless they hold a version by now; True if something was copied.  Looked for
        once per source and process (the keys of the plain layout live in other slots: no
        script can read them with the tagged ones)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.plain_aux(name, "meta"))
            pipe.get(self.keys.plain_aux(name, "blocked"))
            pipe.pttl(self.keys.plain_aux(name, "blocked"))
            meta, blocked, blocked_ms = await pipe.execute()
        self._adopted.add(name)
        if not meta or "version" not in meta:
            return False
        pairs = [item for field_value in meta.items() for item in field_value]
        copied = bool(await self._adopt(keys=[self.aux(name, "meta"), self.aux(name, "blocked")], args=[blocked or "", blocked_ms or -1, *pairs]))
        if copied:
            logger.warning("source %s: adopted the plain layout's metadata (version %s) into the cluster's tagged keys", name, meta.get("version"))
        return copied

    async def write(self, name: str, entry: Entry, *, restore: bool = False) -> bool:
        """Store ``entry`` (its version from :meth:`acquire`) if its version is above the
        stored one; False when fenced out (a value fetched after it is stored).

        ``restore``: put back a value held in memory that Redis lacks or holds an older
        version of (Redis restarted empty, came back with old data, failed over to a
        lagging replica); the same version is put back when only its value key is gone.
        """
        ttl_ms = int(entry.remaining() * 1000)
        if ttl_ms <= 0:
            return False
        return bool(
            await self._write(
                keys=self._write_keys(name),
                args=[
                    entry.value, ttl_ms, str(entry.version), repr(max(0.0, entry.age())), entry.field, "1" if restore else "0",
                    self.channel, self._event_head("rotated", name), self._event_head("unblocked", name),
                ],
            )
        )

    async def cap_life(self, name: str, value: str, life: float) -> bool:
        """Make ``value``, if still stored, expire within ``life`` seconds; True if shortened."""
        return bool(await self._cap(keys=[self.key(name), self.aux(name, "meta")], args=[value, max(1, int(life * 1000))]))

    async def drop(self, name: str, value: str) -> bool:
        """Delete ``value`` if it is still stored (WeChat rejected it); True if deleted."""
        return bool(await self._drop(keys=[self.key(name), self.aux(name, "meta")], args=[value, self.channel, self._event_head("dropped", name)]))

    async def mark_same(self, name: str, value: str, for_seconds: float) -> bool:
        """Note that upstream confirmed the stored ``value``: no ordinary refresh for ``for_seconds``."""
        keys = [self.key(name), *(self.aux(name, part) for part in ("meta", "backoff", "failures", "lost"))]
        return bool(await self._same(keys=keys, args=[value, repr(for_seconds)]))

    async def clear_blocked(self, name: str) -> bool:
        """Lift the block every instance follows (a restart: the operator says try again);
        True (and an "unblocked" event) if there was one."""
        async with self._pipeline() as pipe:
            pipe.delete(self.aux(name, "blocked"))
            pipe.hget(self.aux(name, "meta"), "version")
            deleted, version = await pipe.execute()
        if deleted:
            await self._announce("unblocked", name, version)
        return bool(deleted)

    async def set_blocked(self, name: str, block: Block, ttl: float | None) -> None:
        """Tell every instance to make no call for ``name`` (a fatal error, or the daily
        quota), for ``ttl`` seconds or until a value is stored (None)."""
        data = json.dumps({"kind": block.kind, "errcode": block.errcode, "errmsg": block.errmsg[:300]})
        async with self._pipeline() as pipe:
            pipe.set(self.aux(name, "blocked"), data, px=None if ttl is None else max(1, int(ttl * 1000)), get=True)
            pipe.hget(self.aux(name, "meta"), "version")
            before, version = await pipe.execute()
        if before is None:  # a new block, not the same one said again
            await self._announce("blocked", name, version)

    async def set_backoff(self, name: str, delay: float, failures: int, lost: bool = False) -> None:
        """Tell every instance not to retry ``name`` for ``delay`` seconds (forced refreshes
        still may), after ``failures`` consecutive failed fetches; ``lost``: this one's
        answer was lost (the next call waits longer for its answer)."""
        await self._backoff(
            keys=[self.aux(name, "backoff"), self.aux(name, "failures"), self.aux(name, "lost")],
            args=[max(1, int(delay * 1000)), str(failures), "1" if lost else "0"],
        )

    async def mark_rejected(self, name: str, value: str, seconds: float) -> None:
        """Note for ``seconds`` that WeChat rejected ``value`` right after it was fetched in
        answer to a rejected one (``NAME:rejected`` holds its SHA-256, never the value)."""
        await self.redis.set(self.aux(name, "rejected"), _fingerprint(value), px=max(1, int(seconds * 1000)))

    async def was_rejected(self, name: str, value: str) -> bool:
        """Whether :meth:`mark_rejected` noted ``value`` (and the note has not expired)."""
        return await self.redis.get(self.aux(name, "rejected")) == _fingerprint(value)

    async def set_slow(self, name: str, doublings: int) -> None:
        """Remember (an hour) how many times ``refresh.timeout`` was doubled for the last
        call that got its answer; 0 forgets it."""
        key = self.aux(name, "slow")
        if doublings > 0:
            await self.redis.set(key, str(doublings), ex=3600)
        else:
            await self.redis.delete(key)

    async def acquire(self, name: str, lease: float, known: int = 0) -> Lease | None:
        """Take the refresh lock of ``name`` for ``lease`` seconds; None when another holds it.

        ``known`` is the highest version this process holds: the lease's version is above it.
        """
        token = f"{self.instance}/{secrets.token_hex(16)}"
        version = await self._acquire(
            keys=[self.aux(name, "lock"), self.aux(name, "meta")], args=[token, max(1, int(lease * 1000)), str(known)]
        )
        return Lease(token, int(version)) if version else None

    async def release(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it (compare-and-delete)."""
        return bool(await self._release(keys=[self.aux(name, "lock")], args=[token]))

    async def extend(self, name: str, token: str, lease: float) -> bool:
        """Renew the lock for ``lease`` seconds if ``token`` still holds it."""
        return bool(await self._extend(keys=[self.aux(name, "lock")], args=[token, max(1, int(lease * 1000))]))

    async def locked(self, name: str) -> bool:
        return bool(await self.redis.exists(self.aux(name, "lock")))

    async def lock_holders(self, names: list[str]) -> dict[str, str | None]:
        """Per source, the instance holding its refresh lock now (None: nobody), one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.aux(name, "lock"))
            raw = await pipe.execute()
        return {name: (value.rsplit("/", 1)[0] or "an instance") if value else None for name, value in zip(names, raw, strict=True)}

    async def versions(self, names: list[str]) -> dict[str, tuple[int, float] | None]:
        """Per source, the version and remaining life (seconds) of the value Redis holds, None
        when it holds none (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.pttl(self.key(name))
                pipe.hget(self.aux(name, "meta"), "version")
            raw = await pipe.execute()
        return {
            name: (int(_number(raw[2 * i + 1])), raw[2 * i] / 1000.0) if raw[2 * i] is not None and raw[2 * i] > 0 else None
            for i, name in enumerate(names)
        }
