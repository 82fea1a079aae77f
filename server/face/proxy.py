"""The API proxy: every other call an SDK sends to its API host goes on to the account's
``api_base`` with the current token in place of the one the SDK sent.

What is forwarded: the method, the path (checked: nothing can name another host or climb
out of it), the query as sent with only ``access_token`` replaced, the headers that matter
(``FORWARDED_HEADERS``: never our secrets, cookies or hop-by-hop headers) and the body,
buffered up to ``MAX_BODY_BYTES`` (a media upload of several MB), since a retry needs it
again.  WeChat's answer comes back unchanged: status, Content-Type, body.

Who may use it: a caller with a token this server issued (see :mod:`server.face.issued`),
or, for calls that carry ``appid`` and ``secret`` instead (web login,
``/sns/oauth2/access_token``), the pair of a configured account.  Anything else is refused
with WeChat's answer and never forwarded: from a whitelisted IP this server would otherwise
be an open relay to WeChat.

A stale token (40001, 40014, 42001) costs one compare-and-refresh (``old`` = the token used)
and one retry, never more: a crowd (or an SDK that retries on its own, with the rotated-out
token) finds ``old`` no longer current and just gets the new value; and a value WeChat
rejects right after it was rotated in is noted in Redis and not rotated again by any
instance (``Refresher.note_rejected_after_rotation``).

Calls with ``appid`` and ``secret`` instead of a token go through only on ``PAIR_PATHS`` (web
and mini program login), each argument once.  Calls made with a user's OAuth token
(``/sns/userinfo``, ``/sns/auth``, ``/sns/oauth2/refresh_token``) are between the web page's
backend and WeChat, not this server's to relay: refused like any token it did not issue.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse

from server.accounts import TOKEN, Account
from server.auth import Principal
from server.face.base import (
    APPID_MISSING,
    APPSECRET_MISSING,
    INVALID_APPID,
    INVALID_APPSECRET,
    INVALID_ARGS,
    MEDIA_TOO_BIG,
    SYSTEM_ERROR,
    FaceHandler,
    WeChatError,
)
from server.redact import printable
from server.state import NotPermitted, Unavailable
from server.upstream import UpstreamError

logger = logging.getLogger(__name__)

#: Bytes a proxied request body may have: WeChat's largest media (a WeCom file) is 20 MB;
#: multipart framing adds a little.  Above it: WeChat's 45001, never a buffer of any size.
MAX_BODY_BYTES = 20 * 1024 * 1024 + 64 * 1024
#: Seconds a proxied body may take to arrive (the server's default is 10, for 4 KiB).
BODY_TIMEOUT = 120.0
CONNECT_TIMEOUT = 5.0  # seconds
REQUEST_TIMEOUT = 60.0  # seconds for WeChat's answer (an upload included)
#: Request headers passed on; everything else (Authorization, X-Token-Secret, Cookie, Host,
#: X-Forwarded-*, Connection and the other hop-by-hop headers) stays here.
FORWARDED_HEADERS = ("Content-Type", "Accept", "Accept-Language", "User-Agent", "Content-Encoding")
#: Response headers passed back besides the status and the body.
RELAYED_HEADERS = ("Content-Type", "Content-Disposition")
#: errcodes that mean "this access_token is invalid, not the latest, or expired"
STALE = frozenset({40001, 40014, 42001})
#: How big an answer is parsed for a stale errcode (errors are small JSON bodies).
MAX_ERROR_BODY = 64 * 1024
#: A path of plain segments: no percent-encoding (an encoded slash or dot), no backslash,
#: no ``//``, no scheme or host (an absolute URL in the request line), no ``@`` or ``:``.
PATH_RE = re.compile(r"^(?:/[A-Za-z0-9_.~-]+)+/?$")
INVALID_PATH = (INVALID_ARGS[0], "invalid url path")
#: Where an appid and its own secret stand in for a token: web login, mini program login.
PAIR_PATHS = frozenset({"/sns/oauth2/access_token", "/sns/jscode2session"})
#: Bytes of proxied bodies a process holds at once (each is buffered for a retry): beyond
#: it, WeChat's "system busy" rather than memory without a bound.
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024


def safe_path(path: str) -> bool:
    """Whether ``path`` (undecoded, as in the request line) stays under ``api_base``."""
    return bool(PATH_RE.match(path)) and not any(seg in (".", "..") for seg in path.split("/"))


def with_token(query: str, token: str) -> str:
    """``query`` with every ``access_token`` argument's value replaced by ``token``; every other
    argument byte for byte as the SDK sent it."""
    parts = []
    for part in query.split("&"):
        name = urllib.parse.unquote_plus(part.split("=", 1)[0])
        parts.append(f"access_token={urllib.parse.quote(token, safe='')}" if name == "access_token" else part)
    return "&".join(parts)


def stale_errcode(resp: HTTPResponse) -> int | None:
    """The errcode of an answer saying the token was stale (40001, 40014, 42001), else None."""
    body = resp.body or b""
    if resp.code != 200 or len(body) > MAX_ERROR_BODY or not body.lstrip().startswith(b"{"):
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    errcode = answer.get("errcode") if isinstance(answer, dict) else None
    return errcode if isinstance(errcode, int) and errcode in STALE else None


@tornado.web.stream_request_body
class ProxyHandler(FaceHandler):
    """The default handler of the face: see the module docstring.

    ``POST /cgi-bin/message/custom/send?access_token=T {"touser": "o1", "msgtype": "text", ...}``
    -> WeChat's own answer, e.g. ``{"errcode": 0, "errmsg": "ok"}``.
    """

    SUPPORTED_METHODS = ("GET", "POST")
    account: Account
    token_used: str | None = None  # None: an appid/secret call, forwarded as sent

    async def prepare(self) -> None:
        """Gate, path and credential, all before a byte of the body is read; then the body
        limit is lifted for this request only."""
        self.check_face_ip()
        self._chunks: list[bytes] = []
        path = self.request.path
        if not safe_path(path):
            raise WeChatError(INVALID_PATH, "face: refused a path that could leave api_base: %s", printable(path, 100))
        if "access_token" in self.request.query_arguments:
            self.account, _ = await self.token_owner()
            self.token_used = ""  # replaced by the current value in forward()
        else:
            self.account = await self.appid_pair()
        length = self.request.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > self.face.max_body:
            raise WeChatError(MEDIA_TOO_BIG, "face: %s body of %s bytes refused", printable(path, 100), printable(length, 20))
        if self.face.bytes_in_flight + int(length) > MAX_BYTES_IN_FLIGHT:
            raise WeChatError(SYSTEM_ERROR, "face: %d bytes of bodies in flight; refusing %s bytes more", self.face.bytes_in_flight, length)
        self._held = int(length)
        self.face.bytes_in_flight += self._held
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(self.face.max_body)
            connection.set_body_timeout(BODY_TIMEOUT)

    async def appid_pair(self) -> Account:
        """The account whose ``appid`` and own ``secret`` the call carries (web login); 41001
        when the call carries neither a token nor such a pair.  Wrong pairs are counted."""
        if self.request.path not in PAIR_PATHS:
            raise WeChatError((41001, "access_token missing"))
        for name in ("appid", "secret", "code", "grant_type", "js_code"):
            if len(self.request.query_arguments.get(name, [])) > 1:
                raise WeChatError(INVALID_ARGS, "face: repeated %s on %s", name, printable(self.request.path, 100))
        appid, secret = self.query("appid"), self.query("secret")
        if not appid:
            raise WeChatError(APPID_MISSING)
        if not secret:
            raise WeChatError(APPSECRET_MISSING)  # nothing was guessed: not a failure
        key = await self.limit_key()
        account = self.accounts.by_appid.get(appid)
        if account is None:
            await self.failed(key, INVALID_APPID, "unknown appid")
        # Only the account's own AppSecret: WeChat checks it, so a client secret means nothing there.
        if not secret or not account.secret_matches(secret):
            await self.failed(key, INVALID_APPSECRET, f"wrong secret for account {account.name}")
        self.principal = Principal(f"account:{account.name}", frozenset(account.sources.values()), via="appsecret")
        return account

    _held = 0  # bytes of this request counted in face.bytes_in_flight

    def on_finish(self) -> None:
        self._release()
        super().on_finish()

    def on_connection_close(self) -> None:
        self._release()
        super().on_connection_close()

    def _release(self) -> None:
        self.face.bytes_in_flight -= self._held
        self._held = 0

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    async def get(self) -> None:
        await self.forward()

    async def post(self) -> None:
        await self.forward()

    async def forward(self) -> None:
        body = b"".join(self._chunks) if self.request.method == "POST" else None
        self._chunks = []
        source = self.account.sources[TOKEN]
        if self.token_used is not None:
            self.token_used = await self.current_token(source)
        resp = await self.send(body)
        errcode = stale_errcode(resp) if self.token_used is not None else None
        if errcode is not None:
            fresh = await self.rotate(source, errcode)
            if fresh is not None:
                self.token_used = fresh
                resp = await self.send(body)
                if stale_errcode(resp) is not None:
                    # Rotating again would not help, and an SDK that retries on its own
                    # would make the instances rotate on every retry.
                    await self.note_rejected(source, fresh)
                    logger.warning("face: account %s %s: WeChat rejects the token just rotated in too; passing its answer back", self.account.name, self.request.path)
        self.relay(resp)

    # current_token, rotate and note_rejected are where a third-party platform's authorizer
    # tokens (server.platform.handlers) differ from an account's: they are not the refresher's.

    async def current_token(self, source: str) -> str:
        """The token to put in the call: the account's current value (WeChat's -1 without one)."""
        try:
            return (await self.refresher.current(source)).value
        except Unavailable as e:
            raise WeChatError(SYSTEM_ERROR, "face: account %s has no valid token: %s", self.account.name, e) from None

    async def note_rejected(self, source: str, fresh: str) -> None:
        await self.refresher.note_rejected_after_rotation(source, fresh)

    async def rotate(self, source: str, errcode: int) -> str | None:
        """One compare-and-refresh of the token used; the new value, or None when there is
        none to retry with (already judged, or the refresh failed)."""
        used = self.token_used
        assert used is not None
        if await self.refresher.rejected_after_rotation(source, used):
            return None
        logger.warning("face: account %s %s: WeChat answered %d; refreshing the token (if still current) and retrying once", self.account.name, self.request.path, errcode)
        try:
            entry = await self.refresher.refresh(source, force=True, old=used, min_interval=False)
        except (Unavailable, UpstreamError, NotPermitted) as e:
            logger.warning("face: account %s: token refresh failed: %s", self.account.name, e)
            return None
        return entry.value if entry.value != used else None

    async def send(self, body: bytes | None) -> HTTPResponse:
        """One call to the account's ``api_base``; WeChat's -1 when it cannot be reached."""
        query = self.request.query
        if self.token_used is not None:
            query = with_token(query, self.token_used)
        url = self.account.api_base + self.request.path + (f"?{query}" if query else "")
        headers = {h: v for h in FORWARDED_HEADERS if (v := self.request.headers.get(h)) is not None}
        request = HTTPRequest(
            url,
            method=self.request.method or "GET",
            headers=headers,
            body=body,
            follow_redirects=False,
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
        )
        try:
            resp = await self.face.client.fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as e:
            raise WeChatError(SYSTEM_ERROR, "face: account %s %s: WeChat unreachable: %s", self.account.name, self.request.path, type(e).__name__) from None
        if resp.code == 599:
            raise WeChatError(SYSTEM_ERROR, "face: account %s %s: WeChat unreachable: %s", self.account.name, self.request.path, type(resp.error).__name__)
        return resp

    def relay(self, resp: HTTPResponse) -> None:
        """WeChat's answer, unchanged: status, Content-Type (and Content-Disposition), body."""
        self.set_status(resp.code, resp.reason)
        self.clear_header("Content-Type")
        for name in RELAYED_HEADERS:
            value = resp.headers.get(name)
            if value is not None:
                self.set_header(name, value)
        # WeChat's answer is JSON or a media file, never a page to run on this origin (the
        # status page lives here too).
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
        if resp.body and resp.code not in (204, 304):  # Tornado refuses a body on those
            self.write(resp.body)
        self.finish()
