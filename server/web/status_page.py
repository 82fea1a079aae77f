"""The operator's status page: ``/wechat/status/``, a login form, a JSON feed and a refresh button.

Routes (all under the API's IP allowlist, like every endpoint but ``/healthz``):

- ``GET /wechat/status/``: the page (static HTML, CSS and JavaScript from ``static/``, no
  build step, no external asset); 302 to ``login`` without a session.
- ``GET /wechat/status/login``, ``POST /wechat/status/login`` (form field ``secret``):
  see :mod:`server.web.session`.  ``POST /wechat/status/logout`` ends the session.
- ``GET /wechat/status/data``: :func:`server.web.status_view.page_data` plus this session's
  CSRF token; 401 JSON without a session.  The page polls it every few seconds.
- ``POST /wechat/status/refresh`` with ``{"source": NAME}`` and ``X-CSRF-Token``: the
  operator's forced refresh (retries a blocked source, skips the backoff; still one flight,
  ``refresh.force_min_interval`` and ``server.forcerefresh_per_minute`` apply).

No route takes a query argument: the secret never travels in a URL.  Errors of the JSON
routes are the API's JSON errors; the login form answers in HTML.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web
from redis.exceptions import RedisError

from server.accounts import Accounts
from server.auth import OPERATOR, Authenticator, AuthError, Principal
from server.handlers import ActiveRequests, BaseHandler, Refused, Unavailable503
from server.ratelimit import retry_after_header
from server.refresher import Refresher
from server.state import NotPermitted, Unavailable
from server.upstream import UpstreamError
from server.web.session import Sessions
from server.web.status_view import page_data

logger = logging.getLogger(__name__)

#: more of the page's data, read at each poll (bounded to 2 s)
MoreData = Callable[[], Awaitable[dict[str, Any]]]

STATIC = Path(__file__).parent / "static"
#: seconds between two polls of the data endpoint by the page
POLL_SECONDS = 5
#: No script, style or image from anywhere else, no inline script, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CONTENT_TYPES = {".html": "text/html; charset=UTF-8", ".css": "text/css; charset=UTF-8", ".js": "text/javascript; charset=UTF-8"}


@dataclass(frozen=True)
class Assets:
    """The page's files, read once when the app is built (a few kilobytes)."""

    files: dict[str, bytes]

    @classmethod
    def load(cls, directory: Path = STATIC) -> Assets:
        return cls({p.name: p.read_bytes() for p in directory.iterdir() if p.suffix in CONTENT_TYPES})


class PageHandler(BaseHandler):
    """The gate's IP checks, no query argument at all, then the session (see ``require_session``)."""

    needs_auth = False  # the session cookie, checked by each method, is the credential

    def initialize(  # type: ignore[override]  # the API's dependencies plus the page's own
        self, refresher: Refresher, auth: Authenticator, active: ActiveRequests, accounts: Accounts, sessions: Sessions, assets: Assets,
        more: MoreData | None = None,
    ) -> None:
        super().initialize(refresher, auth, active, accounts)
        self.sessions = sessions
        self.assets = assets
        self.more = more
        self.session: str | None = None

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    async def prepare(self) -> None:
        await self.gate()
        if self.request.query_arguments:
            # Not even `secret`, which the API tolerates from direct callers: a URL ends up in
            # the browser's history and in every proxy's log.
            raise tornado.web.HTTPError(400, reason="the status page takes no query arguments")
        sid = self.sessions.session_id(self)
        if sid is not None:
            self.session, self.principal = sid, Principal(OPERATOR, via="session")

    def require_session(self) -> str:
        """The session id; 401 JSON without a valid session."""
        if self.session is None:
            raise tornado.web.HTTPError(401, reason="login required")
        return self.session

    def send_file(self, name: str) -> None:
        self.set_header("Content-Type", CONTENT_TYPES[Path(name).suffix])
        self.finish(self.assets.files[name])


