"""The HTTP API.  Answers have WeChat's own shape so SDKs that take a token URL parse them.

Handlers never call WeChat: they read through the refresher (``current``) or ask it for a
forced refresh.  Every error is JSON ``{"errcode": <HTTP status>, "errmsg": "..."}``
written by the one ``write_error`` below; a 429 also carries ``Retry-After`` (seconds).

Every request passes the gate in ``BaseHandler.prepare`` (see :mod:`server.auth`): IP
allowlist (403), brute-force limit (429), credential (401 / 403), then its query
arguments: each endpoint accepts only the arguments it documents, once each, as UTF-8 of
at most ``MAX_ARG_BYTES``; anything else is a 400 naming the argument.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
from typing import Any

import tornado.web
from tornado.escape import json_encode

from server import __version__
from server.accounts import TYPES as ACCOUNT_TYPES
from server.accounts import Accounts, LookupFailed
from server.auth import OPERATOR, Authenticator, AuthError, Principal
from server.ratelimit import retry_after_header
from server.redact import printable
from server.refresher import Refresher
from server.state import NotPermitted, Unavailable
from server.store import Entry
from server.upstream import UpstreamError

logger = logging.getLogger(__name__)
access_log = logging.getLogger("token_server.access")

#: Longest query argument value accepted (a token is at most 2048 characters, see sources).
MAX_ARG_BYTES = 4096
#: Argument names shown in errors and logs.  At most 15 characters: every configured secret
#: has at least 16, so a secret sent as a name (``?S3CR3T...``) is never echoed or logged.
_ARG_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class ActiveRequests:
    """The requests being handled, so a shutdown can wait for them (``wait_idle``)."""

    def __init__(self) -> None:
        self.handlers: set[tornado.web.RequestHandler] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, handler: tornado.web.RequestHandler) -> None:
        self.handlers.add(handler)
        self._idle.clear()

    def discard(self, handler: tornado.web.RequestHandler) -> None:
        self.handlers.discard(handler)
        if not self.handlers:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when no request is open any more, False after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class Refused(tornado.web.HTTPError):
    """An HTTPError from the gate; ``retry_after`` (seconds) goes out as ``Retry-After``."""

    def __init__(self, err: AuthError) -> None:
        super().__init__(err.status, "%s", err.detail, reason=err.reason)
        self.retry_after = err.retry_after


class Unavailable503(tornado.web.HTTPError):
    """503 with the refresher's short reason, and ``Retry-After`` when it is backing off."""

    def __init__(self, err: Unavailable, what: str) -> None:
        super().__init__(503, "%s: %s", what, err, reason=str(err)[:200])
        delay = getattr(err, "delay", None)
        self.retry_after = math.ceil(delay) if isinstance(delay, (int, float)) else None


