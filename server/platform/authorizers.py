"""One platform's authorizers in Redis: each one's token (plain key), refresh token, state and
JS-SDK ticket (key layout: :mod:`server.platform.keys`).

Fencing, as for sources (:mod:`server.store`): a token is written only with a version above
the stored one (microseconds on Redis's clock, handed out when the refresh was claimed), so a
refresh whose claim ran out and was taken over never overwrites the newer token.  The refresh
token WeChat returns is written by the same script, so the token and the refresh token that
goes with it are replaced together or not at all.

The refresh token lives in Redis only (no TTL): it is the one way back to the account.  Run
Redis with an append-only file; a Redis that loses its data loses the authorisations (the
merchants must authorise again), which no instance can repair.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from server.platform import keys

logger = logging.getLogger(__name__)

# KEYS[1] plain token key, KEYS[2] meta hash
# ARGV[1] token, ARGV[2] TTL in ms, ARGV[3] version, ARGV[4] refresh token ("" = keep the stored one),
# ARGV[5] "1" for an authorisation (brings a blocked or unauthorised authorizer back), "0" for a refresh,
# ARGV[6] the events channel, ARGV[7] the "rotated" event's JSON without its closing brace (keys.event_head)
# Stores the token if its version is above the stored one and, for a refresh, if the authorizer
# is still in state ok (an unauthorised one never comes back through a refresh in the air).
# Returns 1 when stored, 0 when fenced out.
_SAVE_LUA = """
local current = tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0
if tonumber(ARGV[3]) <= current then
  return 0
end
local state = redis.call('HGET', KEYS[2], 'state')
if ARGV[5] ~= '1' and state and state ~= 'ok' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'version', ARGV[3], 'expires_at', string.format('%.3f', now + tonumber(ARGV[2]) / 1000),
           'state', 'ok', 'errcode', '0', 'errmsg', '', 'failures', '0')
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], 'refresh_token', ARGV[4])
end
redis.call('PUBLISH', ARGV[6], ARGV[7] .. ', "version": ' .. ARGV[3] .. ', "expires_at": ' .. string.format('%.3f', now + tonumber(ARGV[2]) / 1000) .. '}')
return 1
"""

# KEYS[1] plain token key, KEYS[2] meta hash; ARGV[1] the refresh token the failed call used,
# ARGV[2] errcode, ARGV[3] errmsg, ARGV[4] events channel, ARGV[5] the "blocked" event's head.  Blocks the authorizer (61023, 61003) only if that refresh
# token is still the stored one: a refresh token replaced meanwhile (a re-authorisation) is not
# judged by an answer to the old one.  The token keeps its remaining life.  Returns 1 if blocked.
_BLOCK_LUA = """
if redis.call('HGET', KEYS[2], 'refresh_token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'state', 'blocked', 'errcode', ARGV[2], 'errmsg', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ', "version": ' .. (redis.call('HGET', KEYS[2], 'version') or '0') .. ', "expires_at": null}')
return 1
"""

# KEYS[1] plain token key, KEYS[2] meta hash, KEYS[3] ticket key; ARGV[1] events channel, ARGV[2]
# the "dropped" event's head.  The merchant withdrew: the
# token, the ticket and the refresh token go; the version rises by one so a refresh in the
# air is fenced out.
_REMOVE_LUA = """
redis.call('DEL', KEYS[1], KEYS[3])
local v = (tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0) + 1
redis.call('HDEL', KEYS[2], 'refresh_token')
redis.call('HSET', KEYS[2], 'state', 'unauthorized', 'version', string.format('%.0f', v))
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ', "version": ' .. string.format('%.0f', v) .. ', "expires_at": null}')
return 1
"""


# KEYS[1] plain token key; ARGV[1] life in ms.  Shortens the stored token's life to ARGV[1] if it
# lives longer (a refresh whose answer was lost may have made WeChat issue a successor, leaving
# the stored one valid for the overlap only).  Returns 1 if shortened.
_CAP_LUA = """
local pttl = redis.call('PTTL', KEYS[1])
if pttl > tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Credentials:
    """What a refresh needs: the refresh token (never in a repr) and the authorizer's state."""

    refresh_token: str | None = field(repr=False)
    state: str  # "ok", "blocked", "unauthorized", or "" when unknown
    failures: int = 0


@dataclass(frozen=True)
class Value:
    """A token or ticket as served: the value (never in a repr) and its seconds of life left."""

    value: str = field(repr=False)
    expires_in: float


