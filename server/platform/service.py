"""Every configured platform, built from the config and run beside the refresher.

``server.app`` calls, in order: :meth:`Platforms.build` (replaces each platform's
component-token source by one that carries the verify ticket), :meth:`load` (the ticket Redis
holds, before the refresher's first pass), :meth:`start` (the workers, after it),
:meth:`routes` (the HTTP endpoints), then :meth:`stop`, :meth:`drain` and :meth:`close` on
shutdown.  Handlers ask this object; it never lets them call WeChat themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from server.config import Config, PlatformConfig, RefreshConfig
from server.platform import config as pconfig
from server.platform import keys
from server.platform.api import ComponentApi
from server.platform.authorizers import AuthorizerStore, Value
from server.platform.crypto import MessageCrypto
from server.platform.events import Events, Receiver
from server.platform.schedule import Schedule
from server.platform.tickets import ComponentTokenSource, VerifyTickets
from server.platform.worker import PlatformParts, Worker
from server.refresher import Refresher
from server.sources import Source
from server.state import Unavailable
from server.store import Store
from server.upstream import ErrorKind, UpstreamError

logger = logging.getLogger(__name__)

#: Seconds a request for a ticket asked for the first time waits for its fetch.
FIRST_TICKET_WAIT = 5.0
#: How long an authorisation code stays claimed (WeChat's codes live an hour).
CODE_CLAIM_SECONDS = 3600
#: Authorizer tokens and tickets remembered per process, to serve while Redis is unreachable.
MEMORY_MAX = 100_000


class Remembered:
    """The last value read from Redis per key, served only while Redis cannot be read (as the
    core serves from memory): with its life counted down on this host's monotonic clock.
    Bounded: past ``MEMORY_MAX`` keys, the oldest is forgotten."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], tuple[Value, float]] = {}

    def keep(self, key: tuple[str, str], value: Value) -> Value:
        self._values.pop(key, None)
        if len(self._values) >= MEMORY_MAX:
            del self._values[next(iter(self._values))]
        self._values[key] = (value, time.monotonic())
        return value

    def get(self, key: tuple[str, str]) -> Value | None:
        found = self._values.get(key)
        if found is None:
            return None
        value, at = found
        left = value.expires_in - (time.monotonic() - at)
        return Value(value.value, left) if left > 0 else None

    def forget(self, key: tuple[str, str]) -> None:
        self._values.pop(key, None)


class NotFound(Exception):
    """No platform has authorised this appid."""


@dataclass
class Platform:
    parts: PlatformParts
    crypto: MessageCrypto
    worker: Worker | None = None


