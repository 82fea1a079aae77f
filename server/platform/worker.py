"""Works one platform's schedule in this instance: claims due authorizers in bounded batches
and refreshes each (its token through ``api_authorizer_token``, or its JS-SDK ticket).

No timer or task per authorizer: one ``PeriodicCallback`` per platform looks at the schedule
every ``platform.tick`` seconds and claims at most ``min(platform.batch, free slots)``
members, with at most ``platform.concurrency`` refreshes running; when a look came back full it
looks again as soon as a slot frees, so a backlog drains at the speed the slots allow.

What each answer does to an authorizer:

- success: token (and a new refresh token, if WeChat returned one) stored, fenced; next due at
  its expiry minus ``refresh.ahead`` minus jitter;
- 61023 (refresh token invalid) or 61003 (authorisation withdrawn): that authorizer is blocked
  (``state: blocked``) and taken off the schedule; the others go on.  An answer to a refresh
  token replaced meanwhile (a re-authorisation) blocks nothing and keeps it scheduled;
- 40001 / 40014 / 42001: the component token was rejected: it is refreshed once, compare-and-
  refresh (``old=``), and the authorizer retried in a second or two; a component token
  rejected right after it was rotated in for a rejection is noted
  (``Refresher.note_rejected_after_rotation``, like the API proxy's) and never rotated again:
  the authorizers back off instead;
- a fatal errcode (61004: this server's IP is not on the platform's whitelist, ...): the
  platform itself is refused, so this instance claims nothing for ``refresh.backoff_max``;
- anything else: retried after an exponential backoff with jitter, counted per authorizer; a
  call whose answer was lost (timeout, HTTP error) cuts the stored token's life to
  ``refresh.overlap`` (WeChat may have issued its successor) and retries before that.

A jsapi ticket's failures back off by kind, counted per authorizer in Redis
(``ticket_failures``): exponentially for a transient one, ``refresh.backoff_max`` for a fatal
errcode (48001: the account has no JS-SDK), until China's midnight for 45009.  A request for the
ticket claims it only when due (:meth:`Schedule.claim_one` ``due_only``), so nobody who polls
bypasses the backoff.  40001 / 42001 from getticket replaces the authorizer's token once (if
the one used is still current, :meth:`Worker.replace_token`) and retries once.

Claims last ``platform.lease`` seconds, and at least ``refresh.timeout`` + ``LEASE_MARGIN``: a
shorter claim would run out during every call, and nothing would ever be refreshed.

The component token comes from the refresher (``refresher.current``): while it has none (no
verify ticket yet), nothing is claimed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from tornado.ioloop import PeriodicCallback

from server.config import PlatformConfig, RefreshConfig
from server.platform import keys
from server.platform.api import ComponentApi
from server.platform.authorizers import AuthorizerStore
from server.platform.schedule import Claim, Schedule
from server.platform.tickets import VerifyTickets
from server.refresher import Refresher
from server.state import Unavailable, backoff_floor, until_quota_reset
from server.store import Entry
from server.upstream import ErrorKind, UpstreamError

logger = logging.getLogger(__name__)

BLOCKING_CODES = frozenset({61023, 61003})
RETRY_SOON = 2.0  # seconds: after the component token was refreshed, or the authorizer's token is being
POLL = 0.05  # seconds between looks at Redis while another instance fetches a value asked for
#: seconds a claim lasts beyond one call at least: the reads before the call, and the second of
#: slack Worker._run keeps before the lease ends
LEASE_MARGIN = 3.0


@dataclass
class PlatformParts:
    """One platform: its name, component appid and source, and its Redis rooms."""

    name: str
    appid: str
    source: str  # the component_access_token source
    store: AuthorizerStore
    schedule: Schedule
    tickets: VerifyTickets
    api: ComponentApi


class Worker:
    """See the module docstring.  ``start`` / ``stop`` / ``drain`` like the refresher."""

    def __init__(self, parts: PlatformParts, refresher: Refresher, cfg: PlatformConfig, refresh: RefreshConfig) -> None:
        self.p = parts
        self.refresher = refresher
        self.cfg = cfg
        self.refresh = refresh
        self._timer: PeriodicCallback | None = None
        self._running: set[asyncio.Future[Any]] = set()
        self._looking: asyncio.Future[Any] | None = None
        self._backlog = False
        self._stopping = False
        self._now: dict[str, asyncio.Future[None]] = {}  # members fetched on request, single flight
        self.rotations = 0  # tokens this process stored (benchmark, status)
        self.peak_in_flight = 0
        #: monotonic time before which nothing is claimed: WeChat refused the platform itself
        #: (61004: IP not whitelisted, a wrong component appid...), which no authorizer can fix
        self.paused_until = 0.0
        #: the component token this process got by rotating a rejected one: rejected too, it is
        #: not what is wrong (see _component_rejected)
        self._rotated_on_rejection: str | None = None
        #: seconds a claim lasts (see the module docstring)
        self.lease = max(cfg.lease, refresh.timeout + LEASE_MARGIN)
        if self.lease > cfg.lease:
            logger.warning("platform %s: platform.lease %gs leaves no time for a call of refresh.timeout %gs; claims last %gs",
                           parts.name, cfg.lease, refresh.timeout, self.lease)

    def __repr__(self) -> str:
        return f"Worker({self.p.name!r}, {len(self._running)} running)"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._timer = PeriodicCallback(self.look, self.cfg.tick * 1000, jitter=0.1)
        self._timer.start()
        self.look()

    def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for refreshes under way (unfinished claims expire by themselves)."""
        pending = [t for t in self._running if not t.done()]
        if self._looking is not None and not self._looking.done():
            pending.append(self._looking)
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()

    # --- the loop --------------------------------------------------------------------------

    def look(self) -> None:
        """Start one look at the schedule unless one is under way."""
        if self._stopping or (self._looking is not None and not self._looking.done()):
            return
        self._looking = asyncio.ensure_future(self._look())

    async def _look(self) -> None:
        try:
            if await self.p.tickets.sync() or not self._component_ready():
                self._nudge_component()
            if not self._component_ready() or time.monotonic() < self.paused_until:
                return  # nothing can be refreshed without a component token: claim nothing
            free = self.cfg.concurrency - len(self._running)
            want = min(free, self.cfg.batch)
            if want <= 0:
                self._backlog = True
                return
            claims = await self.p.schedule.claim(want, self.lease)
            self._backlog = len(claims) == want
            for claim in claims:
                task = asyncio.ensure_future(self._run(claim))
                self._running.add(task)
                task.add_done_callback(self._done)
            self.peak_in_flight = max(self.peak_in_flight, len(self._running))
        except RedisError as e:
            logger.warning("platform %s: schedule unreachable: %s", self.p.name, type(e).__name__)
        except Exception:
            logger.exception("platform %s: unexpected error while claiming", self.p.name)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if self._backlog and not self._stopping:
            self.look()

    def _component_ready(self) -> bool:
        entry = self.refresher.states[self.p.source].entry
        return entry is not None and entry.remaining() > 0

    def _nudge_component(self) -> None:
        """A verify ticket is known and the component token has no value here: fetch it (or
        read the one another instance stored) now rather than at the refresher's next tick."""
        if self._stopping or not self.p.tickets.source.has_ticket() or self._component_ready():
            return
        state = self.refresher.states[self.p.source]
        if state.flight is None:
            asyncio.ensure_future(self._quiet(self.refresher.refresh(self.p.source)))

    @staticmethod
    async def _quiet(coro: Any) -> None:
        try:
            await coro
        except (Unavailable, UpstreamError, RedisError):
            pass  # the refresher logged it and schedules its retry

    # --- one member ------------------------------------------------------------------------

    async def _run(self, claim: Claim) -> None:
        appid, is_ticket = keys.split_member(claim.member)
        deadline = time.monotonic() + self.lease - 1.0
        try:
            due_in = await (self._ticket(appid) if is_ticket else self._token(appid, claim, deadline))
        except RedisError as e:
            logger.warning("platform %s: authorizer %s: redis error %s; its claim expires and it is retried", self.p.name, appid, type(e).__name__)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("platform %s: authorizer %s: unexpected error", self.p.name, appid)
            due_in = self.refresh.backoff_max
        try:
            await self.p.schedule.finish(claim, due_in)
        except RedisError:
            pass  # the claim expires: the member is due again after its lease

    def due_in(self, life: float) -> float:
        """Seconds until a value of ``life`` seconds is refreshed: ``refresh.ahead`` before its
        expiry (at most half its life), earlier by up to a quarter of that (jitter)."""
        ahead = min(self.refresh.ahead, life / 2)
        return max(1.0, life - ahead - random.uniform(0, ahead / 4))

    def _backoff(self, failures: int, err: UpstreamError) -> float:
        floor = backoff_floor(self.refresh.backoff_max, failures, err.retry_after)
        return random.uniform(floor, 2 * floor)

    async def _delay(self, failures: int, err: UpstreamError) -> float:
        """Seconds before the next try after ``failures`` failures in a row, by the last one's
        kind (server.upstream): until China's midnight for 45009, ``refresh.backoff_max`` for a
        fatal errcode (no operator unblocks an authorizer's ticket: try again, rarely),
        exponential with jitter for anything else."""
        if err.kind is ErrorKind.QUOTA:
            seconds, micros = await self.p.store.redis.time()
            return until_quota_reset(int(seconds) + int(micros) / 1e6) + random.uniform(0, 60)
        if err.kind is ErrorKind.FATAL:
            return self.refresh.backoff_max + random.uniform(0, self.refresh.backoff_max / 4)
        return self._backoff(failures, err)

    async def _component(self) -> Entry:
        return await self.refresher.current(self.p.source)

    async def _token(self, appid: str, claim: Claim, deadline: float) -> float | None:
        """Refresh one authorizer's token; seconds until its next refresh (None: off the schedule)."""
        creds = await self.p.store.credentials(appid)
        if creds.state != "ok" or not creds.refresh_token:
            return None
        try:
            component = await self._component()
        except Unavailable:
            return RETRY_SOON + random.uniform(0, RETRY_SOON)
        if time.monotonic() + self.refresh.timeout > deadline:
            return 0.0  # the claim would run out during the call: let it be claimed afresh
        try:
            answer = await self.p.api.authorizer_token(component.value, appid, creds.refresh_token)
        except UpstreamError as e:
            return await self._failed(appid, creds.refresh_token, component, e)
        token = answer.get("authorizer_access_token")
        expires_in = answer.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            return await self._failed(appid, creds.refresh_token, component, UpstreamError(ErrorKind.TRANSIENT, "answer has no authorizer_access_token"))
        refresh = answer.get("authorizer_refresh_token")
        new_refresh = refresh if isinstance(refresh, str) and refresh and refresh != creds.refresh_token else ""
        life = min(float(expires_in), self.refresh.max_ttl)
        if not await self.p.store.save(appid, token, life, claim.version, new_refresh, authorisation=False):
            logger.warning("platform %s: authorizer %s: a newer token (or a withdrawal) was stored meanwhile; ours discarded", self.p.name, appid)
            return self.due_in(life)
        self.rotations += 1
        logger.debug("platform %s: authorizer %s: token %s... stored, life %.0fs", self.p.name, appid, token[:6], life)
        return self.due_in(life)

    async def _failed(self, appid: str, refresh_token: str, component: Entry, e: UpstreamError) -> float | None:
        if e.errcode in BLOCKING_CODES:
            if await self.p.store.block(appid, refresh_token, e.errcode or 0, e.errmsg):
                await self.p.schedule.note_blocked(appid, True)
                why = "the refresh token is invalid" if e.errcode == 61023 else "the account withdrew the authorisation"
                logger.error("platform %s: authorizer %s BLOCKED: errcode %s (%s); the merchant must authorise again", self.p.name, appid, e.errcode, why)
                return None
            # The refresh token was replaced meanwhile (a re-authorisation): the answer is about
            # the old one.  Stay scheduled (a due time the authorisation set is kept by finish).
            logger.info("platform %s: authorizer %s: errcode %s for a refresh token replaced meanwhile; nothing blocked", self.p.name, appid, e.errcode)
            return RETRY_SOON + random.uniform(0, RETRY_SOON)
        if e.kind is ErrorKind.STALE_TOKEN:
            return await self._component_rejected(appid, component, e)
        if e.kind is ErrorKind.FATAL:
            # The platform's fault, not this authorizer's: pause every claim here, not 10,000 backoffs.
            pause = self.refresh.backoff_max
            if time.monotonic() >= self.paused_until:
                logger.error("platform %s: errcode %s (%s) refreshing authorizer %s: the platform itself is refused; no authorizer refresh for %.0fs",
                             self.p.name, e.errcode, e.errmsg, appid, pause)
            self.paused_until = time.monotonic() + pause
            return pause + random.uniform(0, pause / 4)
        failures = await self.p.store.count_failure(appid)
        delay = self._backoff(failures, e)
        if e.maybe_issued and await self.p.store.cap_life(appid, self.refresh.overlap):
            # No answer: WeChat may have issued a successor nobody received, leaving the stored
            # token valid for the overlap only.  Serve it no longer than that; retry before.
            delay = min(delay, self.refresh.overlap / 2)
            logger.warning("platform %s: authorizer %s: answer lost; its stored token now lives at most %.0fs", self.p.name, appid, self.refresh.overlap)
        logger.warning("platform %s: authorizer %s: refresh failed (attempt %d): %s; retry in %.1fs", self.p.name, appid, failures, e, delay)
        return delay

    async def _component_rejected(self, appid: str, component: Entry, e: UpstreamError) -> float:
        """api_authorizer_token said the component token is invalid: rotate it once (compare-and-
        refresh), unless it is the value a rotation for a rejection just brought, or one any
        instance noted as such: then the token is not what is wrong, and the authorizer backs off."""
        source = self.p.source
        just_rotated = component.value == self._rotated_on_rejection
        if just_rotated or await self.refresher.rejected_after_rotation(source, component.value):
            if just_rotated:
                await self.refresher.note_rejected_after_rotation(source, component.value)
                self._rotated_on_rejection = None
                logger.error("platform %s: errcode %s with the component token just rotated in for a rejection too; not rotating it again",
                             self.p.name, e.errcode)
            failures = await self.p.store.count_failure(appid)
            delay = self._backoff(failures, e)
            logger.warning("platform %s: authorizer %s: refresh failed (attempt %d): %s; retry in %.1fs", self.p.name, appid, failures, e, delay)
            return delay
        logger.warning("platform %s: errcode %s with the component token; refreshing it (if still current)", self.p.name, e.errcode)
        try:
            entry = await self.refresher.refresh(source, force=True, old=component.value, min_interval=False)
        except (Unavailable, UpstreamError, RedisError):
            pass  # the refresher logged it and schedules its retry
        else:
            if entry.value != component.value:
                self._rotated_on_rejection = entry.value
        return RETRY_SOON + random.uniform(0, RETRY_SOON)

    async def _ticket(self, appid: str) -> float | None:
        """Fetch one authorizer's jsapi ticket with its current token."""
        token = await self.p.store.token(appid)
        if token is None:
            state = await self.p.store.state(appid)
            return None if state.get("state") != "ok" else RETRY_SOON
        try:
            answer = await self._getticket(appid, token.value)
        except UpstreamError as e:
            return await self._ticket_failed(appid, e)
        ticket, expires_in = answer.get("ticket"), answer.get("expires_in")
        if not isinstance(ticket, str) or not ticket or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            return await self._ticket_failed(appid, UpstreamError(ErrorKind.TRANSIENT, "getticket answer has no ticket"))
        life = min(float(expires_in), self.refresh.max_ttl)
        await self.p.store.save_ticket(appid, ticket, life)
        return self.due_in(life)

    async def _getticket(self, appid: str, token: str) -> dict[str, Any]:
        """getticket with ``token``; after 40001 / 42001 the token is replaced once (if it is still
        the current one) and the call retried once; raises UpstreamError."""
        try:
            return await self.p.api.jsapi_ticket(token)
        except UpstreamError as e:
            if e.kind is not ErrorKind.STALE_TOKEN:
                raise
            logger.warning("platform %s: authorizer %s: getticket answered %s; replacing its token (if still current)", self.p.name, appid, e.errcode)
            fresh = await self.replace_token(appid, token)
            if fresh is None:
                raise
        try:
            return await self.p.api.jsapi_ticket(fresh)
        except UpstreamError as e:
            if e.kind is ErrorKind.STALE_TOKEN:
                await self.note_rejected(appid, fresh)
            raise

    async def _ticket_failed(self, appid: str, e: UpstreamError) -> float:
        failures = await self.p.store.ticket_failed(appid, e.errcode, str(e))
        delay = await self._delay(failures, e)
        logger.warning("platform %s: authorizer %s: jsapi ticket failed (attempt %d): %s; retry in %.1fs", self.p.name, appid, failures, e, delay)
        return delay

    # --- a rejected authorizer token ------------------------------------------------------------

    async def replace_token(self, appid: str, old: str) -> str | None:
        """WeChat rejected the authorizer's token ``old``: refresh it if ``old`` is still the
        current one (once, across instances).  The token to retry with, or None: none newer, or
        ``old`` was noted by :meth:`note_rejected` (rotating it again would not help)."""
        if await self.p.store.was_rejected(appid, old):
            return None
        current = await self.p.store.token(appid)
        if current is not None and current.value != old:
            return current.value
        await self.fetch_now(appid, create=False, wait=self.refresh.timeout + 1)
        current = await self.p.store.token(appid)
        return current.value if current is not None and current.value != old else None

    async def note_rejected(self, appid: str, token: str) -> None:
        """WeChat rejected ``token`` although :meth:`replace_token` just brought it: noted for its
        remaining life, for every instance, so no caller that retries rotates it again."""
        current = await self.p.store.token(appid)
        life = current.expires_in if current is not None and current.value == token else self.refresh.overlap
        await self.p.store.mark_rejected(appid, token, max(1.0, life))
        logger.warning("platform %s: authorizer %s: WeChat rejects the token just rotated in too; not rotating it again", self.p.name, appid)

    # --- on request ------------------------------------------------------------------------

    async def fetch_now(self, member: str, create: bool, wait: float, due_only: bool = False) -> None:
        """Refresh ``member`` now (a ticket asked for the first time, a token WeChat rejected),
        once per process; if another instance holds its claim, wait up to ``wait`` seconds for
        it to finish.  ``due_only``: not while it is scheduled later (a backoff after a
        failure).  Never raises for an upstream failure (the caller reads what is stored)."""
        flight = self._now.get(member)
        if flight is None or flight.done():
            flight = asyncio.ensure_future(self._fetch_now(member, create, wait, due_only))
            self._now[member] = flight
            flight.add_done_callback(self._forget_flight)
        await asyncio.shield(flight)

    def _forget_flight(self, flight: asyncio.Future[None]) -> None:
        for member, f in list(self._now.items()):
            if f is flight:
                del self._now[member]

    async def _fetch_now(self, member: str, create: bool, wait: float, due_only: bool) -> None:
        claim = await self.p.schedule.claim_one(member, self.lease, create=create, due_only=due_only)
        if claim is not None:
            await self._run(claim)
            return
        # Another instance holds the claim (or the member is off the schedule): wait for it to finish.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and await self._claimed(member):
            await asyncio.sleep(POLL)

    async def _claimed(self, member: str) -> bool:
        return bool(await self.p.schedule.redis.hexists(self.p.schedule.claims_key, member))