class PageRootHandler(PageHandler):
    def get(self) -> None:
        """``GET /wechat/status`` -> 301 to ``/wechat/status/``."""
        self.redirect("status/", permanent=True)


class StatusPageHandler(PageHandler):
    def get(self) -> None:
        """``GET /wechat/status/`` -> the page (text/html); 302 to ``login`` without a session."""
        if self.session is None:
            self.redirect("login")
            return
        self.send_file("status.html")


class AssetHandler(PageHandler):
    """The page's CSS and JavaScript: no session needed (nothing in them is secret), so the
    login form can use the stylesheet."""

    def get(self, name: str) -> None:
        """``GET /wechat/status/status.css`` -> the file; 404 for any other name."""
        if name not in self.assets.files or name.endswith(".html"):
            raise tornado.web.HTTPError(404, reason="not found")
        self.send_file(name)


class LoginHandler(PageHandler):
    def cross_site(self) -> bool:
        """Whether the browser says the form came from another site.

        ``Sec-Fetch-Site`` decides when the browser sends it (every current one does): only
        ``same-origin`` (or ``none``, typed by the user) passes.  ``Origin`` is no help then:
        this page's ``Referrer-Policy: no-referrer`` makes Chromium send ``Origin: null`` for
        its own form.  Without it (an old browser, or no browser), an ``Origin`` naming
        another host is refused; none at all passes (the secret itself still has to match)."""
        fetch_site = self.request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None:
            return fetch_site not in ("same-origin", "none")
        origin = self.request.headers.get("Origin")
        if origin is None or origin == "null":
            return False
        return urllib.parse.urlsplit(origin).netloc.lower() != (self.request.host or "").lower()

    def get(self) -> None:
        """``GET /wechat/status/login`` -> the login form (text/html)."""
        if self.session is not None:
            self.redirect("./")
            return
        self.login_form("")

    async def post(self) -> None:
        """``POST /wechat/status/login`` with ``secret=...`` (form) -> 303 to ``./`` with the
        session cookie; the form again with 403 (wrong secret, counted), 400 (empty) or 429
        (too many failures from this IP, with ``Retry-After``)."""
        if self.cross_site():
            # Another site's page submitting this form: refused before anything is counted,
            # or any page the operator opens could lock the operator's IP out of the API.
            logger.warning("status page login refused: a cross-site form post from %s", self.ip)
            self.set_status(403)
            self.login_form("refused: the login form must be sent from this page")
            return
        secret = self.get_body_argument("secret", default="", strip=False) or ""
        try:
            self.principal = await self.sessions.check_login(secret, self.ip or self.request.remote_ip or "-")
        except AuthError as e:
            logger.warning("status page login refused (%d): %s", e.status, e.detail)
            self.set_status(e.status)
            if e.retry_after is not None:
                self.set_header("Retry-After", retry_after_header(e.retry_after))
            self.login_form(e.reason)
            return
        logger.info("status page: operator logged in from %s", self.ip)
        self.sessions.start(self)
        self.redirect("./", status=303)

    def login_form(self, error: str) -> None:
        page = self.assets.files["login.html"].decode("utf-8")
        shown = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        self.set_header("Content-Type", CONTENT_TYPES[".html"])
        self.finish(page.replace("<!--error-->", shown))


class LogoutHandler(PageHandler):
    def post(self) -> None:
        """``POST /wechat/status/logout`` (``X-CSRF-Token``) -> ``200 {"logged_out": true}``,
        the cookie cleared."""
        sid = self.require_session()
        if not self.sessions.check_csrf(self, sid):
            raise tornado.web.HTTPError(403, "status page logout without a valid CSRF token from %s", self.ip, reason="missing or wrong CSRF token")
        self.sessions.end(self)
        self.finish({"logged_out": True})