class AuthorizerStore:
    """Redis access for one platform's authorizers; every method may raise redis.RedisError."""

    def __init__(self, redis: aioredis.Redis, prefix: str, platform: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.platform = platform
        self._save = redis.register_script(_SAVE_LUA)
        self._block = redis.register_script(_BLOCK_LUA)
        self._remove = redis.register_script(_REMOVE_LUA)
        self._cap = redis.register_script(_CAP_LUA)
        self.channel = keys.events_channel(prefix)

    def __repr__(self) -> str:
        return f"AuthorizerStore({self.platform!r})"

    def token_key(self, appid: str) -> str:
        return keys.authorizer_token(self.prefix, self.platform, appid)

    def _head(self, event: str, appid: str, what: str = "access_token") -> str:
        return keys.event_head(event, f"{self.platform}.{appid}.{what}", self.platform)

    def _keys(self, appid: str) -> list[str]:
        return [self.token_key(appid), keys.authorizer_meta(self.prefix, self.platform, appid)]

    async def save(self, appid: str, token: str, life: float, version: int, refresh_token: str, authorisation: bool) -> bool:
        """Store the token (``life`` seconds) with its refresh token if ``version`` is the
        newest (see _SAVE_LUA); then index it for the API proxy.  False when fenced out."""
        ttl_ms = max(1, int(life * 1000))
        stored = bool(await self._save(keys=self._keys(appid), args=[token, ttl_ms, str(version), refresh_token, "1" if authorisation else "0",
                                                                  self.channel, self._head("rotated", appid)]))
        if stored:
            await self.redis.set(keys.issued(self.prefix, self.platform, token), appid, px=ttl_ms)
        return stored

    async def cap_life(self, appid: str, seconds: float) -> bool:
        """Make the stored token expire within ``seconds`` (if it lives longer); True if shortened."""
        return bool(await self._cap(keys=[self.token_key(appid)], args=[max(1, int(seconds * 1000))]))

    async def credentials(self, appid: str) -> Credentials:
        raw = await self.redis.hmget(keys.authorizer_meta(self.prefix, self.platform, appid), "refresh_token", "state", "failures")
        refresh, state, failures = (str(v) if v is not None else None for v in raw)
        return Credentials(refresh or None, state or "", int(failures or 0))

    async def count_failure(self, appid: str) -> int:
        return int(await self.redis.hincrby(keys.authorizer_meta(self.prefix, self.platform, appid), "failures", 1))

    async def ticket_failed(self, appid: str, errcode: int | None, why: str) -> int:
        """Note a failed jsapi ticket fetch (``why``: for operators, no value); the failures in a row."""
        meta = keys.authorizer_meta(self.prefix, self.platform, appid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(meta, "ticket_failures", 1)
            pipe.hset(meta, mapping={"ticket_errcode": str(errcode or 0), "ticket_errmsg": why[:300]})
            failures, _ = await pipe.execute()
        return int(failures)

    async def ticket_error(self, appid: str) -> str | None:
        """What a client may see of the last jsapi ticket failure (WeChat's errcode, never its
        errmsg), or None when the last fetch worked."""
        raw = await self.redis.hmget(keys.authorizer_meta(self.prefix, self.platform, appid), "ticket_failures", "ticket_errcode")
        failures, errcode = (str(v) if v is not None else "" for v in raw)
        if not failures:
            return None
        return f"getticket failed: errcode {errcode}" if errcode not in ("", "0") else "getticket failed: no answer"

    async def mark_rejected(self, appid: str, token: str, seconds: float) -> None:
        """Note for ``seconds`` that WeChat rejected ``token`` right after it was fetched in answer
        to a rejected one (the SHA-256 only): rotating it again would not help."""
        await self.redis.set(keys.authorizer_rejected(self.prefix, self.platform, appid), _fingerprint(token), px=max(1, int(seconds * 1000)))

    async def was_rejected(self, appid: str, token: str) -> bool:
        """Whether :meth:`mark_rejected` noted ``token`` (and the note has not expired)."""
        return bool(await self.redis.get(keys.authorizer_rejected(self.prefix, self.platform, appid)) == _fingerprint(token))

    async def block(self, appid: str, refresh_token: str, errcode: int, errmsg: str) -> bool:
        return bool(await self._block(keys=self._keys(appid), args=[refresh_token, str(errcode), errmsg[:300], self.channel, self._head("blocked", appid)]))

    async def remove(self, appid: str) -> None:
        await self._remove(keys=[*self._keys(appid), keys.authorizer_ticket(self.prefix, self.platform, appid)],
                           args=[self.channel, self._head("dropped", appid)])

    async def token(self, appid: str) -> Value | None:
        return await self._value(self.token_key(appid))

    async def ticket(self, appid: str) -> Value | None:
        return await self._value(keys.authorizer_ticket(self.prefix, self.platform, appid))

    async def save_ticket(self, appid: str, ticket: str, life: float) -> None:
        # Tickets are fetched under a claim of the schedule (one instance at a time) and
        # nobody depends on their order: a plain SET with the life is enough.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.authorizer_ticket(self.prefix, self.platform, appid), ticket, px=max(1, int(life * 1000)))
            pipe.time()
            _, (seconds, micros) = await pipe.execute()
        await self.redis.hdel(keys.authorizer_meta(self.prefix, self.platform, appid), "ticket_failures", "ticket_errcode", "ticket_errmsg")
        now = int(seconds) + int(micros) / 1e6
        head = self._head("rotated", appid, "ticket")
        await self.redis.publish(self.channel, head + f', "version": {int(now * 1e6)}, "expires_at": {now + life:.3f}}}')

    async def _value(self, key: str) -> Value | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        if value is None or pttl is None or pttl <= 0:
            return None
        return Value(value, pttl / 1000.0)

    async def state(self, appid: str) -> dict[str, str]:
        """The authorizer's state fields (never the refresh token); {} for an unknown one."""
        raw = await self.redis.hmget(keys.authorizer_meta(self.prefix, self.platform, appid), "state", "errcode", "errmsg", "expires_at", "failures")
        if raw[0] is None:
            return {}
        return dict(zip(("state", "errcode", "errmsg", "expires_at", "failures"), (str(v or "") for v in raw), strict=True))

    async def owner_of(self, token: str) -> str | None:
        """The authorizer ``token`` was issued to (current or recent), or None."""
        found = await self.redis.get(keys.issued(self.prefix, self.platform, token))
        return str(found) if found else None


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
