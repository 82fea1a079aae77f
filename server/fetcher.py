"""One fetch of one source: the protocol that keeps it to one upstream call and never
leaves a dead token stored.

The :class:`~server.refresher.Refresher` decides *when* a source is fetched (ticks,
forced refreshes, retries, single flight in the process); a :class:`Fetcher` carries out
one fetch:

1. a Redis lock across processes (``Store.acquire``), which hands out the version the
   value will be stored with; the loser waits for the winner's value instead of calling
   upstream, and under the lock the holder reads Redis again and skips the call when
   someone refreshed meanwhile;
2. fencing on write (``Store.write``): a slow fetch never overwrites a value fetched after it;
3. failures announced to every instance before the lock is released (backoff, blocks);
4. lost answers (a timeout, a dropped connection, a fetch cancelled at shutdown), which may
   have issued a token nobody received: :class:`~server.lost_answers.LostAnswers` cuts the
   stored token's life, makes the next call wait longer, and checks the stored token with
   WeChat after two in a row;
5. without Redis, a value is fetched in memory only when it is about to expire.

It asks its :class:`Policy` (the refresher) whether a value answers a request, whether a
call may reach WeChat now, and for the values of the sources this one templates in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from redis.exceptions import RedisError

from server.config import RefreshConfig
from server.lost_answers import LostAnswers
from server.metrics import Metrics
from server.mirror import Mirror
from server.sources import Fetched, Source
from server.state import (
    Blocked,
    DependencyUnavailable,
    SourceState,
    Unavailable,
    Want,
    backoff_floor,
    until_quota_reset,
)
from server.store import Block, Entry, Lease, Snapshot, Store
from server.upstream import ErrorKind, Upstream, UpstreamError

logger = logging.getLogger(__name__)



class Policy(Protocol):
    """What a fetch asks of the scheduler that started it."""

    def fresh(self, name: str, want: Want) -> Entry | None:
        """The entry that answers ``want`` without a fetch, or None."""

    def needed(self, entry: Entry | None, want: Want) -> bool:
        """Whether ``entry`` calls for a fetch, given ``want``."""

    def gate(self, name: str, want: Want, snap: Snapshot | None) -> None:
        """Raise unless a call for ``name`` may reach WeChat now."""

    async def refresh(
        self, name: str, *, force: bool = False, old: str | None = None, min_interval: bool = True,
        retry_blocked: bool = False, ignore_backoff: bool = False, permit: Callable[[], Awaitable[None]] | None = None,
    ) -> Entry:
        """A valid value of ``name`` (a dependency), fetched if needed."""


class CallCounter(Protocol):
    """Counts upstream calls per source and day against the daily quota (server.ops.quota)."""

    def record(self, name: str) -> None:
        """Count one call of ``name``; must neither wait nor raise (a fetch never fails for it)."""

    def today(self, name: str) -> tuple[int, int | None]:
        """``(calls today, daily quota or None)``, as last known."""

    async def sync(self) -> bool:
        """Learn every instance's counts (bounded in time); False when they could not be read."""