class DataHandler(PageHandler):
    async def get(self) -> None:
        """``GET /wechat/status/data`` -> ``200 {"sources": {...}, "accounts": {...},
        "server_time": 1700000000.0, "csrf": "...", "poll_seconds": 5}`` (see
        server.web.status_view.page_data); 401 without a session."""
        sid = self.require_session()
        try:
            holders = await asyncio.wait_for(self.refresher.store.lock_holders(list(self.refresher.sources)), 0.5)
        except (RedisError, asyncio.TimeoutError):
            holders = {}  # the page still shows what this process knows
        data = page_data(self.refresher, self.accounts, self.auth.redact, holders)
        if self.more is not None:  # e.g. the third-party platforms' summaries (server.platform)
            try:
                data.update(await asyncio.wait_for(self.more(), 2.0))
            except (RedisError, asyncio.TimeoutError):
                pass  # the page still shows the sources
        self.finish({**data, "csrf": self.sessions.csrf_token(sid), "poll_seconds": POLL_SECONDS})


class RefreshHandler(PageHandler):
    async def post(self) -> None:
        """The operator's forced refresh of one source.

        ``POST /wechat/status/refresh`` with ``{"source": "access_token"}`` and
        ``X-CSRF-Token`` -> ``200 {"source": "access_token", "expires_in": 7000, "new": true}``
        (``new``: false when the value of a fetch within ``refresh.force_min_interval`` was
        returned).  401 without a session, 403 without the CSRF token, 404 for an unknown
        source, 429 over ``server.forcerefresh_per_minute``, 503 when WeChat refuses.
        """
        sid = self.require_session()
        if not self.sessions.check_csrf(self, sid):
            raise tornado.web.HTTPError(403, "status page refresh without a valid CSRF token from %s", self.ip, reason="missing or wrong CSRF token")
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON") from None
        name = body.get("source") if isinstance(body, dict) else None
        if not isinstance(name, str) or name not in self.refresher.sources:
            raise tornado.web.HTTPError(404, reason="unknown source")
        principal = self.principal or Principal(OPERATOR, via="session")
        before = self.refresher.states[name].entry
        try:
            entry = await self.refresher.refresh(
                name, force=True, retry_blocked=True, ignore_backoff=True, permit=self.auth.forcerefresh_permit(principal, name)
            )
        except NotPermitted as e:
            raise Refused(AuthError(429, "too many forced refreshes", str(e), retry_after=e.retry_after)) from None
        except Unavailable as e:
            raise Unavailable503(e, f"status page forced refresh of {name}") from None
        except UpstreamError as e:
            raise tornado.web.HTTPError(503, "status page forced refresh of %s failed: %s", name, e, reason="refresh failed: upstream is failing") from None
        new = before is None or entry.version != before.version
        logger.info("status page: operator forced a refresh of %s (%s)", name, "new value" if new else "recent value kept")
        self.finish({"source": name, "expires_in": max(0, int(entry.remaining())), "new": new})


class PageNotFoundHandler(PageHandler):
    async def prepare(self) -> None:
        await self.gate()  # a refused IP gets its 403 first, as everywhere
        raise tornado.web.HTTPError(404, reason="not found")


def status_page_routes(sessions: Sessions, deps: dict[str, Any], assets: Assets | None = None, more: MoreData | None = None) -> list[Any]:
    """The page's routes, each handler given ``deps`` (the API's) plus the sessions and files;
    ``more()`` adds its keys to the page's data (the third-party platforms' summaries)."""
    args = {**deps, "sessions": sessions, "assets": assets or Assets.load(), "more": more}
    return [
        (r"/wechat/status", PageRootHandler, args),
        (r"/wechat/status/", StatusPageHandler, args),
        (r"/wechat/status/login", LoginHandler, args),
        (r"/wechat/status/logout", LogoutHandler, args),
        (r"/wechat/status/data", DataHandler, args),
        (r"/wechat/status/refresh", RefreshHandler, args),
        (r"/wechat/status/([a-z]+\.(?:css|js))", AssetHandler, args),
        # Anything else under the page stays ours (the face's proxy would take it otherwise).
        (r"/wechat/status/.*", PageNotFoundHandler, args),
    ]
