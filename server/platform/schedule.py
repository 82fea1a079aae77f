"""The schedule of one platform's authorizers: a sorted set by due time in Redis, worked by
every instance in bounded batches.

- A member (``A`` for a token, ``A#jsapi`` for a ticket, see :mod:`server.platform.keys`) is
  due at a moment in milliseconds on Redis's clock.  When a value is stored, its member is
  rescheduled for its own expiry minus ``refresh.ahead`` minus jitter, so refreshes spread out
  as the tokens did, and a failure reschedules it after a backoff with jitter: no herd.
- :meth:`Schedule.claim` takes at most ``n`` due members in one script: each is pushed to
  the end of its lease (so no other instance takes it meanwhile) and noted in the claims hash
  with that lease end.  An instance that dies leaves its claims to expire: the member is due
  again when the lease ends, and any instance takes it.
- :meth:`Schedule.finish` reschedules a member only if the claim is still ours (the lease did
  not run out and someone else take it), never re-adds a member removed meanwhile, and keeps
  a due time set meanwhile (a re-authorisation scheduled its new token).
- Per tick, an instance reads at most ``n`` members: the work never grows with the number of
  authorizers that are not due.

The claim's moment (microseconds on Redis's clock) is the version the refresh stores its
token with (fencing, :mod:`server.platform.authorizers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from server.platform import keys

# KEYS[1] due zset, KEYS[2] claims hash; ARGV[1] how many at most, ARGV[2] lease in ms.
# Returns {now in microseconds, lease end in ms, member...}.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now_ms + tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])), string.format('%.0f', until_ms)}
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, m)
  redis.call('HSET', KEYS[2], m, string.format('%.0f', until_ms))
  out[#out + 1] = m
end
return out
"""

# KEYS[1] due zset, KEYS[2] claims hash; ARGV[1] member, ARGV[2] lease in ms, ARGV[3] "1" = add the
# member if the schedule lacks it (a ticket asked for the first time), ARGV[4] "1" = only if it is
# due (a member rescheduled after a failure keeps its backoff).  Claims one member now, due or
# not (ARGV[4] "0"), unless another claim on it is running.  Returns {now in µs, lease end in ms} or false.
_CLAIM_ONE_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score and ARGV[3] ~= '1' then
  return false
end
if score and ARGV[4] == '1' and tonumber(score) > now_ms then
  return false
end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') or 0
if held > now_ms then
  return false
end
local until_ms = now_ms + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], string.format('%.0f', until_ms))
return {string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])), string.format('%.0f', until_ms)}
"""

# KEYS[1] due zset, KEYS[2] claims hash; ARGV[1] member, ARGV[2] our lease end (ms), ARGV[3] next
# due in ms from now, or "-1" to take the member off the schedule.  Only while the claim is ours,
# and only if nobody rescheduled the member meanwhile (its score is still our lease end): an
# authorisation during the refresh scheduled the new token, which our outcome knows nothing of.
# Returns 1, or 0 when the claim was no longer ours (or the member was rescheduled meanwhile).
_FINISH_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == '-1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS[1] due zset; ARGV[1] member, ARGV[2] due in ms from now.  Adds or moves a member.
_ADD_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """A member this instance may refresh until ``until_ms`` (Redis's clock); ``version`` fences its write."""

    member: str
    version: int
    until_ms: str


class Schedule:
    """One platform's schedule (see the module docstring); methods may raise redis.RedisError."""

    def __init__(self, redis: aioredis.Redis, prefix: str, platform: str) -> None:
        self.redis = redis
        self.due_key, self.claims_key = keys.schedule(prefix, platform)
        self.blocked_key = keys.blocked(prefix, platform)
        self._claim = redis.register_script(_CLAIM_LUA)
        self._claim_one = redis.register_script(_CLAIM_ONE_LUA)
        self._finish = redis.register_script(_FINISH_LUA)
        self._add = redis.register_script(_ADD_LUA)

    async def claim(self, n: int, lease: float) -> list[Claim]:
        """At most ``n`` due members, each ours for ``lease`` seconds."""
        raw = await self._claim(keys=[self.due_key, self.claims_key], args=[n, int(lease * 1000)])
        version, until = int(raw[0]), str(raw[1])
        return [Claim(str(m), version, until) for m in raw[2:]]

    async def claim_one(self, member: str, lease: float, create: bool = False, due_only: bool = False) -> Claim | None:
        """``member``, ours for ``lease`` seconds, due or not (``due_only``: only if due, so a
        backoff holds); ``create`` adds it when the schedule lacks it.  None when another
        claim runs, or it is not scheduled (not due)."""
        raw = await self._claim_one(keys=[self.due_key, self.claims_key],
                                    args=[member, int(lease * 1000), "1" if create else "0", "1" if due_only else "0"])
        return Claim(member, int(raw[0]), str(raw[1])) if raw else None

    async def finish(self, claim: Claim, due_in: float | None) -> bool:
        """Reschedule ``claim``'s member ``due_in`` seconds from now (None: off the schedule)."""
        delay = "-1" if due_in is None else str(max(0, int(due_in * 1000)))
        return bool(await self._finish(keys=[self.due_key, self.claims_key], args=[claim.member, claim.until_ms, delay]))

    async def add(self, member: str, due_in: float) -> None:
        await self._add(keys=[self.due_key], args=[member, max(0, int(due_in * 1000))])

    async def remove(self, *members: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.due_key, *members)
            pipe.hdel(self.claims_key, *members)
            await pipe.execute()

    async def note_blocked(self, appid: str, blocked: bool) -> None:
        """Keep the set of blocked authorizers (the status's list; the state itself is the authorizer's)."""
        if blocked:
            await self.redis.sadd(self.blocked_key, appid)
        else:
            await self.redis.srem(self.blocked_key, appid)

    async def blocked(self, count: int) -> list[str]:
        """Up to about ``count`` blocked authorizers (one SSCAN step, not the whole set)."""
        _, found = await self.redis.sscan(self.blocked_key, 0, count=count)
        return sorted(str(m) for m in found)[:count]

    async def counts(self) -> dict[str, int]:
        """``scheduled`` members, ``due`` now (a backlog), ``claimed`` (refreshes under way),
        ``blocked`` authorizers."""
        clock = await self.redis.time()
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.due_key)
            pipe.zcount(self.due_key, "-inf", now_ms)
            pipe.hlen(self.claims_key)
            pipe.scard(self.blocked_key)
            scheduled, due, claimed, blocked = await pipe.execute()
        return {"scheduled": int(scheduled), "due": int(due), "claimed": int(claimed), "blocked": int(blocked)}

    async def page(self, offset: int, count: int) -> list[tuple[str, float]]:
        """Members by due time (ms on Redis's clock), for the status page: ``count`` from ``offset``."""
        raw = await self.redis.zrange(self.due_key, offset, offset + count - 1, withscores=True)
        return [(str(pair[0]), float(pair[1])) for pair in raw]