class BaseHandler(tornado.web.RequestHandler):
    """JSON errors for every handler; the gate (IP, brute force, credential, arguments) in ``prepare``."""

    needs_auth = True
    check_ip = True
    #: query arguments this endpoint accepts besides ``secret``
    arguments: frozenset[str] = frozenset()
    principal: Principal | None = None
    ip: str | None = None

    def initialize(self, refresher: Refresher, auth: Authenticator, active: ActiveRequests, accounts: Accounts) -> None:
        self.refresher = refresher
        self.auth = auth
        self.active = active
        self.accounts = accounts
        active.add(self)

    def on_finish(self) -> None:
        self.active.discard(self)

    def on_connection_close(self) -> None:
        self.active.discard(self)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.clear_header("Server")

    async def prepare(self) -> None:
        await self.gate()
        self.check_arguments()

    async def gate(self) -> None:
        """IP allowlist, then brute-force limit and credential (see server.auth for the order)."""
        try:
            if self.check_ip:
                self.ip = self.auth.client_ip(self.request)
                self.auth.check_ip(self.ip)
            self.auth.check_query_secret(self.request)
            if self.needs_auth:
                self.principal = await self.auth.authenticate(self.request, self.ip or self.request.remote_ip or "-")
        except AuthError as e:
            raise Refused(e) from None

    def check_arguments(self) -> None:
        """400 for an argument this endpoint does not take, a repeated one, or a value that
        is too long or not UTF-8: ambiguity is refused, never guessed at."""
        for name, values in self.request.query_arguments.items():
            shown = name if _ARG_NAME_RE.match(name) else "?"
            if name not in self.arguments and name != "secret":
                raise tornado.web.HTTPError(400, reason=f"unknown argument {shown}")
            if len(values) > 1:
                raise tornado.web.HTTPError(400, reason=f"repeated argument {shown}")
            if len(values[0]) > MAX_ARG_BYTES:
                raise tornado.web.HTTPError(400, reason=f"argument {shown} too long")
            try:
                values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise tornado.web.HTTPError(400, reason=f"argument {shown} is not UTF-8") from None

    def argument(self, name: str) -> str | None:
        """A query argument checked by check_arguments; None when absent."""
        values = self.request.query_arguments.get(name)
        return values[-1].decode("utf-8") if values else None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's version prints the full URI, query string (and secret) included."""
        where = f"{self.request.method} {printable(self.request.path)}"
        if isinstance(value, tornado.web.HTTPError):
            if value.log_message:
                # Tornado's own HTTPErrors may hold a message with a stray % and no args.
                detail = value.log_message % value.args if value.args else value.log_message
                logger.warning("%d %s: %s", value.status_code, where, detail)
        else:
            logger.error("uncaught exception in %s", where, exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"errcode": status, "errmsg": reason}``; never a traceback or an internal message.

        The reason is the HTTPError's ``reason`` (set by our own handlers for clients) or
        the standard phrase for the status; ``log_message`` goes to the log only.  A 429
        says when to come back in ``Retry-After`` (whole seconds).
        """
        reason = self._reason if status_code != 500 else "internal error"
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.clear()
        self.set_default_headers()
        self.set_status(status_code)
        retry_after = getattr(exc, "retry_after", None)
        if status_code in (429, 503) and isinstance(retry_after, (int, float)):
            self.set_header("Retry-After", retry_after_header(retry_after))
        self.finish({"errcode": status_code, "errmsg": reason})

    def source_name(self) -> str:
        """The source that ``type`` (with ``account`` or ``appid``, else the default account)
        names, checked against the configured sources (400 / 404 / 403).

        ``type`` is a type of the account (``access_token``, ``ticket``...) or, as before
        accounts, a source's full name (``shop.access_token``, or one declared by hand).
        """
        type_ = self.argument("type")
        if not type_:
            raise tornado.web.HTTPError(400, reason="missing type")
        account, appid = self.argument("account"), self.argument("appid")
        name: str | None = type_
        if account is not None or appid is not None:
            try:
                found = self.accounts.find(account, appid)
            except LookupFailed as e:
                raise tornado.web.HTTPError(404, reason=str(e)) from None
            name = found.source(type_) if found is not None else None
        elif type_ not in self.refresher.sources and self.accounts and self.accounts.default is None and type_ in ACCOUNT_TYPES:
            raise tornado.web.HTTPError(400, reason="name the account: account=NAME or appid=APPID")
        if name is None or name not in self.refresher.sources:
            # Only configured names go any further: `type` never reaches Redis or a URL.
            raise tornado.web.HTTPError(404, reason="unknown type")
        if self.principal is not None and not self.principal.may_use(name):
            raise tornado.web.HTTPError(403, "client %s may not use %s", self.principal.name, name, reason="type not allowed for this client")
        return name

    def write_entry(self, entry: Entry) -> None:
        self.finish(encoded_answer(entry.field, entry.value, max(0, int(entry.remaining()))))


class TokenHandler(BaseHandler):
    arguments = frozenset({"type", "account", "appid"})

    async def get(self) -> None:
        """The current value.

        ``GET /wechat/token?type=access_token`` (secret in X-Token-Secret) ->
        ``200 {"access_token": "ACCESS_TOKEN", "expires_in": 5231}``; 503 when there is no
        valid value.
        """
        name = self.source_name()
        try:
            entry = await self.refresher.current(name)
        except Unavailable as e:
            raise tornado.web.HTTPError(503, "%s", e, reason="no valid value: upstream is failing") from None
        self.write_entry(entry)


class ForceRefreshHandler(BaseHandler):
    arguments = frozenset({"type", "old", "account", "appid"})

    async def get(self) -> None:
        """A new value now, unless ``old`` shows someone already rotated it.

        ``GET /wechat/token/forcerefresh?type=access_token&old=OLD_TOKEN`` ->
        ``200 {"access_token": "NEW_TOKEN", "expires_in": 7000}``.  With ``old`` equal to the
        current value, it is replaced (once: the crowd that follows sends a stale ``old``).
        With ``old`` no longer current, or without ``old`` within
        ``refresh.force_min_interval`` of the last fetch, nothing is fetched and the current
        value is returned.  Only a request that starts an upstream call counts toward
        ``server.forcerefresh_per_minute`` (per client and source, across instances); past
        it: ``429`` with ``Retry-After``.
        """
        name = self.source_name()
        old = self.argument("old")
        who = self.principal.name if self.principal else "-"
        # The operator (the server.secret holder) may retry a blocked source and skip the
        # backoff; a business server's forced refresh may not.
        # By the secret, not the name: a JWT may carry any `sub`, "default" included.
        operator = self.principal is not None and self.principal.name == OPERATOR and self.principal.via == "secret"
        permit = self.auth.forcerefresh_permit(self.principal, name) if self.principal is not None else None
        try:
            entry = await self.refresher.refresh(name, force=True, old=old, retry_blocked=operator, ignore_backoff=operator, permit=permit)
        except NotPermitted as e:
            raise Refused(AuthError(429, "too many forced refreshes", str(e), retry_after=e.retry_after)) from None
        except Unavailable as e:
            # Our own short reasons (blocked, backing off, no value): safe to show.
            raise Unavailable503(e, f"forced refresh of {name} by {who}") from None
        except UpstreamError as e:
            raise tornado.web.HTTPError(503, "forced refresh of %s by %s failed: %s", name, who, e, reason="refresh failed: upstream is failing") from None
        self.write_entry(entry)


class HealthHandler(BaseHandler):
    """Outside the IP allowlist: load balancers and probes call it, and it tells nothing."""

    needs_auth = False
    check_ip = False

    def get(self) -> None:
        """Liveness: ``GET /healthz`` -> ``200 {"status": "ok"}``; no secret needed."""
        self.finish({"status": "ok"})


class StatusHandler(BaseHandler):
    async def get(self) -> None:
        """Per source state, for operators (values are never shown).

        ``GET /status`` -> ``200 {"version": "0.10.0", "sources": {"access_token": {"state": "ok",
        "expires_in": 6900, "failures": 0, "last_error": "", "upstream_calls": 1,
        "calls_today": 3, "quota": 2000}}}``.  ``upstream_calls`` counts this process's calls
        since it started; ``calls_today`` every instance's today (China time), read from
        Redis (at most 0.5 s; the last known figure when Redis is slow); ``quota`` is null
        when none is configured.
        """
        await self.refresher.calls.sync()
        allowed = {
            # last_error may repeat an upstream message: mask whatever secret it echoes.
            n: {**s, "last_error": self.auth.redact(s["last_error"])}
            for n, s in self.refresher.status().items()
            if self.principal is None or self.principal.may_use(n)
        }
        self.finish({"version": __version__, "sources": allowed})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        """Prometheus text format (see server.metrics); states and counts, never values.

        ``GET /metrics`` with the secret (Prometheus: ``authorization: {credentials: ...}``) ->
        ``wechat_token_seconds_left{source="access_token"} 6900.0`` ...  The metrics cover
        every source, so only the operator (``server.secret``) or a client configured with
        ``metrics: true`` may read them; anyone else gets 403.
        """
        if self.principal is None or not self.principal.may_read_metrics:
            who = self.principal.name if self.principal else "-"
            raise tornado.web.HTTPError(403, "client %s may not read /metrics", who, reason="metrics not allowed for this client")
        await self.refresher.calls.sync()  # every instance's calls today (bounded: see StatusHandler)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.refresher.metrics.render())


class NotFoundHandler(BaseHandler):
    """Any other path: 404 (403 first for a refused IP), whatever the method and arguments."""

    needs_auth = False

    async def prepare(self) -> None:
        await self.gate()
        raise tornado.web.HTTPError(404, reason="not found")


@functools.lru_cache(maxsize=256)
def encoded_answer(field: str, value: str, expires_in: int, errcode: bool = False) -> bytes:
    """``{"access_token": VALUE, "expires_in": N}`` as sent (WeChat's ``"errcode": 0, "errmsg":
    "ok"`` first with ``errcode``): encoded once per value and second, not once per request."""
    head: dict[str, Any] = {"errcode": 0, "errmsg": "ok"} if errcode else {}
    return json_encode({**head, field: value, "expires_in": expires_in}).encode()


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log: status, method, path without the query string (it may hold the secret),
    milliseconds, client name, how it authenticated, client IP.

    ``200 GET /wechat/token 1.3ms client=shop auth=secret ip=10.0.0.7``
    """
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    principal = getattr(handler, "principal", None)
    access_log.log(
        level,
        "%d %s %s %.1fms client=%s auth=%s ip=%s",
        status,
        printable(handler.request.method or "-", 16),
        printable(handler.request.path),
        1000.0 * handler.request.request_time(),
        principal.name if principal else "-",
        principal.via if principal else "-",
        # The client IP may come from X-Real-IP: bounded like every header-derived string.
        printable(getattr(handler, "ip", None) or handler.request.remote_ip or "-", 64),
    )
