"""What this process knows of each source's value: Redis's, reconciled with memory.

Redis is the source of truth.  A read is served from memory while Redis confirmed memory's
value less than ``refresh.read_max_age`` (1 s) ago and the events subscription is up: a
rotation by any instance is announced on the events channel (server.ops.events) and makes
the next read ask Redis at once, and every value memory holds is confirmed against Redis
every second (one round trip for all), which bounds what a lost message can cost.  Without
a live subscription, or with ``read_max_age: 0``, every read asks Redis (concurrent reads of
one source share one round trip).  Memory is also the fallback while Redis is unreachable or slow, and
wins when its version is higher (Redis lost the value, came back with old data, or failed
over to a lagging replica; versions keep their order across such a loss, see
:mod:`server.store`): then it is put back, without an upstream call, and every other
source is checked at once, since whatever lost one value probably lost them all.

A value Redis says was superseded (a higher version with no value: it was replaced and
expired, or WeChat rejected it) is forgotten here too.

A value's life only ever shortens (a lost answer caps it): Redis holding the same version
with a longer life (it came back from an old dump, or its clock stepped back) is cut back to
memory's, and memory never takes the longer one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from server.state import SourceState, Unavailable, why_unavailable
from server.store import Block, Entry, Snapshot, Store

logger = logging.getLogger(__name__)

REDIS_RETRY_DELAY = 1.0  # seconds during which reads skip Redis after a Redis error
READ_WAIT = 0.5  # seconds a request with a valid value in memory waits for Redis
MIN_PUT_BACK_LIFE = 1.0  # seconds: a value closer to its expiry than this is not put back
LIFE_SLACK = 1.0  # seconds a life read from Redis may exceed memory's before it is cut back


class Mirror:
    """Reads of Redis reconciled with the per-source memory in ``states``.

    ``on_block(name, block, seconds)`` is called when Redis announces a block this process
    did not know (another instance got a fatal errcode or 45009), ending in ``seconds``.
    """

    def __init__(self, store: Store, states: dict[str, SourceState], on_block: Callable[[str, Block, float], None],
                 read_max_age: float = 0.0) -> None:
        self.store = store
        self.states = states
        self.on_block = on_block
        self.read_max_age = read_max_age
        #: whether rotations by other instances reach us as events (set by the subscriber)
        self.events_live: Callable[[], bool] = lambda: False
        self._reads: dict[str, asyncio.Future[Snapshot | None]] = {}  # Redis reads under way
        self._redis_down_logged = False
        self._redis_retry_at = 0.0  # monotonic time before which reads skip Redis
        self._checking: asyncio.Future[None] | None = None  # check_all under way

    async def current(self, name: str) -> Entry:
        """The valid value to serve now: Redis's, or memory's while Redis is down or slow.

        With a valid value in memory, Redis gets at most ``READ_WAIT`` seconds: a hung
        Redis slows no request (the read goes on and is adopted when it lands).  Raises
        Unavailable when there is no valid value.  Never calls upstream.
        """
        state = self.states[name]
        entry = state.entry
        if entry is not None:
            now = time.monotonic()
            if now - state.confirmed_at < self.read_max_age and entry.expires_at > now and self.events_live():
                return entry  # confirmed by Redis a moment ago, and any rotation since would have been told
        pending = self._read_shared(name)
        if state.entry is not None and state.entry.remaining() > 0:
            try:
                await asyncio.wait_for(asyncio.shield(pending), READ_WAIT)
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.shield(pending)
        # Redis's answer, if any, was adopted into memory: memory is the answer.
        entry = state.entry
        if entry is None or entry.remaining() <= 0:
            raise Unavailable(why_unavailable(name, state, time.monotonic()))
        return entry

    async def read(self, name: str) -> Snapshot | None:
        """Redis's snapshot, reconciled with memory (see _reconcile); None when Redis is unreachable."""
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
        sent = time.monotonic()
        if sent < self._redis_retry_at:
            return None
        try:
            snap = await self._reconcile(name, await self.store.read(name))
        except RedisError as e:
            self._redis_failed(e)
            return None
        self._confirm(name, snap.entry.version if snap.entry is not None else None, sent)
        if self._redis_down_logged:
            logger.warning("redis reachable again: putting back what it lacks")
            self._redis_down_logged = False
            self.check_soon()
        return snap

    def _redis_failed(self, e: Exception) -> None:
        # Skip Redis for a second: requests answer from memory at once instead of each
        # waiting for a timeout, and nothing hammers a dead Redis.
        self._redis_retry_at = time.monotonic() + REDIS_RETRY_DELAY
        if not self._redis_down_logged:
            logger.error("redis unreachable (%s): serving values held in memory", type(e).__name__)
            self._redis_down_logged = True

    async def read_now(self, name: str) -> Snapshot:
        """Redis's snapshot, read now and reconciled (no sharing, no skipping after errors):
        for the refresher's decisions under the lock.  Raises RedisError."""
        return await self._reconcile(name, await self.store.read(name))

    async def _reconcile(self, name: str, snap: Snapshot) -> Snapshot:
        """Put memory's value back when it is newer than Redis's, then adopt Redis's.

        Memory is newer when Redis lost the value (restarted empty, evicted, deleted by
        hand), came back with old data, or failed over to a lagging replica, or when this
        process fetched while Redis was unreachable: WeChat may already have retired the
        value Redis holds.  The put-back makes no upstream call.
        """
        state = self.states.get(name)
        if state is None:
            return snap  # removed by a reload while this read was under way
        mem = state.entry
        if mem is not None and mem.remaining() > MIN_PUT_BACK_LIFE and (
            # the value key alone is gone (a higher version that expired or was rejected is not)
            (snap.entry is None and snap.version <= mem.version)
            or (snap.entry is not None and snap.entry.version < mem.version)
        ):
            if await self.store.write(name, mem, restore=True):
                logger.warning("source %s: redis lacked the newest value (version %d); put it back from memory", name, mem.version)
                self.check_soon()  # whatever lost this value probably lost the others too
            snap = await self.store.read(name)
        elif mem is not None and snap.entry is not None and snap.entry.version == mem.version and (
            snap.entry.remaining() > mem.remaining() + LIFE_SLACK
        ):
            if await self.store.cap_life(name, mem.value, max(0.001, mem.remaining())):
                logger.warning("source %s: redis gave the value a longer life than it has (an old copy, or its clock stepped); cut back", name)
            snap = await self.store.read(name)
        self.adopt(name, snap)
        return snap

    def _confirm(self, name: str, version: int | None, sent: float) -> None:
        """Redis, asked at ``sent``, holds ``version``: memory's value is confirmed if it is that one."""
        state = self.states.get(name)
        if state is not None and state.entry is not None and state.entry.version == version:
            state.confirmed_at = max(state.confirmed_at, sent)

    async def on_event(self, source: str) -> None:
        """Any instance stored a change of ``source`` (an event, see server.ops.events): the
        next read of it asks Redis, and a read starts now so memory catches up first."""
        state = self.states.get(source)
        if state is None:
            return
        state.confirmed_at = -math.inf
        self._read_shared(source)

    async def on_subscribed(self) -> None:
        """The subscription (re)started: events may have been missed, confirm everything again."""
        for state in self.states.values():
            state.confirmed_at = -math.inf
        self.check_soon()

    async def drain(self, timeout: float = 1.0) -> None:
        """Let the Redis reads and the check under way finish (``timeout`` seconds), then
        cancel them: at shutdown, before Redis is closed under them."""
        pending = [f for f in (*self._reads.values(), self._checking) if f is not None and not f.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for f in late:
            f.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)

    def check_soon(self) -> None:
        """Run :meth:`check_all` in the background (once at a time)."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self.check_all())

    async def check_all(self) -> None:
        """Put back every value memory holds that Redis lacks or holds an older version of,
        catch up with every value Redis holds a newer version or a shorter life of, and
        confirm the others (see the module docstring).

        One round trip when nothing changed (the refresher calls this every second, so
        direct Redis readers get every value back soon after Redis loses its data).
        """
        sent = time.monotonic()
        if sent < self._redis_retry_at:
            return
        held = {n: s.entry for n, s in self.states.items() if s.entry is not None and s.entry.remaining() > MIN_PUT_BACK_LIFE}
        if not held:
            return
        try:
            stored = await self.store.versions(list(held))
            for name, entry in held.items():
                found = stored[name]
                if found is None or found[0] != entry.version or abs(found[1] - entry.remaining()) > LIFE_SLACK:
                    await self.read_now(name)
                else:
                    self._confirm(name, found[0], sent)
        except RedisError as e:
            self._redis_failed(e)

    def adopt(self, name: str, snap: Snapshot) -> None:
        """Take Redis's value, unless memory's is newer, and the block another instance
        announced (or its end)."""
        state = self.states.get(name)
        if state is None:
            return  # removed by a reload
        known = state.entry
        if snap.entry is not None:
            if known is None or known.remaining() <= 0 or snap.entry.version >= known.version:
                newer = known is None or snap.entry.version > known.version
                confirmed = known is not None and snap.entry.same_until > known.same_until
                if newer or confirmed:
                    # Another instance stored a new value, or upstream confirmed ours: the
                    # failures are over here too.
                    state.healthy()
                    if newer:
                        state.stale_recovery_failed = False
                entry = snap.entry
                if not newer and known is not None and known.expires_at < entry.expires_at:
                    entry = dataclasses.replace(entry, expires_at=known.expires_at)  # a life never grows
                state.adopt(entry)
        elif known is not None and snap.version > known.version:
            # Superseded: replaced by a value that has expired since, or rejected by WeChat.
            state.entry = None
        now = time.monotonic()
        if snap.blocked is not None:
            if state.blocked(now) != snap.blocked:
                self.on_block(name, snap.blocked, snap.blocked_for)
            else:
                state.block_until = now + snap.blocked_for  # Redis's TTL (a quota block's midnight) rules
        elif state.block is not None:
            # Lifted in Redis (a value was stored, a restart, the quota's TTL): lift it here
            # too.  A block Redis never heard of (it was down) costs one more try, no more.
            logger.info("source %s: the block was lifted; no longer blocked", name)
            state.block = None
            state.healthy()
