"""The scheduler: refresh each source ahead of expiry, once, whatever the crowd does.

Three layers keep upstream calls to one per rotation:

1. Single flight in the process: every reason to fetch a source (a tick, a forced
   refresh, a dependent source) joins the one flight already running for it.
2. A Redis lock across processes (``Store.acquire``): the loser waits for the winner's
   value instead of calling upstream.  Under the lock the holder reads Redis again and
   skips the call when someone refreshed meanwhile.
3. Fencing on write (``Store.write``): a slow fetch never overwrites a newer value.

Failures never store anything.  Transient ones back off exponentially with jitter
(capped at ``refresh.backoff_max``) while the old value is served until it really
expires; fatal ones (bad secret, IP not whitelisted...) block the source until an
operator forces a refresh or restarts; 45009 (daily quota) stops calls until the quota
resets at midnight China time.

When Redis is unreachable the refresher keeps values fresh in memory, and puts them back
(``Store.restore``) when Redis returns empty, without an upstream call.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from tornado.ioloop import IOLoop, PeriodicCallback

from server.config import RefreshConfig
from server.metrics import Metrics
from server.sources import Fetched, Source
from server.store import Entry, Snapshot, Store
from server.upstream import ErrorKind, Upstream, UpstreamError

logger = logging.getLogger(__name__)

_CHINA = datetime.timezone(datetime.timedelta(hours=8))
BACKOFF_BASE = 1.0  # seconds before the first retry (before jitter)
REDIS_RETRY_DELAY = 1.0  # seconds during which reads skip Redis after it failed
READ_WAIT = 0.5  # seconds a request with a valid value in memory waits for Redis
PREVIOUS_TOKEN_LIFE = 300.0  # seconds WeChat keeps the previous token valid after a new one


def next_quota_reset(now: float) -> float:
    """Unix time of the next midnight in China (UTC+8), when WeChat's daily quotas reset."""
    day = datetime.datetime.fromtimestamp(now, _CHINA).date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(day, datetime.time(0), _CHINA).timestamp()


class Unavailable(Exception):
    """No valid value can be had now; ``str()`` is the short reason shown to clients."""


