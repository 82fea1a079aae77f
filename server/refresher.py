"""The scheduler: when each source is fetched, once, whatever the crowd does.

- Refresh ahead of expiry: each tick (a ``PeriodicCallback``; the first pass runs at
  ``start``) fetches the sources with no value or fewer than ``refresh.ahead`` seconds left.
- Single flight in the process: every reason to fetch a source (a tick, a forced refresh, a
  dependent source, a retry) joins the one flight already running for it.  Each flight is
  carried out by the :class:`~server.fetcher.Fetcher` (the Redis lock, fencing, lost
  answers): one upstream call per rotation across instances.
- One gate (:meth:`Refresher.gate`) decides whether a call may reach WeChat at all.
  Failures never store anything.  Transient ones back off exponentially with jitter
  (capped at ``refresh.backoff_max``), announced in Redis so every instance follows the
  same backoff, while the old value is served until it really expires.  Fatal ones (bad
  secret, IP not whitelisted...) block the source, and 45009 (daily quota) until midnight
  China time, announced in Redis too; only an operator's forced refresh (the
  ``server.secret`` holder) or a restart tries again.
- Reads never call upstream: :class:`~server.mirror.Mirror` serves Redis's value, or
  memory's while Redis is unreachable, and puts back (checked every second) whatever
  Redis lost.

Durations (backoff, minimum intervals, remaining life) are measured on the monotonic
clock; moments other instances compare are on Redis's clock (see :mod:`server.store`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from tornado.ioloop import IOLoop, PeriodicCallback

from server.config import RefreshConfig
from server.fetcher import CallCounter, Fetcher, LocalCalls
from server.metrics import Metrics
from server.mirror import Mirror
from server.sources import Source
from server.state import (
    BackingOff,
    Blocked,
    DependencyUnavailable,
    NotPermitted,
    SourceState,
    Unavailable,
    Want,
    backoff_floor,
    until_quota_reset,
    why_unavailable,
)
from server.store import Block, Entry, Snapshot, Store
from server.upstream import ErrorKind, Upstream, UpstreamError

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between checks that Redis still holds every value memory holds
MAX_TIMEOUT_GROWTH = 3  # after lost answers a call waits up to 2**3 times refresh.timeout


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
        calls: CallCounter | None = None,
    ) -> None:
        self.sources = dict(sources)  # in dependency order: the ones scheduled and served
        # What the fetcher may still be asked about: the sources, plus those a reload removed
        # while a fetch of theirs was under way (see reconfigure).
        self._known = dict(sources)
        self.store = store
        self.upstream = upstream
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.status)
        #: upstream calls per source today, against the daily quota (server.ops.quota.DailyCalls)
        self.calls = calls or LocalCalls()
        self.states = {name: SourceState() for name in self.sources}
        self._timer: PeriodicCallback | None = None
        self._stopping = False
        self._tasks: set[asyncio.Future[Any]] = set()  # ticks, retries, wake-ups under way
        self.mirror = Mirror(store, self.states, self._announced_block, cfg.read_max_age)
        self.fetcher = Fetcher(self._known, store, upstream, self.mirror, self.states, cfg, self.metrics, self, self.calls)
        self._watch: PeriodicCallback | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Run the first pass now (a PeriodicCallback's first tick comes one period late).

        The first pass tries blocked sources again: a restart is how an operator says so.
        """
        await self.refresh_due(first=True)
        self._timer = PeriodicCallback(self._tick, self.cfg.interval * 1000)
        self._timer.start()
        self._watch = PeriodicCallback(self.mirror.check_soon, CHECK_INTERVAL * 1000)
        self._watch.start()

    def stop(self) -> None:
        """Stop the timer and pending retries; in-flight fetches go on (see drain)."""
        self._stopping = True
        for timer in (self._timer, self._watch):
            if timer is not None:
                timer.stop()
        self._timer = self._watch = None
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
        if flights:
            done, pending = await asyncio.wait(flights, timeout=timeout)
            for f in pending:
                f.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await self.mirror.drain()  # reads still under way (an event's, a request's), before Redis closes

    async def reconfigure(self, sources: Mapping[str, Source]) -> tuple[list[str], list[str]]:
        """Take a reloaded set of sources (in dependency order); returns (added, removed).

        Unchanged and changed sources keep their values and state: a changed request (a new
        secret) is used at the next fetch, with no call now.  Removed ones stop being
        scheduled and served at once; a fetch of theirs under way finishes (its value is
        stored, as every fetched value must be) before their state is forgotten.  Their
        Redis keys stay.  Added ones get their first fetch now, as at startup (a value
        another instance already stored costs no call).
        """
        added = [n for n in sources if n not in self.sources]
        removed = [n for n in self.sources if n not in sources]
        retiring = {n: self._known[n] for n in removed}
        # One step with no await: the scheduler and the handlers see the new set at once.
        self.sources.clear()
        self.sources.update(sources)
        self._known.update(sources)
        for name in added:
            self.states.setdefault(name, SourceState())
        for name in removed:
            flight = self.states[name].flight
            if flight is not None and not flight.done():
                await asyncio.wait([flight])
            if name in self.sources:  # added back by a later reload meanwhile
                continue
            state = self.states.pop(name, None)
            if state is not None and state.retry_handle is not None:
                IOLoop.current().remove_timeout(state.retry_handle)
            if self._known.get(name) is retiring[name]:
                del self._known[name]
        for name in added:
            if name in self.sources:
                await self._attempt(name, Want(retry_blocked=True))
        return added, removed

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
        for name in list(self.sources):
            if name not in self.sources:
                continue  # removed by a reload during this pass
            if first:
                try:
                    if await self.store.clear_blocked(name):
                        logger.warning("source %s: restart: lifting the block; the next fetch tries again", name)
                except RedisError:
                    pass
            state = self.states[name]
            now = time.monotonic()
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

    def needed(self, entry: Entry | None, want: Want) -> bool:
        """Whether a fetch is needed, given the freshest entry known."""
        if entry is None or entry.remaining() <= 0:
            return True
        if not want.force:
            return entry.remaining() < self.cfg.ahead and time.monotonic() >= entry.same_until
        if want.old is not None:
            # The caller proved ``old`` dead (WeChat answered it 40001): replace it whatever
            # its age, once; a caller holding an older value gets the current one.
            return want.old == entry.value
        return not (want.min_interval and entry.age() < self.cfg.force_min_interval)

    def fresh(self, name: str, want: Want) -> Entry | None:
        """The entry that answers ``want`` without a fetch, or None when one is needed."""
        entry = self.states[name].entry
        return None if self.needed(entry, want) else entry

    def gate(self, name: str, want: Want, snap: Snapshot | None) -> None:
        """Raise unless a call for ``name`` may reach WeChat now (the one place that says so)."""
        state = self.states[name]
        now = time.monotonic()
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
        permit: Callable[[], Awaitable[None]] | None = None,
    ) -> Entry:
        """A valid value of ``name``, fetched now if needed (see :class:`Want` for the arguments).

        Raises UpstreamError, Unavailable (Blocked, BackingOff, DependencyUnavailable), or
        whatever ``permit`` raised to refuse this caller's own upstream call.
        """
        want = Want(force, old, min_interval, retry_blocked, ignore_backoff, permit)
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
            except NotPermitted:
                continue  # that flight's caller was refused its call, not this one
            if entry.version > seen or not self.needed(entry, want):
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
            entry = await self.fetcher.run(name, want)
        except (Blocked, NotPermitted):
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
        now = time.monotonic()
        for other, source in self.sources.items():
            state = self.states[other]
            if name in source.deps and state.flight is None and self.needed(state.entry, Want()):
                if state.blocked(now) is None and now >= state.retry_at:
                    self._spawn(self._attempt(other))

    async def rejected_after_rotation(self, name: str, value: str) -> bool:
        """Whether ``value`` was noted by :meth:`note_rejected_after_rotation` in any instance
        (False when Redis cannot tell)."""
        try:
            return await self.store.was_rejected(name, value)
        except RedisError:
            return False

    async def note_rejected_after_rotation(self, name: str, value: str) -> None:
        """WeChat rejected ``value`` although it was just fetched in answer to a rejected one:
        the token is not what is wrong, and rotating again would not help.  Noted for the
        value's remaining life, for every instance (the API proxy asks before it rotates)."""
        entry = self.states[name].entry
        life = entry.remaining() if entry is not None and entry.value == value else self.cfg.overlap
        try:
            await self.store.mark_rejected(name, value, max(1.0, life))
        except RedisError:
            pass

    # --- failures ------------------------------------------------------------------------

    def _announced_block(self, name: str, block: Block, seconds: float) -> None:
        self._block(name, block, "announced by another instance", seconds)

    def _block(self, name: str, block: Block, how: str, seconds: float = math.inf) -> None:
        """No calls for ``name`` during ``seconds`` (a quota block ends at midnight China
        time) or until retried (a fatal block)."""
        state = self.states[name]
        state.block = block
        state.block_until = time.monotonic() + seconds
        if state.retry_handle is not None:
            IOLoop.current().remove_timeout(state.retry_handle)
            state.retry_handle = None
        if block.kind == "quota":
            logger.error(
                "source %s: daily quota reached (errcode %s: %s, %s); no calls for %.0fs, until midnight China time (or an operator's forced refresh)",
                name, block.errcode, block.errmsg, how, seconds,
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
            if err.kind is ErrorKind.QUOTA:
                # Until midnight China time: a calendar moment, so the wall clock (Redis's
                # TTL on NAME:blocked, which every instance follows, is set from Redis's).
                self._block(name, Block("quota", err.errcode or 0, err.errmsg), f"after {elapsed:.2f}s", until_quota_reset(time.time()))
            else:
                self._block(name, Block("fatal", err.errcode or 0, err.errmsg), f"after {elapsed:.2f}s")
            return
        floor = self._backoff_floor(state.failures, err)
        delay = random.uniform(floor, 2 * floor)
        state.retry_at = time.monotonic() + delay
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
        state = self.states.get(name)
        if state is None or name not in self.sources:
            return  # removed by a reload
        state.retry_handle = None
        if not self._stopping:
            self._spawn(self._attempt(name))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: state, seconds left, failures, last error, upstream calls (this
        process's since it started; today's across instances, China time, as last read:
        ``await self.calls.sync()`` first for a fresh figure) and the daily quota (None:
        none configured).  No values: for /status and /metrics."""
        out = {}
        now = time.monotonic()
        for name, s in list(self.states.items()):
            block = s.blocked(now)
            st = ("quota" if block.kind == "quota" else "blocked") if block else "backoff" if s.failures else "ok"
            valid = s.entry is not None and s.entry.remaining() > 0
            source = self._known.get(name)
            waits = source.waiting() if source is not None and st == "ok" and not valid else None
            calls_today, quota = self.calls.today(name)
            out[name] = {
                "state": "waiting" if waits else st,  # e.g. a component token before its first verify ticket
                "expires_in": int(s.entry.remaining()) if s.entry and valid else 0,
                "failures": s.failures,
                "last_error": s.last_error or (waits or ""),
                "upstream_calls": s.upstream_calls,
                "calls_today": calls_today,
                "quota": quota,
            }
        return out
