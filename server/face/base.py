"""The face's handler base: WeChat's dialect, and the face's own gate.

An SDK pointed at this server parses every answer as WeChat's: HTTP 200 with
``{"errcode": N, "errmsg": "..."}`` on failure.  So every error on the face, ours included
(a refused IP, a bad path, a crash), goes out in that shape with WeChat's own errcodes,
never our ``{"errcode": <HTTP status>}`` shape and never a traceback.

The gate differs from the token API's: there is no ``X-Token-Secret``.  A caller proves
itself with an account's AppSecret (or a client secret allowed for that account) on the
token endpoints, and with a token this server handed out everywhere else.  The IP allowlist
applies as on every route, and wrong secrets count toward the same brute-force limit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NoReturn

import tornado.web

from server.accounts import TOKEN, Account
from server.auth import AuthError, Principal
from server.handlers import BaseHandler
from server.redact import printable

if TYPE_CHECKING:
    from server.face import Face

logger = logging.getLogger(__name__)

# WeChat's errcodes and errmsgs, as its API writes them.
SYSTEM_ERROR = (-1, "system error")
INVALID_CREDENTIAL = (40001, "invalid credential, access_token is invalid or not latest")
INVALID_GRANT_TYPE = (40002, "invalid grant_type")
INVALID_APPID = (40013, "invalid appid")
INVALID_APPSECRET = (40125, "invalid appsecret")
INVALID_ARGS = (40097, "invalid args")
ACCESS_TOKEN_MISSING = (41001, "access_token missing")
APPID_MISSING = (41002, "appid missing")
APPSECRET_MISSING = (41004, "appsecret missing")
MEDIA_TOO_BIG = (45001, "media size out of limit")
DAILY_QUOTA = (45009, "reach max api daily quota limit")
MINUTE_QUOTA = (45011, "api minute-quota reach limit")
DATA_FORMAT = (47001, "data format error")
REQUIRE_GET = (43001, "require GET method")
REQUIRE_POST = (43002, "require POST method")


class WeChatError(tornado.web.HTTPError):
    """A refusal in WeChat's shape: HTTP 200, ``errcode`` and ``errmsg`` for the client,
    ``log_message`` (with ``args``) for the log only."""

    def __init__(self, error: tuple[int, str], log_message: str | None = None, *args: Any, errmsg: str | None = None) -> None:
        super().__init__(200, log_message, *args)
        self.errcode, self.errmsg = error[0], errmsg or error[1]


class FaceHandler(BaseHandler):
    """WeChat's dialect for every answer (``write_error``) and the face's gate.

    ``face`` comes with the route (see :func:`server.face.face_routes`); the other
    dependencies are those of every handler.
    """

    def initialize(self, refresher: Any, auth: Any, active: Any, accounts: Any, face: Face | None = None) -> None:
        super().initialize(refresher, auth, active, accounts)
        assert face is not None, "face routes are built by server.face.face_routes"
        self.face = face

    async def prepare(self) -> None:
        self.check_face_ip()

    def check_face_ip(self) -> None:
        """WeChat's 40164 for a client IP outside ``server.allow_ips``."""
        self.ip = self.auth.client_ip(self.request)
        try:
            self.auth.check_ip(self.ip)
        except AuthError as e:
            raise WeChatError((40164, ""), "face: %s", e.detail, errmsg=f"invalid ip {printable(self.ip, 64)}, not in whitelist") from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """HTTP 200 ``{"errcode": N, "errmsg": "..."}``: WeChat's errcode for our refusals, 43001 /
        43002 for a method the route does not take, -1 for anything else (logged by
        ``log_exception``, never shown)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, WeChatError):
            errcode, errmsg = exc.errcode, exc.errmsg
        elif status_code == 405:
            errcode, errmsg = REQUIRE_POST if "POST" in self.SUPPORTED_METHODS else REQUIRE_GET
        else:
            errcode, errmsg = SYSTEM_ERROR
        self.clear()
        self.set_default_headers()
        self.set_status(200)
        self.finish({"errcode": errcode, "errmsg": errmsg})

    def query(self, name: str) -> str | None:
        """The first value of a query argument (as WeChat's CGI reads it); None when absent."""
        values = self.request.query_arguments.get(name)
        return values[0].decode("utf-8", "replace") if values else None

    # --- credentials -------------------------------------------------------------------------

    async def limit_key(self) -> str:
        """The client's brute-force key; WeChat's 45011 while it is over its failure limit
        (``server.auth_failures_per_minute``, shared with the token API)."""
        key = self.auth.limit_key(self.ip or self.request.remote_ip or "-")
        if await self.auth.failures.retry_after(key) > 0 or self.auth.failures.over_here(key) > 0:
            raise WeChatError(MINUTE_QUOTA, "face: ip %s over its failure limit", key)
        return key

    async def failed(self, key: str, error: tuple[int, str], what: str) -> NoReturn:
        """Count a wrong credential against ``key`` and refuse with ``error``.  ``what`` is
        logged; it never holds the value presented."""
        await self.auth.failures.hit(key)
        raise WeChatError(error, "face: %s %s from %s", printable(self.request.path, 100), what, key)

    def secret_admits(self, account: Account, secret: str) -> bool:
        """Whether ``secret`` is the account's own AppSecret (or corpsecret), or the request
        secret of a principal allowed the account's token source.  Sets ``principal``."""
        own = account.secret_matches(secret)
        principal = self.auth.principal_for_secret(secret)  # both compared, whichever matches
        if own:
            self.principal = Principal(f"account:{account.name}", frozenset(account.sources.values()), via="appsecret")
            return True
        if principal is not None and principal.may_use(account.sources[TOKEN]):
            self.principal = principal
            return True
        return False

    async def token_owner(self) -> tuple[Account, str]:
        """The account whose token the ``access_token`` argument is, and that token: 41001
        without one, 40001 for one this server did not issue (current or previous)."""
        values = self.request.query_arguments.get("access_token")
        if not values or not values[0]:
            raise WeChatError(ACCESS_TOKEN_MISSING)
        if len(values) > 1:
            raise WeChatError(INVALID_ARGS, "face: %s with a repeated access_token", printable(self.request.path, 100))
        token = values[0].decode("utf-8", "replace")
        account = await self.face.issued.owner(token)
        if account is None:
            raise WeChatError(INVALID_CREDENTIAL, "face: %s with an access_token not issued here, from %s", printable(self.request.path, 100), self.ip)
        self.principal = Principal(f"account:{account.name}", frozenset(account.sources.values()), via="token")
        return account, token
