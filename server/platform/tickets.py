"""The component_verify_ticket: kept in Redis (newest wins, across instances), and the source
of the ``component_access_token`` that needs it.

WeChat pushes a ticket every 10 minutes; each is valid 12 hours.  Two instances may receive
pushes out of order (or a retry of an older push late): the ticket with the higher
``CreateTime`` wins, compared inside one Lua script.  CreateTime is WeChat's clock, so the
order survives a loss of Redis's data: after Redis comes back empty the next push (10
minutes at most) stores a ticket again; meanwhile every instance keeps the ticket it holds in
memory while it is valid (the source builds its request from memory).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

import redis.asyncio as aioredis

from server.config import SourceConfig
from server.platform import keys
from server.sources import Source, UpstreamRequest

logger = logging.getLogger(__name__)

TICKET_LIFE = 12 * 3600  # seconds after its CreateTime

# KEYS[1] the ticket hash; ARGV[1] ticket, ARGV[2] its CreateTime (unix seconds, WeChat's clock),
# ARGV[3] life in seconds.  Stores it if it is newer than the stored one and still has life by
# Redis's clock; returns 1 when stored, 0 when an equal or newer one is there (or it is dead).
_STORE_LUA = """
local created = tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'create_time') or '0') or 0
if created <= current then
  return 0
end
local now = tonumber(redis.call('TIME')[1])
local ttl = created + tonumber(ARGV[3]) - now
if ttl <= 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'ticket', ARGV[1], 'create_time', ARGV[2])
redis.call('EXPIRE', KEYS[1], math.floor(ttl))
return 1
"""


class ComponentTokenSource(Source):
    """``NAME.component_access_token``: the configured request plus the newest verify ticket
    this process knows; waits (see ``Source.waiting``) while it knows none."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self._ticket: str | None = None
        self._until = 0.0  # monotonic seconds: the ticket's end of life
        self.create_time = 0  # CreateTime of the ticket held (WeChat's clock)

    def learn(self, ticket: str, create_time: int, life: float) -> bool:
        """Hold ``ticket`` if newer than the one held; True when it was."""
        if create_time <= self.create_time and self.has_ticket():
            return False
        self._ticket, self.create_time, self._until = ticket, create_time, time.monotonic() + life
        return True

    def has_ticket(self) -> bool:
        return self._ticket is not None and time.monotonic() < self._until

    def waiting(self) -> str | None:
        if self.has_ticket():
            return None
        return "waiting for a component_verify_ticket (WeChat pushes one every 10 minutes to the event URL)"

    def build_request(self, values: Mapping[str, str], force: bool = False) -> UpstreamRequest:
        request = super().build_request(values, force)
        body = json.loads(request.body or b"{}")
        body["component_verify_ticket"] = self._ticket or ""
        return UpstreamRequest(request.method, request.url, json.dumps(body).encode(), request.safe_url)


class VerifyTickets:
    """A platform's verify ticket in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, platform: str, source: ComponentTokenSource) -> None:
        self.redis = redis
        self.key = keys.verify_ticket(prefix, platform)
        self.platform = platform
        self.source = source
        self._store = redis.register_script(_STORE_LUA)

    async def store(self, ticket: str, create_time: int) -> bool:
        """Keep ``ticket`` if it is the newest (in Redis and in memory); True when stored."""
        stored = bool(await self._store(keys=[self.key], args=[ticket, str(create_time), str(TICKET_LIFE)]))
        if stored:
            logger.info("platform %s: verify ticket of %d stored", self.platform, create_time)
        else:
            logger.info("platform %s: verify ticket of %d ignored: a newer one is stored", self.platform, create_time)
        await self.sync()
        return stored

    async def sync(self) -> bool:
        """Take the ticket Redis holds into the source's memory; True if it was news."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.key, "ticket", "create_time")
            pipe.ttl(self.key)
            (ticket, created), ttl = await pipe.execute()
        if not ticket or not created or ttl is None or ttl <= 0:
            return False
        return self.source.learn(ticket, int(created), float(ttl))
