"""What this process knows of each source's value: Redis's, reconciled with memory.

Redis is the source of truth while it answers: every read goes there (concurrent reads of
one source share one round trip), and every instance therefore serves the value Redis
holds, whoever wrote it.  Memory is the fallback while Redis is unreachable or slow, and
wins when it is newer (Redis lost the value, came back with old data, or failed over to a
lagging replica): then it is put back, without an upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from server.state import SourceState, Unavailable, why_unavailable
from server.store import Block, Entry, Snapshot, Store

logger = logging.getLogger(__name__)

REDIS_RETRY_DELAY = 1.0  # seconds during which reads skip Redis after a Redis error
READ_WAIT = 0.5  # seconds a request with a valid value in memory waits for Redis


class Mirror:
    """Reads of Redis reconciled with the per-source memory in ``states``.

    ``on_block(name, block)`` is called when Redis announces a block this process
    did not know (another instance got a fatal errcode or 45009).
    """

    def __init__(self, store: Store, states: dict[str, SourceState], on_block: Callable[[str, Block], None]) -> None:
        self.store = store
        self.states = states
        self.on_block = on_block
        self._reads: dict[str, asyncio.Future[Snapshot | None]] = {}  # Redis reads under way
        self._redis_down_logged = False
        self._redis_retry_at = 0.0  # monotonic time before which reads skip Redis

    async def current(self, name: str) -> Entry:
        """The valid value to serve now: Redis's, or memory's while Redis is down or slow.

        With a valid value in memory, Redis gets at most ``READ_WAIT`` seconds: a hung
        Redis slows no request (the read goes on and is adopted when it lands).  Raises
        Unavailable when there is no valid value.  Never calls upstream.
        """
        state = self.states[name]
        pending = self._read_shared(name)
        snap: Snapshot | None
        if state.entry is not None and state.entry.remaining() > 0:
            try:
                snap = await asyncio.wait_for(asyncio.shield(pending), READ_WAIT)
            except asyncio.TimeoutError:
                snap = None
        else:
            snap = await asyncio.shield(pending)
        entry = snap.entry if snap is not None and snap.entry is not None else state.entry
        if entry is None or entry.remaining() <= 0:
            raise Unavailable(why_unavailable(name, state, time.time()))
        return entry

    async def read(self, name: str) -> Snapshot | None:
        """Redis's snapshot, reconciled with memory (see _read_redis); None when Redis is unreachable."""
        return await asyncio.shield(self._read_shared(name))

    def _read_shared(self, name: str) -> asyncio.Future[Snapshot | None]:
        """The read of ``name`` under way, or a new one.

        Concurrent reads of one source share one round trip: a crowd of requests costs
        Redis one command, not one per request (and no connection pool runs dry).
        """
        pending = self._reads.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._read_redis(name))
            self._reads[name] = pending
            pending.add_done_callback(lambda f: self._reads.pop(name) if self._reads.get(name) is f else None)
        return pending

    async def _read_redis(self, name: str) -> Snapshot | None:
        """Read Redis and reconcile: adopt Redis's value, unless memory's is newer.

        Memory is newer when Redis lost the value (restarted empty, evicted, deleted by
        hand), came back with old data, or failed over to a lagging replica, or when this
        process fetched while Redis was unreachable: then memory's value is put back (no
        upstream call), since WeChat may already have retired the one Redis holds.
        """
        if time.monotonic() < self._redis_retry_at:
            return None
        state = self.states[name]
        try:
            snap = await self.store.read(name)
            mem = state.entry
            if mem is not None and mem.remaining() > 1 and (
                # the value key alone is gone (a newer version that expired is not)
                (snap.entry is None and snap.version <= mem.version)
                or (snap.entry is not None and (snap.entry.version, snap.entry.fetched_at) < (mem.version, mem.fetched_at))
            ):
                if await self.store.restore(name, mem):
                    logger.warning("source %s: redis lacked the newest value; put it back from memory", name)
                snap = await self.store.read(name)
        except RedisError as e:
            # Skip Redis for a second: requests answer from memory at once instead of each
            # waiting for a timeout, and nothing hammers a dead Redis.
            self._redis_retry_at = time.monotonic() + REDIS_RETRY_DELAY
            if not self._redis_down_logged:
                logger.error("redis unreachable (%s): serving values held in memory", type(e).__name__)
                self._redis_down_logged = True
            return None
        if self._redis_down_logged:
            logger.warning("redis reachable again")
            self._redis_down_logged = False
        self.adopt(name, snap)
        return snap

    async def read_now(self, name: str) -> Snapshot:
        """Redis's snapshot, read now and adopted (no sharing, no skipping after errors):
        for the refresher's decisions under the lock.  Raises RedisError."""
        snap = await self.store.read(name)
        self.adopt(name, snap)
        return snap

    def adopt(self, name: str, snap: Snapshot) -> None:
        """Take Redis's value and the block another instance announced (or its end)."""
        state = self.states[name]
        if snap.entry is not None:
            known = state.entry
            newer = known is None or snap.entry.version > known.version
            confirmed = known is not None and snap.entry.same_until > known.same_until
            if newer or confirmed:
                # Another instance stored a new value, or upstream confirmed ours: the
                # failures are over here too.
                state.healthy()
                if newer:
                    state.stale_recovery_failed = False
            state.entry = snap.entry
        now = time.time()
        if snap.blocked is not None:
            if state.blocked(now) != snap.blocked:
                self.on_block(name, snap.blocked)
        elif state.block is not None:
            # Lifted in Redis (a value was stored, a restart, the quota's TTL): lift it here
            # too.  A block Redis never heard of (it was down) costs one more try, no more.
            logger.info("source %s: the block was lifted; no longer blocked", name)
            state.block = None
            state.healthy()