class BackingOff(Unavailable):
    """Another instance's fetch just failed: wait ``delay`` seconds like it does."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class DependencyUnavailable(Unavailable):
    """A source this one templates in (``<<name>>``) has no valid value and may not be fetched now."""


@dataclass
class SourceState:
    """What this process knows about one source.  Times are unix seconds."""

    entry: Entry | None = None
    failures: int = 0
    retry_at: float = 0.0  # no tick fetches before this (backoff)
    not_before: float = 0.0  # upstream returned the value we had: no tick fetch before this
    blocked: UpstreamError | None = None  # fatal error: no fetch until forced
    quota_until: float = 0.0  # 45009: no fetch before this unless forced
    last_error: str = ""
    upstream_calls: int = 0
    flight: asyncio.Future[Entry] | None = None  # the fetch under way (single flight)
    flight_started: float = 0.0
    retry_handle: object | None = None


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
        self._tasks: set[asyncio.Future[Any]] = set()  # ticks, retries, wake-ups under way
        self._reads: dict[str, asyncio.Future[Snapshot | None]] = {}  # Redis reads under way
        self._redis_down_logged = False
        self._redis_retry_at = 0.0  # monotonic time before which reads skip Redis
        #: a lock outlives every call a flight makes: a dependency's plus two of its own
        self.lock_lease = 3 * cfg.timeout + 5

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Run the first pass now (a PeriodicCallback's first tick comes one period late)."""
        await self.refresh_due()
        self._timer = PeriodicCallback(self._tick, self.cfg.interval * 1000)
        self._timer.start()

    def stop(self) -> None:
        """Stop the timer and pending retries; in-flight fetches go on (see drain)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        for state in self.states.values():
            if state.retry_handle is not None:
                IOLoop.current().remove_timeout(state.retry_handle)
                state.retry_handle = None

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for in-flight fetches, then cancel them.

        Cancelled flights still release their Redis locks (``finally`` in _fly).
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

    async def refresh_due(self) -> None:
        """One pass: sync every source with Redis and fetch those that need it."""
        for name in self.sources:
            state = self.states[name]
            now = time.time()
            if state.blocked is not None or now < max(state.quota_until, state.retry_at, state.not_before):
                await self._read(name)
                continue
            try:
                await self.refresh(name)
            except (UpstreamError, Unavailable):
                pass  # logged and scheduled by _fly

    # --- reading -------------------------------------------------------------------------

    async def current(self, name: str) -> Entry:
        """The valid value to serve now: Redis's, or memory's while Redis is down.

        With a valid value in memory, Redis gets at most ``READ_WAIT`` seconds: a hung
        Redis slows no request.  Raises Unavailable when there is no valid value.
        Never calls upstream.
        """
        state = self.states[name]
        pending = self._read_shared(name)
        snap: Snapshot | None
        if state.entry is not None and state.entry.remaining() > 0:
            try:
                snap = await asyncio.wait_for(asyncio.shield(pending), READ_WAIT)
            except asyncio.TimeoutError:
                self._redis_failed("slow")
                snap = None
        else:
            snap = await asyncio.shield(pending)
        entry = snap.entry if snap is not None and snap.entry is not None else state.entry
        if entry is None or entry.remaining() <= 0:
            raise Unavailable(self._why_unavailable(name))
        return entry

    def _why_unavailable(self, name: str) -> str:
        state = self.states[name]
        if state.blocked is not None:
            return f"source {name} is blocked after errcode {state.blocked.errcode}; see the server log"
        if time.time() < state.quota_until:
            return f"source {name}: daily quota reached (45009)"
        return f"source {name} has no valid value; upstream is failing"

    async def _read(self, name: str) -> Snapshot | None:
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

    def _redis_failed(self, why: str) -> None:
        # Skip Redis for a second: requests answer from memory at once instead of each
        # waiting for a timeout, and nothing hammers a dead Redis.
        self._redis_retry_at = time.monotonic() + REDIS_RETRY_DELAY
        if not self._redis_down_logged:
            logger.error("redis unreachable (%s): serving values held in memory", why)
            self._redis_down_logged = True

    async def _read_redis(self, name: str) -> Snapshot | None:
        """Read Redis and reconcile: adopt Redis's value, unless memory's is newer.

        Memory is newer when Redis lost the value (restarted empty), came back with old
        data, or failed over to a lagging replica, or when this process fetched while
        Redis was unreachable: then memory's value is put back (no upstream call), since
        WeChat may already have retired the one Redis holds.
        """
        if time.monotonic() < self._redis_retry_at:
            return None
        state = self.states[name]
        try:
            snap = await self.store.read(name)
            mem = state.entry
            if mem is not None and mem.remaining() > 1 and (
                snap.entry is None or (snap.entry.version, snap.entry.fetched_at) < (mem.version, mem.fetched_at)
            ):
                if await self.store.restore(name, mem):
                    logger.warning("source %s: redis lacked the newest value; put it back from memory", name)
                snap = await self.store.read(name)
        except RedisError as e:
            self._redis_failed(type(e).__name__)
            return None
        if self._redis_down_logged:
            logger.warning("redis reachable again")
            self._redis_down_logged = False
        if snap.entry is not None:
            state.entry = snap.entry
        return snap

    # --- refreshing ----------------------------------------------------------------------

    def _needed(self, entry: Entry | None, force: bool, old: str | None, min_interval: bool) -> bool:
        """Whether a fetch is needed, given the freshest entry known."""
        if entry is None or entry.remaining() <= 0:
            return True
        if not force:
            return entry.remaining() < self.cfg.ahead
        if old is not None and old != entry.value:
            return False  # someone already rotated it: the caller gets the new one
        if min_interval and time.time() - entry.fetched_at < self.cfg.force_min_interval:
            return False
        return True

    async def refresh(
        self, name: str, *, force: bool = False, old: str | None = None, min_interval: bool = True, unblock: bool = True
    ) -> Entry:
        """A valid value of ``name``, fetched now if needed (or if ``force``).

        ``old``: the value the caller holds; when it is no longer current nothing is
        fetched.  ``min_interval``: a forced refresh within ``refresh.force_min_interval``
        of the last fetch returns that fetch.  ``unblock``: a forced refresh (an operator's)
        tries a blocked or out-of-quota source again.  Raises UpstreamError or Unavailable.
        """
        state = self.states[name]
        if force and unblock:
            state.blocked = None  # an operator's forced refresh tries a blocked source again
            state.quota_until = 0.0
        for _ in range(3):
            flight = state.flight
            if flight is None:
                flight = asyncio.ensure_future(self._fly(name, force, old, min_interval))
                state.flight, state.flight_started = flight, time.time()
                flight.add_done_callback(partial(_landed, state))
                return await asyncio.shield(flight)
            # Join the flight under way.  Its fetch is newer than the caller's value, so it
            # answers a forced refresh too, unless it found the value fresh and fetched nothing.
            started = state.flight_started
            entry = await asyncio.shield(flight)
            if entry.fetched_at >= started or not self._needed(entry, force, old, min_interval):
                return entry
        return entry

    async def _fly(self, name: str, force: bool, old: str | None, min_interval: bool) -> Entry:
        state = self.states[name]
        started = time.monotonic()
        try:
            entry = await self._refresh_locked(name, force, old, min_interval)
        except BackingOff as e:
            # Shared backoff: no failure of ours, no extension of theirs (that would starve
            # the source); just retry when it ends.
            state.retry_at = time.time() + e.delay
            self._schedule_retry(name, e.delay + random.uniform(0, 0.2))
            raise
        except DependencyUnavailable as e:
            # Not this source's failure: no backoff; _wake_dependents retries it as soon
            # as the dependency has a value again.
            if state.last_error != str(e):
                logger.warning("source %s: waiting: %s", name, e)
            state.last_error = str(e)
            raise
        except RedisError as e:
            err = Unavailable(f"redis error: {type(e).__name__}")
            self._failed(name, err, time.monotonic() - started)
            raise err from None
        except (UpstreamError, Unavailable) as e:
            self._failed(name, e, time.monotonic() - started)
            raise
        if state.failures or state.blocked:
            logger.info("source %s: recovered after %d failed attempts", name, state.failures)
        state.failures, state.retry_at, state.blocked, state.last_error = 0, 0.0, None, ""
        self._wake_dependents(name)
        return entry

    def _wake_dependents(self, name: str) -> None:
        """Refresh the sources templating ``name`` that wait for it (no value, or due)."""
        for other, source in self.sources.items():
            state = self.states[other]
            if name in source.deps and state.flight is None and self._needed(state.entry, False, None, True):
                if state.blocked is None and time.time() >= max(state.quota_until, state.retry_at):
                    self._spawn(self._retry_one(other))

    async def _refresh_locked(self, name: str, force: bool, old: str | None, min_interval: bool) -> Entry:
        state = self.states[name]
        snap = await self._read(name)
        if not self._needed(state.entry, force, old, min_interval):
            assert state.entry is not None
            return state.entry
        if snap is None:
            # Redis is down: no lock to take.  Keep the value fresh in memory; the first
            # read after Redis returns puts it back (_read_redis).
            return await self._fetch_and_store(name, force, read_version=None)
        if snap.backoff > 0 and not force:
            raise BackingOff(f"source {name}: another instance's fetch failed; retrying in {snap.backoff:.1f}s", snap.backoff)
        deadline = time.monotonic() + self.lock_lease + self.cfg.timeout
        while True:
            token = await self.store.acquire(name, self.lock_lease)
            if token is not None:
                break
            entry = await self._wait_for_other(name, snap.version, deadline)
            if not self._needed(entry, force, old, min_interval):
                assert entry is not None
                return entry
            if time.monotonic() > deadline:
                raise Unavailable(f"source {name}: another instance holds the refresh lock")
        try:
            snap = await self.store.read(name)  # under the lock: did someone refresh meanwhile?
            if snap.entry is not None:
                state.entry = snap.entry
            if not self._needed(state.entry, force, old, min_interval):
                assert state.entry is not None
                return state.entry
            return await self._fetch_and_store(name, force, snap.version)
        except UpstreamError as e:
            if e.kind is ErrorKind.TRANSIENT:
                # Announce the backoff before releasing the lock, so no other instance
                # slips a call in between.  The count is the cluster's, not ours alone.
                state.failures = max(state.failures, snap.failures)
                try:
                    await self.store.set_backoff(name, self._backoff_floor(state.failures + 1, e), state.failures + 1)
                except RedisError:
                    pass
            raise
        finally:
            try:
                await asyncio.shield(self.store.release(name, token))
            except RedisError:
                pass  # the lease expires by itself

    async def _wait_for_other(self, name: str, version: int, deadline: float) -> Entry | None:
        """Poll while another process holds the lock; its new value, or None if it gave up."""
        delay = 0.05
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            snap = await self.store.read(name)
            if snap.version != version and snap.entry is not None:
                self.states[name].entry = snap.entry
                return snap.entry
            if not await self.store.locked(name):
                snap = await self.store.read(name)
                if snap.version != version and snap.entry is not None:
                    self.states[name].entry = snap.entry
                    return snap.entry
                # The holder released without a new value: its fetch failed.  Do not
                # follow with a call of our own (a crowd would); back off like it does.
                if snap.backoff > 0:
                    raise BackingOff(f"source {name}: the instance holding the refresh lock failed to fetch", snap.backoff)
                raise Unavailable(f"source {name}: the instance holding the refresh lock failed to fetch")
        return None

    async def _fetch_and_store(self, name: str, force: bool, read_version: int | None) -> Entry:
        fetched_at = time.time()
        fetched = await self._call_upstream(name, force)
        life = min(fetched.expires_in, self.cfg.max_ttl)
        state = self.states[name]
        if not force and state.entry is not None and fetched.value == state.entry.value:
            # stable_token in normal mode answers with the same token until WeChat renews
            # it (about 300 s before expiry): asking every tick until then would only
            # burn calls.  Leave it for half of its remaining life.
            state.not_before = fetched_at + max(self.cfg.interval, life / 2)
            logger.info("source %s: upstream returned the same value (%.0fs left); next try in %.0fs", name, life, state.not_before - fetched_at)
        else:
            state.not_before = 0.0
        # Not stored yet: one version above the one it is based on, so that it counts as
        # newer than what Redis held (_read_redis puts it back when Redis returns).
        base = read_version if read_version is not None else state.entry.version if state.entry else 0
        memory = Entry(fetched.value, fetched_at + life, fetched_at, base + 1, fetched.field)
        if read_version is None:
            state.entry = memory
            logger.warning("source %s: new value %s... kept in memory only (redis unreachable)", name, fetched.value[:6])
            return memory
        try:
            stored = await self.store.write(name, fetched.value, life, fetched_at, fetched.field, read_version)
        except RedisError:
            state.entry = memory
            logger.warning("source %s: new value %s... kept in memory only (redis write failed)", name, fetched.value[:6])
            return memory
        if stored is None:
            # Fenced out: another process stored a value while our (slow) fetch ran.
            snap = await self.store.read(name)
            if snap.entry is None:
                state.entry = memory
                return memory
            state.entry = snap.entry
            if snap.entry.value != fetched.value:
                # Our fetch may have been issued after theirs, making theirs WeChat's
                # "previous" token, valid 5 more minutes only.  Let it be refreshed soon.
                await self.store.cap_life(name, snap.entry.value, PREVIOUS_TOKEN_LIFE)
            logger.warning("source %s: a value was stored while our fetch ran; keeping it, discarding ours", name)
            return snap.entry
        state.entry = stored
        logger.info("source %s: new value %s... stored, life %.0fs", name, stored.value[:6], life)
        return stored

    async def _call_upstream(self, name: str, force: bool) -> Fetched:
        """One upstream call with dependencies filled in; on a stale dependency, one retry."""
        source = self.sources[name]
        values = {dep: (await self._dependency(dep)).value for dep in source.deps}
        try:
            return await self._upstream_fetch(source, values, force)
        except UpstreamError as e:
            if e.kind is not ErrorKind.STALE_TOKEN:
                raise
            logger.warning("source %s: errcode %s with the current %s; refreshing it once", name, e.errcode, "/".join(source.deps))
            # Refresh each dependency only if the value we used is still current: when
            # someone else already rotated it, we simply take the new one.
            for dep in source.deps:
                values[dep] = (await self.refresh(dep, force=True, old=values[dep], min_interval=False, unblock=False)).value
            return await self._upstream_fetch(source, values, force)

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

    async def _dependency(self, dep: str) -> Entry:
        """A valid value of ``dep`` for a dependent's request.

        Fetched if due, but never on a dependent's behalf while ``dep`` is blocked, out of
        quota or backing off: that would bypass its backoff on every tick.
        """
        state = self.states[dep]
        if state.blocked is not None or time.time() < max(state.quota_until, state.retry_at):
            if state.entry is not None and state.entry.remaining() > 0:
                return state.entry
            raise DependencyUnavailable(f"{dep} has no valid value ({state.last_error or 'failing'})")
        try:
            return await self.refresh(dep)
        except (UpstreamError, Unavailable) as e:
            raise DependencyUnavailable(f"{dep} has no valid value ({e})") from None

    def _failed(self, name: str, err: Exception, elapsed: float) -> None:
        state = self.states[name]
        state.failures += 1
        state.last_error = str(err)
        now = time.time()
        if isinstance(err, UpstreamError) and err.kind is ErrorKind.FATAL:
            state.blocked = err
            ip = f"; WeChat saw our IP as {err.ip}: add it to the account's IP whitelist" if err.ip else ""
            logger.error(
                "source %s: BLOCKED after errcode %s (%s)%s; no more calls until a forced refresh or restart",
                name, err.errcode, err.errmsg, ip,
            )
            return
        if isinstance(err, UpstreamError) and err.kind is ErrorKind.QUOTA:
            state.quota_until = next_quota_reset(now)
            logger.error(
                "source %s: daily quota reached (errcode 45009: %s); no calls until %s (or a forced refresh)",
                name, err.errmsg, datetime.datetime.fromtimestamp(state.quota_until, _CHINA).isoformat(),
            )
            return
        floor = self._backoff_floor(state.failures, err)
        delay = random.uniform(floor, 2 * floor)
        state.retry_at = now + delay
        entry = state.entry
        serving = f"serving the old value ({entry.remaining():.0f}s left)" if entry and entry.remaining() > 0 else "no valid value"
        logger.warning(
            "source %s: fetch failed after %.2fs (attempt %d): %s; %s; retry in %.1fs",
            name, elapsed, state.failures, err, serving, delay,
        )
        self._schedule_retry(name, delay)

    def _backoff_floor(self, failures: int, err: Exception) -> float:
        """Seconds to wait at least after ``failures`` consecutive failures (the jittered
        delay is between this and twice this): half of 1 s, 2 s, 4 s ... up to half of
        ``refresh.backoff_max``, and at least what the errcode asks (45011: a minute)."""
        cap = min(self.cfg.backoff_max, BACKOFF_BASE * 2 ** max(0, failures - 1))
        return max(cap / 2, getattr(err, "retry_after", 0.0))

    def _schedule_retry(self, name: str, delay: float) -> None:
        state = self.states[name]
        if state.retry_handle is not None:
            IOLoop.current().remove_timeout(state.retry_handle)
        state.retry_handle = IOLoop.current().call_later(delay, self._retry, name)

    def _retry(self, name: str) -> None:
        self.states[name].retry_handle = None
        if self._timer is not None:  # not after stop()
            self._spawn(self._retry_one(name))

    async def _retry_one(self, name: str) -> None:
        try:
            await self.refresh(name)
        except (UpstreamError, Unavailable):
            pass

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: state, seconds left, failures, last error (no values): for /status."""
        out = {}
        now = time.time()
        for name, s in self.states.items():
            st = "blocked" if s.blocked else "quota" if now < s.quota_until else "backoff" if s.failures else "ok"
            out[name] = {
                "state": st,
                "expires_in": int(s.entry.remaining(now)) if s.entry and s.entry.remaining(now) > 0 else 0,
                "failures": s.failures,
                "last_error": s.last_error,
                "upstream_calls": s.upstream_calls,
            }
        return out