class LocalCalls:
    """A :class:`CallCounter` in this process's memory only (no day, no quota): the default
    when none is given (tests of the core, tools)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def record(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def today(self, name: str) -> tuple[int, int | None]:
        return self.calls.get(name, 0), None

    async def sync(self) -> bool:
        return True


class Fetcher:
    """Carries out fetches (see the module docstring); holds no state of its own beyond
    the per-source ``states`` it shares with the refresher."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        store: Store,
        upstream: Upstream,
        mirror: Mirror,
        states: dict[str, SourceState],
        cfg: RefreshConfig,
        metrics: Metrics,
        policy: Policy,
        calls: CallCounter,
    ) -> None:
        self.sources = sources
        self.store = store
        self.upstream = upstream
        self.mirror = mirror
        self.states = states
        self.cfg = cfg
        self.metrics = metrics
        self.policy = policy
        self.calls = calls
        self.answers = LostAnswers(sources, store, upstream, mirror, states, cfg)

    async def run(self, name: str, want: Want) -> Entry:
        """Fetch ``name`` for ``want`` under the lock (or without Redis, see
        _refresh_without_redis), unless the value Redis holds answers it.  Raises
        UpstreamError, Unavailable or what ``want.permit`` raised."""
        state = self.states[name]
        snap = await self.mirror.read(name)
        if fresh := self.policy.fresh(name, want):
            return fresh
        if snap is None:  # reads skip Redis after an error: ask it once more for the lock
            try:
                snap = await self.mirror.read_now(name)
            except RedisError:
                return await self._refresh_without_redis(name, want)
            if fresh := self.policy.fresh(name, want):
                return fresh
        if waiting := self.sources[name].waiting():  # e.g. a platform's token without a verify ticket
            raise DependencyUnavailable(f"{name} is {waiting}")
        self.policy.gate(name, want, snap)
        # Dependencies first, so this source's lock is never held while waiting for them.
        values = await self._dependency_values(name)
        expected = self.answers.timeout(name, snap)
        lease_seconds = self.answers.lease(expected)
        deadline = time.monotonic() + lease_seconds + expected
        while True:
            known = state.entry.version if state.entry is not None else 0
            try:
                lease = await self.store.acquire(name, lease_seconds, known)
            except RedisError:
                return await self._refresh_without_redis(name, want, values)
            if lease is not None:
                break
            seen = await self._wait_for_other(name, snap.version, deadline)
            if seen is None:
                raise Unavailable(f"source {name}: another instance holds the refresh lock")
            # A value stored since we asked answers a forced refresh too, as a joined
            # flight does in one process.  Else the holder let go: take the lock in turn
            # (its failure, if any, is announced: the gate under the lock will say so).
            if seen.entry is not None and seen.version != snap.version and (want.force or not self.policy.needed(seen.entry, want)):
                return seen.entry
            if fresh := self.policy.fresh(name, want):
                return fresh
            snap = seen  # the next wait looks for a change from here
        calling = False
        try:
            snap = await self.mirror.read_now(name)  # under the lock: did someone refresh meanwhile?
            if fresh := self.policy.fresh(name, want):
                return fresh
            self.policy.gate(name, want, snap)
            timeout = self.answers.timeout(name, snap)
            if self.answers.lost(name, snap) >= 2 and snap.entry is not None:
                await self._keep_lock(name, lease.token, self.cfg.timeout + self.answers.lease(timeout))
                await self.answers.verify(name, snap.entry)
            if want.permit is not None:
                await want.permit()
            # Answers lost while we waited for the lock make the call longer than the lease
            # taken for it: renew it for this call.
            await self._keep_lock(name, lease.token, self.answers.lease(timeout))
            calling = True
            started = time.monotonic()
            entry = await self._fetch_and_store(name, want.force, values, lease, timeout)
            await self.answers.learn(name, timeout, time.monotonic() - started, snap.slow)
            return entry
        except UpstreamError as e:
            if e.kind is ErrorKind.QUOTA and want.force and self.sources[name].cfg.force:
                # stable_token: 45009 to force_refresh means the 20 forced calls of the day
                # are spent, not the source: ordinary refreshes go on.
                state.force_spent_until = time.monotonic() + await self._until_quota_reset()
                logger.error("source %s: forced refreshes used up for today (errcode 45009: %s); ordinary refreshes go on", name, e.errmsg)
                raise Blocked(f"source {name}: today's forced refreshes are used up (45009)") from None
            lost = e.maybe_issued and self.answers.rotates(name, want)
            # Announce before releasing the lock, so no other instance slips a call in.
            await self._announce(name, e, snap, lost)
            if lost:
                state.lost_answers += 1
                await self.answers.cut(name)
            raise
        except asyncio.CancelledError:
            # Cancelled (a shutdown gave up waiting) while the call was in the air: the
            # answer is lost as surely as after a timeout.
            if calling and self.answers.rotates(name, want):
                state.lost_answers += 1
                await asyncio.shield(self.answers.cut(name))
            raise
        finally:
            try:
                await asyncio.shield(self.store.release(name, lease.token))
            except RedisError:
                pass  # the lease expires by itself

    async def _until_quota_reset(self) -> float:
        """Seconds until midnight China time, on Redis's clock (the host's if Redis is unreachable)."""
        try:
            now = await self.store.time()
        except RedisError:
            now = time.time()
        return until_quota_reset(now)

    async def _refresh_without_redis(self, name: str, want: Want, values: dict[str, str] | None = None) -> Entry:
        """Redis is unreachable: no lock, no fencing.  Refresh in memory only a value about
        to expire: earlier, another instance may be refreshing too, and two fetches retire
        each other's tokens.  A forced refresh needs the lock, except the operator's."""
        entry = self.states[name].entry
        if want.force and not want.ignore_backoff:
            raise Unavailable(f"source {name}: redis unreachable; a forced refresh needs its lock, try again shortly")
        if not want.force and entry is not None and entry.remaining() > self.cfg.interval + self.cfg.timeout:
            return entry
        self.policy.gate(name, want, None)
        if values is None:
            values = await self._dependency_values(name)
        if want.permit is not None:
            await want.permit()
        return await self._fetch_and_store(name, want.force, values, None, self.answers.timeout(name, None))

    async def _announce(self, name: str, err: UpstreamError, snap: Snapshot, lost: bool) -> None:
        """Tell the other instances: back off (transient), or make no call (fatal, quota)."""
        state = self.states[name]
        try:
            if err.kind is ErrorKind.TRANSIENT:
                failures = max(state.failures, snap.failures) + 1
                state.failures = failures - 1  # _failed adds ours: the count is the cluster's
                await self.store.set_backoff(name, backoff_floor(self.cfg.backoff_max, failures, getattr(err, "retry_after", 0.0)), failures, lost)
            elif err.kind is ErrorKind.FATAL:
                await self.store.set_blocked(name, Block("fatal", err.errcode or 0, err.errmsg), None)
            elif err.kind is ErrorKind.QUOTA:
                await self.store.set_blocked(name, Block("quota", err.errcode or 0, err.errmsg), await self._until_quota_reset())
        except RedisError:
            pass

    async def _wait_for_other(self, name: str, version: int, deadline: float) -> Snapshot | None:
        """Poll while another process holds the lock.  What Redis holds once a new value is
        stored or the lock is released; None at ``deadline``."""
        delay = 0.05
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            snap = await self.store.read(name)
            if snap.version == version and await self.store.locked(name):
                continue
            if snap.version == version:
                snap = await self.store.read(name)  # released: one last look
            self.mirror.adopt(name, snap)
            return snap
        return None

    async def _fetch_and_store(self, name: str, force: bool, values: dict[str, str], lease: Lease | None, timeout: float) -> Entry:
        """Call upstream and store the value with the lease's version (None: Redis is
        unreachable, keep it in memory).  The lease is renewed before a second call."""
        started = time.monotonic()
        fetched = await self._call_upstream(name, force, values, lease.token if lease else None, timeout)
        life = min(fetched.expires_in, self.cfg.max_ttl)
        state = self.states[name]
        self._succeeded(name)
        current = state.entry
        if not force and current is not None and fetched.value == current.value and current.remaining() > 0:
            if started + life <= current.expires_at + 1:
                return await self._confirmed(name, current, started + life)
            # WeChat gives the value we hold a longer life than we do: we cut it after an
            # answer was lost, and that call issued nothing.  WeChat's word is fresh news:
            # stored as a new version, so every instance takes the life back.
            logger.info("source %s: upstream confirms the value with %.0fs of life; restoring its life", name, life)
        if lease is not None:
            version = lease.version
        else:
            # No shared clock: this host's, kept above every version this process knows.
            version = max(int(time.time() * 1e6), (current.version if current else 0) + 1)
        entry = Entry(fetched.value, started + life, started, version, fetched.field)
        if lease is not None:
            try:
                if not await self.store.write(name, entry):
                    return await self._fenced_out(name, fetched)
            except RedisError:
                lease = None
        state.adopt(entry)
        if lease is None:
            logger.warning("source %s: new value %s... kept in memory only (redis unreachable)", name, fetched.value[:6])
        else:
            logger.info("source %s: new value %s... stored, life %.0fs", name, fetched.value[:6], life)
        return entry

    async def _confirmed(self, name: str, current: Entry, expires_at: float) -> Entry:
        """Upstream answered with the value we hold: stable_token in normal mode does until
        WeChat renews it (about 300 s before expiry).  Asking every tick until then would
        only burn calls, so no instance asks again for half of its remaining life.  Nothing
        is rewritten: it is no new value (no new version, force_min_interval not re-armed)."""
        now = time.monotonic()
        wait = max(self.cfg.interval, (min(expires_at, current.expires_at) - now) / 2)
        entry = dataclasses.replace(current, same_until=now + wait)
        self.states[name].entry = entry
        try:
            await self.store.mark_same(name, current.value, wait)
        except RedisError:
            pass
        logger.info("source %s: upstream returned the same value (%.0fs left); next try in %.0fs", name, current.remaining(), wait)
        return entry

    def _succeeded(self, name: str) -> None:
        """An upstream call answered with a value: the source is healthy again."""
        state = self.states[name]
        if state.failures or state.block:
            logger.info("source %s: recovered after %d failed attempts", name, state.failures)
        state.healthy()
        state.block, state.stale_recovery_failed, state.lost_answers = None, False, 0

    async def _fenced_out(self, name: str, fetched: Fetched) -> Entry:
        """A value fetched after ours (a higher version: our lock expired while our slow
        call ran) is stored: keep it, discard ours."""
        snap = await self.mirror.read_now(name)
        if snap.entry is not None and snap.entry.value != fetched.value:
            # WeChat may have issued ours after theirs (requests cross on the way), making
            # theirs the "previous" token, valid 5 more minutes only.  Let it be refreshed soon.
            await self.store.cap_life(name, snap.entry.value, self.cfg.overlap)
            snap = await self.mirror.read_now(name)
        logger.warning("source %s: a value fetched after ours was stored while our fetch ran; keeping it, discarding ours", name)
        if snap.entry is None:
            raise Unavailable(f"source {name}: a newer value was stored while our fetch ran, and has gone since")
        return snap.entry

    async def _call_upstream(self, name: str, force: bool, values: dict[str, str], token: str | None, timeout: float) -> Fetched:
        """One upstream call; on a stale dependency (40001...), refresh it once and retry once.

        If that recovery already failed and this source has not succeeded since, a stale
        answer is an ordinary failure: forcing the token again would rotate it (and cut
        every business server's copy to 5 minutes) on every retry, in every instance.
        """
        source = self.sources[name]
        state = self.states[name]
        try:
            return await self._upstream_fetch(source, values, force, timeout)
        except UpstreamError as e:
            if e.kind is not ErrorKind.STALE_TOKEN:
                raise
            if state.stale_recovery_failed:
                e.kind = ErrorKind.TRANSIENT  # backed off (and announced) like any failure
                raise
            logger.warning("source %s: errcode %s with the current %s; refreshing it once", name, e.errcode, "/".join(source.deps))
        # Refresh each dependency only if the value we used is still current: when someone
        # else already rotated it, we simply take the new one.  Its gate applies (a blocked
        # or backing-off token is not fetched for us), and its failure is its own.
        await self._keep_lock(name, token, self.answers.lease(timeout))
        for dep in source.deps:
            try:
                values[dep] = (await self.policy.refresh(dep, force=True, old=values[dep], min_interval=False)).value
            except (UpstreamError, Unavailable) as err:
                state.stale_recovery_failed = True  # not again on every tick while the token fails
                raise DependencyUnavailable(f"{dep} could not be refreshed ({err})") from None
        await self._keep_lock(name, token, self.answers.lease(timeout))
        try:
            return await self._upstream_fetch(source, values, force, timeout)
        except UpstreamError as e:
            if e.kind is ErrorKind.STALE_TOKEN:
                state.stale_recovery_failed = True
                e.kind = ErrorKind.TRANSIENT  # from now on, backed off like any failure
            raise

    async def _keep_lock(self, name: str, token: str | None, lease: float) -> None:
        """Renew the lease (``lease`` seconds) before more calls under the lock; give up if it was lost."""
        if token is None:
            return
        try:
            held = await self.store.extend(name, token, lease)
        except RedisError:
            return  # cannot tell; fencing still guards the write
        if not held:
            raise Unavailable(f"source {name}: lost the refresh lock; another instance takes over")

    async def _upstream_fetch(self, source: Source, values: dict[str, str], force: bool, timeout: float) -> Fetched:
        """One counted, timed upstream call that waits ``timeout`` seconds for its answer.

        Counted before it is made: a call whose answer is lost still used the quota."""
        self.states[source.name].upstream_calls += 1
        self.calls.record(source.name)
        started = time.monotonic()
        result = "ok"
        try:
            return await self.upstream.fetch(source, source.build_request(values, force), timeout)
        except UpstreamError as e:
            result = e.kind.value
            raise
        finally:
            self.metrics.observe_upstream(source.name, result, time.monotonic() - started)

    async def _dependency_values(self, name: str) -> dict[str, str]:
        return {dep: (await self._dependency(dep)).value for dep in self.sources[name].deps}

    async def _dependency(self, dep: str) -> Entry:
        """A valid value of ``dep`` for a dependent's request, fetched if due (through its gate)."""
        state = self.states[dep]
        if state.entry is not None and state.entry.remaining() >= self.cfg.ahead:
            return state.entry
        try:
            return await self.policy.refresh(dep)
        except (UpstreamError, Unavailable) as e:
            if state.entry is not None and state.entry.remaining() > 0:
                return state.entry  # not renewed now, but still valid
            raise DependencyUnavailable(f"{dep} has no valid value ({e})") from None
