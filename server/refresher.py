"""The scheduler: refresh each source ahead of expiry, once, whatever the crowd does.

Three layers keep upstream calls to one per rotation:

1. Single flight in the process: every reason to fetch a source (a tick, a forced
   refresh, a dependent source) joins the one flight already running for it.
2. A Redis lock across processes (``Store.acquire``): the loser waits for the winner's
   value instead of calling upstream.  Under the lock the holder reads Redis again and
   skips the call when someone refreshed meanwhile.
3. Fencing on write (``Store.write``): a slow fetch never overwrites a newer value.

One gate (:meth:`Refresher._gate`) decides whether a call may reach WeChat at all.
Failures never store anything.  Transient ones back off exponentially with jitter
(capped at ``refresh.backoff_max``), announced in Redis so every instance follows the
same backoff, while the old value is served until it really expires.  Fatal ones (bad
secret, IP not whitelisted...) block the source, and 45009 (daily quota) until midnight
China time, announced in Redis too; only an operator's forced refresh (the
``server.secret`` holder) or a restart tries again.

When Redis is unreachable the refresher serves values from memory and refreshes them
there when they are about to expire (never earlier: without the lock another instance
may be refreshing too); the first read after Redis returns puts them back
(``Store.restore``), without an upstream call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import random
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from tornado.ioloop import IOLoop, PeriodicCallback

from server.config import RefreshConfig
from server.metrics import Metrics
from server.mirror import Mirror
from server.sources import Fetched, Source
from server.state import (
    CHINA,
    BackingOff,
    Blocked,
    DependencyUnavailable,
    SourceState,
    Unavailable,
    Want,
    backoff_floor,
    next_quota_reset,
    why_unavailable,
)
from server.store import Block, Entry, Snapshot, Store
from server.upstream import ErrorKind, Upstream, UpstreamError

logger = logging.getLogger(__name__)

PREVIOUS_TOKEN_LIFE = 300.0  # seconds WeChat keeps the previous token valid after a new one


def _landed(state: SourceState, flight: asyncio.Future[Entry]) -> None:
    if state.flight is flight:
        state.flight = None
    if not flight.cancelled():
        flight.exception()  # retrieved: its callers got it; keeps asyncio from logging it again


class Refresher:
    """Owns the refresh timer and every upstream call.  See the module docstring."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        store: Store,
        upstream: Upstream,
        cfg: RefreshConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self.sources = dict(sources)  # in dependency order
        self.store = store
        self.upstream = upstream
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.status)
        self.states = {name: SourceState() for name in self.sources}
        self._timer: PeriodicCallback | None = None
        self._stopping = False
        self._tasks: set[asyncio.Future[Any]] = set()  # ticks, retries, wake-ups under way
        self.mirror = Mirror(store, self.states, partial(self._block, how="announced by another instance"))
        #: a lock outlives the calls made under it; it is renewed before a second call
        self.lock_lease = 2 * cfg.timeout + 5

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Run the first pass now (a PeriodicCallback's first tick comes one period late).

        The first pass tries blocked sources again: a restart is how an operator says so.
        """
        await self.refresh_due(first=True)
        self._timer = PeriodicCallback(self._tick, self.cfg.interval * 1000)
        self._timer.start()

    def stop(self) -> None:
        """Stop the timer and pending retries; in-flight fetches go on (see drain)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        for state in self.states.values():
            if state.retry_handle is not None:
                IOLoop.current().remove_timeout(state.retry_handle)
                state.retry_handle = None

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for in-flight fetches, then cancel them.

        Cancelled fetches still release their Redis locks (``finally`` in _refresh_locked).
        """
        flights = [s.flight for s in self.states.values() if s.flight is not None and not s.flight.done()]
        flights += [t for t in self._tasks if not t.done()]
        if not flights:
            return
        done, pending = await asyncio.wait(flights, timeout=timeout)
        for f in pending:
            f.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, tracked so drain() can wait for it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _tick(self) -> None:
        self._spawn(self.refresh_due())

    async def refresh_due(self, first: bool = False) -> None:
        """One pass: sync every source with Redis and fetch those that need it.

        The first pass lifts blocks (a restart is the operator's "try again"): the next
        fetch, now or when the value falls due, says whether the source still fails.
        """
        for name in self.sources:
            if first:
                try:
                    if await self.store.clear_blocked(name):
                        logger.warning("source %s: restart: lifting the block; the next fetch tries again", name)
                except RedisError:
                    pass
            state = self.states[name]
            now = time.time()
            if not first and (state.blocked(now) or now < state.retry_at):
                await self.mirror.read(name)  # keep serving (and reconciling) what Redis holds
                continue
            await self._attempt(name, Want(retry_blocked=first))

    async def _attempt(self, name: str, want: Want | None = None) -> None:
        """A background refresh: failures are logged and scheduled by _fly, not raised."""
        want = want or Want()
        try:
            await self.refresh(name, force=want.force, retry_blocked=want.retry_blocked)
        except (Unavailable, UpstreamError):
            pass

    # --- reading -------------------------------------------------------------------------

    async def current(self, name: str) -> Entry:
        """The valid value to serve now (see Mirror.current).  Never calls upstream."""
        return await self.mirror.current(name)

    # --- refreshing ----------------------------------------------------------------------

    def _needed(self, entry: Entry | None, want: Want) -> bool:
        """Whether a fetch is needed, given the freshest entry known."""
        if entry is None or entry.remaining() <= 0:
            return True
        if not want.force:
            return entry.remaining() < self.cfg.ahead and time.time() >= entry.same_until
        if want.old is not None and want.old != entry.value:
            return False  # someone already rotated it: the caller gets the new one
        if want.min_interval and time.time() - entry.fetched_at < self.cfg.force_min_interval:
            return False
        return True

    def _fresh(self, name: str, want: Want) -> Entry | None:
        """The entry that answers ``want`` without a fetch, or None when one is needed."""
        entry = self.states[name].entry
        return None if self._needed(entry, want) else entry

    def _gate(self, name: str, want: Want, snap: Snapshot | None) -> None:
        """Raise unless a call for ``name`` may reach WeChat now (the one place that says so)."""
        state = self.states[name]
        now = time.time()
        block = state.blocked(now)
        if block is not None:
            if not want.retry_blocked:
                raise Blocked(why_unavailable(name, state, now))
            logger.warning("source %s: trying again despite errcode %s, as asked", name, block.errcode)
        if want.force and now < state.force_spent_until:
            raise Blocked(f"source {name}: today's forced refreshes are used up (45009); the current value is served until it is renewed")
        if want.ignore_backoff:
            return
        wait = max(state.retry_at - now, snap.backoff if snap is not None else 0.0)
        if wait > 0:
            raise BackingOff(f"source {name}: backing off after a failed fetch; next try in {wait:.1f}s", wait)

    async def refresh(
        self,
        name: str,
        *,
        force: bool = False,
        old: str | None = None,
        min_interval: bool = True,
        retry_blocked: bool = False,
        ignore_backoff: bool = False,
    ) -> Entry:
        """A valid value of ``name``, fetched now if needed (see :class:`Want` for the arguments).

        Raises UpstreamError or Unavailable (Blocked, BackingOff, DependencyUnavailable).
        """
        want = Want(force, old, min_interval, retry_blocked, ignore_backoff)
        state = self.states[name]
        while state.flight is not None and not state.flight.done():
            # Join the flight under way.  A value newer than the one known when joining
            # answers a forced refresh too; one it found fresh answers if it suffices.
            # (A flight that has landed may still sit in state.flight until _landed runs:
            # awaiting it again would not yield, so the loop only joins flights in the air.)
            seen = state.entry.version if state.entry is not None else -1
            try:
                entry = await self._landing(state.flight)
            except (Blocked, BackingOff):
                if want.retry_blocked or want.ignore_backoff:
                    continue  # the gate said no to that flight, not to this caller
                raise
            if entry.version > seen or not self._needed(entry, want):
                return entry
        flight = asyncio.ensure_future(self._fly(name, want))
        state.flight = flight
        flight.add_done_callback(partial(_landed, state))
        return await self._landing(flight)

    @staticmethod
    async def _landing(flight: asyncio.Future[Entry]) -> Entry:
        try:
            return await asyncio.shield(flight)
        except asyncio.CancelledError:
            if flight.cancelled():  # drain() gave up on it at shutdown
                raise Unavailable("server shutting down") from None
            raise

    async def _fly(self, name: str, want: Want) -> Entry:
        state = self.states[name]
        started = time.monotonic()
        try:
            entry = await self._refresh_locked(name, want)
        except Blocked:
            raise
        except BackingOff as e:
            if state.retry_handle is None:
                self._schedule_retry(name, e.delay + random.uniform(0, 0.2))
            raise
        except DependencyUnavailable as e:
            # Not this source's failure: no backoff; _wake_dependents retries it as soon
            # as the dependency has a value again.
            if state.last_error != str(e):
                logger.warning("source %s: waiting: %s", name, e)
            state.last_error = str(e)
            raise
        except (UpstreamError, Unavailable) as e:
            self._failed(name, e, time.monotonic() - started)
            raise
        except Exception as e:  # Redis failing mid-way, or a bug: neither may skip the backoff
            redis_failed = isinstance(e, RedisError)
            if not redis_failed:
                logger.exception("source %s: unexpected error while refreshing", name)
            err = Unavailable(f"{'redis' if redis_failed else 'internal'} error: {type(e).__name__}")
            self._failed(name, err, time.monotonic() - started)
            raise err from None
        self._wake_dependents(name)
        return entry

    def _wake_dependents(self, name: str) -> None:
        """Refresh the sources templating ``name`` that wait for it (no value, or due)."""
        if self._stopping:
            return
        now = time.time()
        for other, source in self.sources.items():
            state = self.states[other]
            if name in source.deps and state.flight is None and self._needed(state.entry, Want()):
                if state.blocked(now) is None and now >= state.retry_at:
                    self._spawn(self._attempt(other))

    async def _refresh_locked(self, name: str, want: Want) -> Entry:
        state = self.states[name]
        snap = await self.mirror.read(name)
        if fresh := self._fresh(name, want):
            return fresh
        if snap is None:  # reads skip Redis after an error: ask it once more for the lock
            try:
                snap = await self.mirror.read_now(name)
            except RedisError:
                return await self._refresh_without_redis(name, want)
            if fresh := self._fresh(name, want):
                return fresh
        self._gate(name, want, snap)
        # Dependencies first, so this source's lock is never held while waiting for them.
        values = await self._dependency_values(name)
        deadline = time.monotonic() + self.lock_lease + self.cfg.timeout
        while True:
            try:
                token = await self.store.acquire(name, self.lock_lease)
            except RedisError:
                return await self._refresh_without_redis(name, want, values)
            if token is not None:
                break
            seen = await self._wait_for_other(name, snap.version, deadline)
            if seen is None:
                raise Unavailable(f"source {name}: another instance holds the refresh lock")
            # A value stored since we asked answers a forced refresh too, as a joined
            # flight does in one process.  Else the holder let go: take the lock in turn
            # (its failure, if any, is announced: the gate under the lock will say so).
            if seen.entry is not None and seen.version != snap.version and (want.force or not self._needed(seen.entry, want)):
                return seen.entry
            if fresh := self._fresh(name, want):
                return fresh
            snap = seen  # the next wait looks for a change from here
        try:
            snap = await self.mirror.read_now(name)  # under the lock: did someone refresh meanwhile?
            if fresh := self._fresh(name, want):
                return fresh
            self._gate(name, want, snap)
            return await self._fetch_and_store(name, want.force, values, snap.version, token)
        except UpstreamError as e:
            if e.kind is ErrorKind.QUOTA and want.force and self.sources[name].cfg.force:
                # stable_token: 45009 to force_refresh means the 20 forced calls of the day
                # are spent, not the source: ordinary refreshes go on.
                state.force_spent_until = next_quota_reset(time.time())
                logger.error("source %s: forced refreshes used up for today (errcode 45009: %s); ordinary refreshes go on", name, e.errmsg)
                raise Blocked(f"source {name}: today's forced refreshes are used up (45009)") from None
            # Announce before releasing the lock, so no other instance slips a call in.
            await self._announce(name, e, snap)
            rotates = want.force or not self.sources[name].cfg.force  # classic: every call issues one
            if rotates and e.maybe_issued and state.entry is not None:
                # The answer was lost, not the call: WeChat may have issued a token we never
                # saw, leaving the stored one 5 minutes.  Let it be refreshed in time.
                await self._cap(name, state.entry.value)
            raise
        finally:
            try:
                await asyncio.shield(self.store.release(name, token))
            except RedisError:
                pass  # the lease expires by itself

    async def _cap(self, name: str, value: str) -> None:
        """Shorten ``value``'s life to WeChat's overlap for a "previous" token, in Redis and memory."""
        try:
            if await self.store.cap_life(name, value, PREVIOUS_TOKEN_LIFE):
                await self.mirror.read_now(name)
        except RedisError:
            pass

    async def _refresh_without_redis(self, name: str, want: Want, values: dict[str, str] | None = None) -> Entry:
        """Redis is unreachable: no lock, no fencing.  Refresh in memory only a value about
        to expire: earlier, another instance may be refreshing too, and two fetches retire
        each other's tokens.  A forced refresh needs the lock, except the operator's."""
        entry = self.states[name].entry
        if want.force and not want.ignore_backoff:
            raise Unavailable(f"source {name}: redis unreachable; a forced refresh needs its lock, try again shortly")
        if not want.force and entry is not None and entry.remaining() > self.cfg.interval + self.cfg.timeout:
            return entry
        self._gate(name, want, None)
        if values is None:
            values = await self._dependency_values(name)
        return await self._fetch_and_store(name, want.force, values, None, None)

    async def _announce(self, name: str, err: UpstreamError, snap: Snapshot) -> None:
        """Tell the other instances: back off (transient), or make no call (fatal, quota)."""
        state = self.states[name]
        try:
            if err.kind is ErrorKind.TRANSIENT:
                failures = max(state.failures, snap.failures) + 1
                state.failures = failures - 1  # _failed adds ours: the count is the cluster's
                await self.store.set_backoff(name, self._backoff_floor(failures, err), failures)
            elif err.kind is ErrorKind.FATAL:
                await self.store.set_blocked(name, Block("fatal", err.errcode or 0, err.errmsg), None)
            elif err.kind is ErrorKind.QUOTA:
                now = time.time()
                await self.store.set_blocked(name, Block("quota", err.errcode or 0, err.errmsg), next_quota_reset(now) - now)
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

    async def _fetch_and_store(
        self, name: str, force: bool, values: dict[str, str], read_version: int | None, token: str | None
    ) -> Entry:
        """Call upstream and store the value, fenced by ``read_version`` (None: Redis is
        unreachable, keep it in memory).  ``token`` is the lock held, renewed before a retry."""
        fetched_at = time.time()
        fetched = await self._call_upstream(name, force, values, token)
        life = min(fetched.expires_in, self.cfg.max_ttl)
        state = self.states[name]
        self._succeeded(name)
        current = state.entry
        if not force and current is not None and fetched.value == current.value and current.remaining() > 0:
            return await self._confirmed(name, current, fetched_at + life)
        # Not stored yet: one version above the one it is based on, so that it counts as
        # newer than what Redis held (Mirror puts it back when Redis returns).
        base = read_version if read_version is not None else current.version if current else 0
        memory = Entry(fetched.value, fetched_at + life, fetched_at, base + 1, fetched.field)
        stored: Entry | None = None
        if read_version is not None:
            try:
                stored = await self.store.write(name, fetched.value, life, fetched_at, fetched.field, read_version)
                if stored is None:
                    return await self._fenced_out(name, fetched, memory)
            except RedisError:
                pass
        if stored is None:
            state.entry = memory
            logger.warning("source %s: new value %s... kept in memory only (redis unreachable)", name, fetched.value[:6])
            return memory
        state.entry = stored
        logger.info("source %s: new value %s... stored, life %.0fs", name, stored.value[:6], life)
        return stored

    async def _confirmed(self, name: str, current: Entry, expires_at: float) -> Entry:
        """Upstream answered with the value we hold: stable_token in normal mode does until
        WeChat renews it (about 300 s before expiry).  Asking every tick until then would
        only burn calls, so no instance asks again for half of its remaining life.  Nothing
        is rewritten: it is no new value (no new version, force_min_interval not re-armed)."""
        now = time.time()
        until = now + max(self.cfg.interval, (min(expires_at, current.expires_at) - now) / 2)
        entry = dataclasses.replace(current, same_until=until)
        self.states[name].entry = entry
        try:
            await self.store.mark_same(name, current.value, until)
        except RedisError:
            pass
        logger.info("source %s: upstream returned the same value (%.0fs left); next try in %.0fs", name, current.remaining(), until - now)
        return entry

    def _succeeded(self, name: str) -> None:
        """An upstream call answered with a value: the source is healthy again."""
        state = self.states[name]
        if state.failures or state.block:
            logger.info("source %s: recovered after %d failed attempts", name, state.failures)
        state.healthy()
        state.block, state.stale_recovery_failed = None, False

    async def _fenced_out(self, name: str, fetched: Fetched, memory: Entry) -> Entry:
        """Another process stored a value while our (slow) fetch ran: keep theirs."""
        snap = await self.mirror.read_now(name)
        if snap.entry is None:
            self.states[name].entry = memory
            return memory
        if snap.entry.value != fetched.value:
            # Our fetch may have been issued after theirs, making theirs WeChat's
            # "previous" token, valid 5 more minutes only.  Let it be refreshed soon.
            await self.store.cap_life(name, snap.entry.value, PREVIOUS_TOKEN_LIFE)
        logger.warning("source %s: a value was stored while our fetch ran; keeping it, discarding ours", name)
        return snap.entry

    async def _call_upstream(self, name: str, force: bool, values: dict[str, str], token: str | None) -> Fetched:
        """One upstream call; on a stale dependency (40001...), refresh it once and retry once.

        If that recovery already failed and this source has not succeeded since, a stale
        answer is an ordinary failure: forcing the token again would rotate it (and cut
        every business server's copy to 5 minutes) on every retry, in every instance.
        """
        source = self.sources[name]
        state = self.states[name]
        try:
            return await self._upstream_fetch(source, values, force)
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
        await self._keep_lock(name, token)
        for dep in source.deps:
            try:
                values[dep] = (await self.refresh(dep, force=True, old=values[dep], min_interval=False)).value
            except (UpstreamError, Unavailable) as err:
                state.stale_recovery_failed = True  # not again on every tick while the token fails
                raise DependencyUnavailable(f"{dep} could not be refreshed ({err})") from None
        await self._keep_lock(name, token)
        try:
            return await self._upstream_fetch(source, values, force)
        except UpstreamError as e:
            if e.kind is ErrorKind.STALE_TOKEN:
                state.stale_recovery_failed = True
                e.kind = ErrorKind.TRANSIENT  # from now on, backed off like any failure
            raise

    async def _keep_lock(self, name: str, token: str | None) -> None:
        """Renew the lease before more calls under the lock; give up if it was lost."""
        if token is None:
            return
        try:
            held = await self.store.extend(name, token, self.lock_lease)
        except RedisError:
            return  # cannot tell; fencing still guards the write
        if not held:
            raise Unavailable(f"source {name}: lost the refresh lock; another instance takes over")

    async def _upstream_fetch(self, source: Source, values: dict[str, str], force: bool) -> Fetched:
        """One counted, timed upstream call."""
        self.states[source.name].upstream_calls += 1
        started = time.monotonic()
        result = "ok"
        try:
            return await self.upstream.fetch(source, source.build_request(values, force))
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
            return await self.refresh(dep)
        except (UpstreamError, Unavailable) as e:
            if state.entry is not None and state.entry.remaining() > 0:
                return state.entry  # not renewed now, but still valid
            raise DependencyUnavailable(f"{dep} has no valid value ({e})") from None

    # --- failures ------------------------------------------------------------------------

    def _block(self, name: str, block: Block, how: str) -> None:
        state = self.states[name]
        now = time.time()
        state.block = block
        state.block_until = next_quota_reset(now) if block.kind == "quota" else math.inf
        if state.retry_handle is not None:
            IOLoop.current().remove_timeout(state.retry_handle)
            state.retry_handle = None
        if block.kind == "quota":
            logger.error(
                "source %s: daily quota reached (errcode %s: %s, %s); no calls until %s (or an operator's forced refresh)",
                name, block.errcode, block.errmsg, how, datetime.datetime.fromtimestamp(state.block_until, CHINA).isoformat(),
            )
        else:
            m = UpstreamError(ErrorKind.FATAL, "", block.errcode, block.errmsg).ip
            ip = f"; WeChat saw our IP as {m}: add it to the account's IP whitelist" if m else ""
            logger.error(
                "source %s: BLOCKED after errcode %s (%s, %s)%s; no more calls until an operator's forced refresh or a restart",
                name, block.errcode, block.errmsg, how, ip,
            )

    def _failed(self, name: str, err: Exception, elapsed: float) -> None:
        state = self.states[name]
        state.failures += 1
        state.last_error = str(err)
        if isinstance(err, UpstreamError) and err.kind in (ErrorKind.FATAL, ErrorKind.QUOTA):
            kind = "quota" if err.kind is ErrorKind.QUOTA else "fatal"
            self._block(name, Block(kind, err.errcode or 0, err.errmsg), f"after {elapsed:.2f}s")
            return
        floor = self._backoff_floor(state.failures, err)
        delay = random.uniform(floor, 2 * floor)
        state.retry_at = time.time() + delay
        entry = state.entry
        serving = f"serving the old value ({entry.remaining():.0f}s left)" if entry and entry.remaining() > 0 else "no valid value"
        logger.warning(
            "source %s: fetch failed after %.2fs (attempt %d): %s; %s; retry in %.1fs",
            name, elapsed, state.failures, err, serving, delay,
        )
        self._schedule_retry(name, delay)

    def _backoff_floor(self, failures: int, err: Exception) -> float:
        return backoff_floor(self.cfg.backoff_max, failures, getattr(err, "retry_after", 0.0))

    def _schedule_retry(self, name: str, delay: float) -> None:
        state = self.states[name]
        if state.retry_handle is not None:
            IOLoop.current().remove_timeout(state.retry_handle)
        state.retry_handle = IOLoop.current().call_later(delay, self._retry, name)

    def _retry(self, name: str) -> None:
        self.states[name].retry_handle = None
        if not self._stopping:
            self._spawn(self._attempt(name))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: state, seconds left, failures, last error (no values): for /status."""
        out = {}
        now = time.time()
        for name, s in self.states.items():
            block = s.blocked(now)
            st = ("quota" if block.kind == "quota" else "blocked") if block else "backoff" if s.failures else "ok"
            out[name] = {
                "state": st,
                "expires_in": int(s.entry.remaining(now)) if s.entry and s.entry.remaining(now) > 0 else 0,
                "failures": s.failures,
                "last_error": s.last_error,
                "upstream_calls": s.upstream_calls,
            }
        return out
