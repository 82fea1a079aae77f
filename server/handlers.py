"""The HTTP API.  Answers have WeChat's own shape so SDKs that take a token URL parse them.

Handlers never call WeChat: they read through the refresher (``current``) or ask it for a
forced refresh.  Every error is JSON ``{"errcode": <HTTP status>, "errmsg": "..."}``
written by the one ``write_error`` below.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.web
from redis.exceptions import RedisError

from server.auth import Authenticator, AuthError, Principal
from server.refresher import Refresher, Unavailable
from server.store import Entry
from server.upstream import UpstreamError

logger = logging.getLogger(__name__)
access_log = logging.getLogger("token_server.access")


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


class BaseHandler(tornado.web.RequestHandler):
    """JSON errors for every handler; authentication in ``prepare``."""

    needs_auth = True
    principal: Principal | None = None

    def initialize(self, refresher: Refresher, auth: Authenticator, active: ActiveRequests) -> None:
        self.refresher = refresher
        self.auth = auth
        self.active = active
        active.add(self)

    def on_finish(self) -> None:
        self.active.discard(self)

    def on_connection_close(self) -> None:
        self.active.discard(self)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.clear_header("Server")

    def prepare(self) -> None:
        if self.needs_auth:
            try:
                self.principal = self.auth.authenticate(self.request)
            except AuthError as e:
                raise tornado.web.HTTPError(e.status, "auth failed: %s", e.reason, reason=e.reason) from None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's version prints the full URI, query string (and secret) included."""
        where = f"{self.request.method} {self.request.path}"
        if isinstance(value, tornado.web.HTTPError):
            if value.log_message:
                logger.warning("%d %s: %s", value.status_code, where, value.log_message % value.args)
        else:
            logger.error("uncaught exception in %s", where, exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"errcode": status, "errmsg": reason}``; never a traceback or an internal message.

        The reason is the HTTPError's ``reason`` (set by our own handlers for clients) or
        the standard phrase for the status; ``log_message`` goes to the log only.
        """
        reason = self._reason if status_code != 500 else "internal error"
        self.clear()
        self.set_default_headers()
        self.set_status(status_code)
        self.finish({"errcode": status_code, "errmsg": reason})

    def source_name(self) -> str:
        """The ``type`` argument, checked against the configured sources (400 / 404 / 403)."""
        names = self.request.query_arguments.get("type")
        if not names or not names[-1]:
            raise tornado.web.HTTPError(400, reason="missing type")
        name = names[-1].decode("utf-8", "replace")
        if name not in self.refresher.sources:
            # Only configured names go any further: `type` never reaches Redis or a URL.
            raise tornado.web.HTTPError(404, reason="unknown type")
        if self.principal is not None and not self.principal.may_use(name):
            raise tornado.web.HTTPError(403, "client %s may not use %s", self.principal.name, name, reason="type not allowed for this client")
        return name

    def write_entry(self, entry: Entry) -> None:
        self.finish({entry.field: entry.value, "expires_in": max(0, int(entry.remaining()))})


class TokenHandler(BaseHandler):
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
    async def get(self) -> None:
        """A new value now, unless ``old`` shows someone already rotated it.

        ``GET /wechat/token/forcerefresh?type=access_token&old=OLD_TOKEN`` ->
        ``200 {"access_token": "NEW_TOKEN", "expires_in": 7000}``.  With ``old`` no longer
        current, or within ``refresh.force_min_interval`` of the last fetch, nothing is
        fetched and the current value is returned.
        """
        name = self.source_name()
        olds = self.request.query_arguments.get("old")
        old = olds[-1].decode("utf-8", "replace") if olds else None
        who = self.principal.name if self.principal else "-"
        try:
            entry = await self.refresher.refresh(name, force=True, old=old)
        except (UpstreamError, Unavailable, RedisError) as e:
            raise tornado.web.HTTPError(503, "forced refresh of %s by %s failed: %s", name, who, e, reason="refresh failed: upstream is failing") from None
        self.write_entry(entry)


class HealthHandler(BaseHandler):
    needs_auth = False

    def get(self) -> None:
        """Liveness: ``GET /healthz`` -> ``200 {"status": "ok"}``; no secret needed."""
        self.finish({"status": "ok"})


class StatusHandler(BaseHandler):
    def get(self) -> None:
        """Per source state, for operators (values are never shown).

        ``GET /status`` -> ``200 {"sources": {"access_token": {"state": "ok", "expires_in": 6900,
        "failures": 0, "last_error": "", "upstream_calls": 1}}}``
        """
        allowed = {n: s for n, s in self.refresher.status().items() if self.principal is None or self.principal.may_use(n)}
        self.finish({"sources": allowed})


class NotFoundHandler(BaseHandler):
    needs_auth = False

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, reason="not found")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string (it may hold the secret)."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    principal = getattr(handler, "principal", None)
    access_log.log(
        level,
        "%d %s %s %.1fms client=%s ip=%s",
        status,
        handler.request.method,
        handler.request.path,
        1000.0 * handler.request.request_time(),
        principal.name if principal else "-",
        handler.request.remote_ip,
    )