class Platforms:
    """See the module docstring."""

    def __init__(self, store: Store, platforms: dict[str, Platform], cfg: PlatformConfig, refresh: RefreshConfig) -> None:
        self.store = store
        self.by_name = platforms
        self.by_appid = {p.parts.appid: p for p in platforms.values()}
        self.cfg = cfg
        self.refresh = refresh
        self.refresher: Refresher | None = None
        self._located: dict[str, Platform] = {}  # authorizer appid -> its platform (found once)
        self.memory = Remembered()  # what Redis last said, served while it cannot be read
        self.events = Events(
            store.redis, store.prefix,
            {p.parts.appid: Receiver(p.parts.name, p.parts.appid, p.crypto, p.parts.tickets.store,
                                     self._authorized_for(p), self._unauthorized_for(p)) for p in platforms.values()},
            cfg.replay_window,
        )

    def __repr__(self) -> str:
        return f"Platforms({', '.join(self.by_name)})"

    @classmethod
    def build(cls, cfg: Config, store: Store, sources: dict[str, Source]) -> Platforms | None:
        """The platforms of ``cfg`` (None when there is none); ``sources`` gets each platform's
        component-token source in place of the plain one."""
        platforms = {}
        for name, acc in cfg.accounts.items():
            if acc.kind != pconfig.KIND:
                continue
            source_name = pconfig.source_name(name)
            source = ComponentTokenSource(cfg.sources[source_name])
            sources[source_name] = source
            api_base = (acc.api_base or "https://api.weixin.qq.com").rstrip("/")
            parts = PlatformParts(
                name, acc.appid, source_name,
                AuthorizerStore(store.redis, store.prefix, name), Schedule(store.redis, store.prefix, name),
                VerifyTickets(store.redis, store.prefix, name, source), ComponentApi(api_base, acc.appid, cfg.refresh.timeout),
            )
            crypto = MessageCrypto(acc.msg_token, acc.appid, [k for k in (acc.aes_key, acc.previous_aes_key) if k])
            platforms[name] = Platform(parts, crypto)
        return cls(store, platforms, cfg.platform, cfg.refresh) if platforms else None

    def sources(self) -> dict[str, Source]:
        """Each platform's component-token source, the very object its verify tickets feed:
        a reload keeps these in place of plain ones (a platform itself changes by a restart)."""
        return {p.parts.source: p.parts.tickets.source for p in self.by_name.values()}

    # --- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        """Take the verify tickets Redis holds (before the refresher's first pass)."""
        for p in self.by_name.values():
            try:
                await p.parts.tickets.sync()
            except RedisError:
                pass

    def start(self, refresher: Refresher) -> None:
        self.refresher = refresher
        for p in self.by_name.values():
            p.worker = Worker(p.parts, refresher, self.cfg, self.refresh)
            p.worker.start()

    def stop(self) -> None:
        for p in self.by_name.values():
            if p.worker is not None:
                p.worker.stop()

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(p.worker.drain(timeout) for p in self.by_name.values() if p.worker is not None))

    def close(self) -> None:
        for p in self.by_name.values():
            p.parts.api.close()

    # --- authorisations --------------------------------------------------------------------

    def _authorized_for(self, p: Platform) -> Any:
        async def authorized(authorizer: str, code: str) -> None:
            await self.authorize(p, code, expect=authorizer)
        return authorized

    def _unauthorized_for(self, p: Platform) -> Any:
        async def unauthorized(authorizer: str) -> None:
            await self.unauthorize(p, authorizer)
        return unauthorized

    def _worker(self, p: Platform) -> Worker:
        assert p.worker is not None and self.refresher is not None, "Platforms.start() first"
        return p.worker

    async def authorize(self, p: Platform, code: str, expect: str | None = None) -> str | None:
        """Exchange an authorisation code once, across instances; the authorizer's appid, or
        None when the code was already claimed (exchanged, or being exchanged elsewhere).
        Raises Unavailable (no component token) or UpstreamError; the claim is then given
        back so a retry can exchange the code."""
        worker = self._worker(p)
        assert self.refresher is not None
        claim = keys.code_claim(self.store.prefix, p.parts.name, code)
        if not await self.store.redis.set(claim, "1", nx=True, ex=CODE_CLAIM_SECONDS):
            logger.info("platform %s: authorisation code already exchanged (or being exchanged); nothing done", p.parts.name)
            return None
        try:
            component = await self.refresher.current(p.parts.source)
            clock = await self.store.redis.time()
            version = int(clock[0]) * 1_000_000 + int(clock[1])
            info = await p.parts.api.query_auth(component.value, code)
            appid, token = info.get("authorizer_appid"), info.get("authorizer_access_token")
            refresh, expires_in = info.get("authorizer_refresh_token"), info.get("expires_in")
            if not (isinstance(appid, str) and isinstance(token, str) and isinstance(refresh, str) and isinstance(expires_in, (int, float))):
                raise UpstreamError(ErrorKind.TRANSIENT, "api_query_auth answer lacks a field")
        except BaseException:
            try:
                await self.store.redis.delete(claim)
            except RedisError:
                pass
            raise
        if expect and appid != expect:
            logger.warning("platform %s: the code of authorizer %s was issued to %s", p.parts.name, expect, appid)
        life = min(float(expires_in), self.refresh.max_ttl)
        await p.parts.store.save(appid, token, life, version, refresh, authorisation=True)
        await p.parts.schedule.add(appid, worker.due_in(life))
        await p.parts.schedule.note_blocked(appid, False)
        self._located[appid] = p
        logger.info("platform %s: authorizer %s authorised; token %s... stored, life %.0fs", p.parts.name, appid, token[:6], life)
        return appid

    async def unauthorize(self, p: Platform, appid: str) -> None:
        self.memory.forget((p.parts.name + ".token", appid))
        self.memory.forget((p.parts.name + ".ticket", appid))
        await p.parts.schedule.remove(appid, keys.ticket_member(appid))
        await p.parts.schedule.note_blocked(appid, False)
        await p.parts.store.remove(appid)
        logger.warning("platform %s: authorizer %s withdrew its authorisation: no more refreshes, its token removed", p.parts.name, appid)

    # --- reads -----------------------------------------------------------------------------

    async def locate(self, appid: str) -> Platform | None:
        """The platform an authorizer appid belongs to (its state in Redis), or None."""
        found = self._located.get(appid)
        if found is not None:
            return found
        for p in self.by_name.values():
            if await p.parts.store.state(appid):
                if len(self._located) < 100_000:
                    self._located[appid] = p
                return p
        return None

    async def token(self, p: Platform, appid: str) -> Value:
        """The authorizer's current token; Unavailable (with why) when there is none, also
        when Redis cannot be read and this process holds no valid copy."""
        key = (p.parts.name + ".token", appid)
        try:
            value = await p.parts.store.token(appid)
        except RedisError as e:
            return self._remembered(key, appid, e)
        if value is not None:
            return self.memory.keep(key, value)
        raise Unavailable(await self._why(p, appid))

    async def ticket(self, p: Platform, appid: str) -> Value:
        """The authorizer's jsapi ticket, fetched the first time someone asks (then kept fresh);
        while its fetches fail (a backoff), Unavailable with the last failure, no new call."""
        key = (p.parts.name + ".ticket", appid)
        try:
            value = await p.parts.store.ticket(appid)
            if value is None:
                await self._worker(p).fetch_now(keys.ticket_member(appid), create=True, wait=FIRST_TICKET_WAIT, due_only=True)
                value = await p.parts.store.ticket(appid)
            if value is None:
                error = await p.parts.store.ticket_error(appid)
                raise Unavailable(await self._why(p, appid, f"no jsapi ticket; {error or 'it could not be fetched yet'}"))
        except RedisError as e:
            return self._remembered(key, appid, e)
        return self.memory.keep(key, value)

    def _remembered(self, key: tuple[str, str], appid: str, e: RedisError) -> Value:
        value = self.memory.get(key)
        if value is None:
            logger.warning("platform: authorizer %s: redis unreachable (%s) and no valid copy in memory", appid, type(e).__name__)
            raise Unavailable(f"authorizer {appid}: redis unreachable") from None
        return value

    async def refresh_if_current(self, p: Platform, appid: str, old: str) -> str | None:
        """WeChat rejected ``old``: refresh the authorizer's token if ``old`` is still the
        current one (once, across instances); the token to retry with, or None (also when
        ``old`` was already judged: :meth:`note_rejected`, or Redis cannot be reached)."""
        try:
            return await self._worker(p).replace_token(appid, old)
        except RedisError as e:
            logger.warning("platform %s: authorizer %s: cannot replace a rejected token: redis %s", p.parts.name, appid, type(e).__name__)
            return None

    async def note_rejected(self, p: Platform, appid: str, token: str) -> None:
        """WeChat rejected ``token`` right after :meth:`refresh_if_current` brought it: no
        instance rotates it again while it lives."""
        try:
            await self._worker(p).note_rejected(appid, token)
        except RedisError:
            pass

    async def owner_of(self, token: str) -> tuple[Platform, str] | None:
        for p in self.by_name.values():
            appid = await p.parts.store.owner_of(token)
            if appid is not None:
                return p, appid
        return None

    async def _why(self, p: Platform, appid: str, default: str = "no valid token") -> str:
        state = await p.parts.store.state(appid)
        if state.get("state") == "blocked":
            return f"authorizer {appid} is blocked: errcode {state.get('errcode')}; the merchant must authorise the platform again"
        if state.get("state") == "unauthorized":
            return f"authorizer {appid} withdrew its authorisation"
        return f"authorizer {appid}: {default}"

    # --- operators -------------------------------------------------------------------------

    def explain(self) -> dict[str, str]:
        """/readyz: component-token sources waiting for their first verify ticket."""
        out = {}
        for p in self.by_name.values():
            source = p.parts.tickets.source
            if (why := source.waiting()) is not None:
                out[p.parts.source] = why
        return out

    async def status(self, p: Platform, offset: int, count: int, blocked_max: int = 100) -> dict[str, Any]:
        """A summary and one page of authorizers by due time (no token, no refresh token)."""
        counts = await p.parts.schedule.counts()
        page = await p.parts.schedule.page(offset, count)
        clock = await self.store.redis.time()
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        rows = []
        for member, due in page:
            appid, is_ticket = keys.split_member(member)
            state = await p.parts.store.state(appid)
            rows.append({"appid": appid, "what": "jsapi_ticket" if is_ticket else "access_token",
                         "due_in": round((due - now_ms) / 1000, 1), "state": state.get("state", ""),
                         "failures": int(state.get("failures") or 0)})
        blocked = []
        for appid in await p.parts.schedule.blocked(blocked_max):
            state = await p.parts.store.state(appid)
            blocked.append({"appid": appid, "errcode": int(state.get("errcode") or 0)})
        worker = p.worker
        return {
            "platform": p.parts.name, "appid": p.parts.appid,
            "verify_ticket": "held" if p.parts.tickets.source.has_ticket() else "waiting",
            **counts,
            "this_instance": {"rotations": worker.rotations if worker else 0, "peak_in_flight": worker.peak_in_flight if worker else 0,
                              "upstream_calls": dict(p.parts.api.calls), "at": time.time()},
            "offset": offset, "authorizers": rows,
            "blocked_authorizers": blocked,  # at most 100; the merchant must authorise again
        }

    async def page_summary(self) -> dict[str, Any]:
        """The operator's status page's part (server.web): per platform, the counts, the next
        ten authorizers due and up to twenty blocked ones (the merchant must authorise again).
        Bounded whatever the number of authorizers."""
        return {"platforms": [await self.status(p, 0, 10, blocked_max=20) for p in self.by_name.values()]}
