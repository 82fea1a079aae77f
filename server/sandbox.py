"""A simulator of WeChat's credential APIs, for tests, benchmarks and ``--demo`` mode.

The real API cannot be reached from build and test machines, so this module reproduces the
behaviour described in WECHAT_API.md: token rotation with a five-minute overlap, the stable-token
rules, tickets, errcodes, daily quotas and an IP whitelist. Tests drive it either in-process
(``make_app(Sandbox(clock=...))``) or as a subprocess (``python -m server.sandbox``) through the
``/sandbox/*`` control API; faults (busy, errcodes, HTTP 5xx, garbage, hangs) are injected here so
that the code under test never needs monkeypatching.

All times are seconds of ``Sandbox.clock`` (``time.time`` unless a test passes a fake clock).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hmac
import http.client
import ipaddress
import json
import logging
import math
import secrets
import signal
import sys
import time
from typing import Any, Callable

import tornado.httpserver
import tornado.log
import tornado.netutil
import tornado.web

logger = logging.getLogger(__name__)

JSONDict = dict[str, Any]

DEFAULT_APPID = "wx123"
DEFAULT_APPSECRET = "sandbox-appsecret-0123456789"
DEFAULT_CORPID = "ww123"
DEFAULT_CORPSECRET = "sandbox-corpsecret-0123456789"

TOKEN_PATH = "/cgi-bin/token"
STABLE_TOKEN_PATH = "/cgi-bin/stable_token"
TICKET_PATH = "/cgi-bin/ticket/getticket"
CALLBACK_IP_PATH = "/cgi-bin/getcallbackip"
CORP_TOKEN_PATH = "/cgi-bin/gettoken"
QUOTA_GET_PATH = "/cgi-bin/openapi/quota/get"
CLEAR_QUOTA_PATH = "/cgi-bin/clear_quota"
API_PATHS = (TOKEN_PATH, STABLE_TOKEN_PATH, TICKET_PATH, CALLBACK_IP_PATH,
             CORP_TOKEN_PATH, QUOTA_GET_PATH, CLEAR_QUOTA_PATH)

FAULT_KINDS = frozenset({"busy", "errcode", "http_error", "garbage", "missing_field", "hang"})

# WeChat counts quotas per calendar day in China (UTC+8), whatever the caller's time zone.
CHINA_UTC_OFFSET = 8 * 3600.0  # seconds
STABLE_ROTATE_AHEAD = 300.0  # seconds before expiry at which WeChat renews a stable token
FORCE_REFRESH_DAILY_LIMIT = 20
FORCE_REFRESH_MIN_SPACING = 30.0  # seconds
CLEAR_QUOTA_MONTHLY_LIMIT = 10
TOKEN_BYTES = 105  # random bytes per token or ticket: 140 URL-safe characters, like WeChat's
CALLBACK_IPS = ("101.226.103.0/25", "101.226.62.0/26", "101.226.233.128/25",
                "58.247.206.128/25", "182.254.86.128/25")


class ApiError(Exception):
    """A WeChat error answer: HTTP 200 with ``{"errcode": N, "errmsg": "..."}``."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(errcode, errmsg)
        self.errcode = errcode
        self.errmsg = errmsg

    def body(self) -> JSONDict:
        return {"errcode": self.errcode, "errmsg": self.errmsg}


@dataclasses.dataclass
class _Token:
    kind: str  # "token" (/cgi-bin/token), "stable" or "corp"
    owner: str  # appid or corpid
    expires_at: float  # clock seconds
    # Clock seconds after which the token is "not latest" (40001); -inf once superseded twice.
    valid_until: float


@dataclasses.dataclass
class _Fault:
    kind: str
    remaining: int | None  # calls still to fault; None until clear_faults()
    errcode: int
    errmsg: str
    status: int
    delay: float  # seconds


def _rid() -> str:
    """A request id in WeChat's style, appended to some errmsgs."""
    return "-".join(secrets.token_hex(4) for _ in range(3))


def _json_object(raw: bytes) -> JSONDict:
    """Parse a POST body as WeChat does: anything but a JSON object is 47001."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(47001, "data format error") from None
    if not isinstance(body, dict):
        raise ApiError(47001, "data format error")
    return body


class Sandbox:
    """All simulator state: credentials, issued tokens, quotas, counters and queued faults.

    ``expires_in`` is the life of each token and ticket in seconds; ``overlap`` the seconds a
    superseded token keeps working; ``daily_quota`` the /cgi-bin/token calls allowed per appid
    per China day; ``ip_whitelist`` a list of addresses or CIDR networks (None allows any IP).
    """

    def __init__(self, *, apps: dict[str, str] | None = None,
                 corps: dict[str, str] | None = None,
                 expires_in: int = 7200, overlap: float = 300.0, daily_quota: int = 2000,
                 ip_whitelist: list[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.apps = dict(apps) if apps is not None else {DEFAULT_APPID: DEFAULT_APPSECRET}
        self.corps = dict(corps) if corps is not None else {DEFAULT_CORPID: DEFAULT_CORPSECRET}
        self.expires_in = expires_in
        self.overlap = overlap
        self.daily_quota = daily_quota
        self.clock = clock
        # Parsed once so that a typo in a test's whitelist fails at construction, not per call.
        self._whitelist = (None if ip_whitelist is None else
                          tuple(ipaddress.ip_network(n, strict=False) for n in ip_whitelist))
        self.calls: collections.Counter[str] = collections.Counter()
        self.issued: collections.Counter[str] = collections.Counter()
        self._tokens: dict[str, _Token] = {}
        self._tickets: set[str] = set()
        self._chains: dict[tuple[str, str], list[str]] = {}  # (kind, owner) -> [previous, newest]
        self._quota_used: dict[str, tuple[int, int]] = {}  # appid -> (china day, calls)
        self._forced: dict[str, list[float]] = {}  # appid -> clock times of today's forced calls
        self._clears: dict[str, tuple[tuple[int, int], int]] = {}  # appid -> ((year, month), n)
        self._faults: dict[str, collections.deque[_Fault]] = {}

    # -- control -----------------------------------------------------------------------------

    def inject(self, path: str, kind: str, *, times: int | None = 1, errcode: int = -1,
               errmsg: str = "system error", status: int = 500, delay: float = 0.0) -> None:
        """Fault the next ``times`` calls of ``path`` (None: until ``clear_faults``).

        Faults queue per path, first injected first served. ``delay`` is in seconds (kind
        "hang"); ``status`` is the HTTP status of kind "http_error". Raises ValueError (or
        TypeError) on an unknown path or kind or a bad value, so a test's typo is not silent.
        """
        if path not in API_PATHS:
            raise ValueError(f"no such sandbox path: {path!r}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if times is not None and (not isinstance(times, int) or isinstance(times, bool)
                                  or times < 1):
            raise ValueError(f"times must be a positive integer or None, not {times!r}")
        if not isinstance(errcode, int) or not isinstance(errmsg, str):
            raise TypeError("errcode must be an int and errmsg a str")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status, not {status!r}")
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"delay must be a non-negative number of seconds, not {delay!r}")
        fault = _Fault(kind, times, errcode, errmsg, status, float(delay))
        self._faults.setdefault(path, collections.deque()).append(fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    def take_fault(self, path: str) -> _Fault | None:
        """The fault this call of ``path`` must suffer, or None; uses up one of its ``times``."""
        queue = self._faults.get(path)
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.popleft()
        return fault

    def reset(self) -> None:
        """Forget tokens, tickets, counters, faults and quota use (credentials and settings stay)."""
        self.calls.clear()
        self.issued.clear()
        self._tokens.clear()
        self._tickets.clear()
        self._chains.clear()
        self._quota_used.clear()
        self._forced.clear()
        self._clears.clear()
        self._faults.clear()

    def token_status(self, token: str) -> int:
        """0 if ``token`` is valid now, 42001 if expired, 40001 if unknown or superseded."""
        entry = self._tokens.get(token)
        if entry is None:
            return 40001
        now = self.clock()
        # A superseded token dies as "not latest" unless its overlap already ran to its expiry.
        if entry.valid_until < entry.expires_at and now >= entry.valid_until:
            return 40001
        if now >= entry.expires_at:
            return 42001
        return 0

    def current_token(self, appid: str = DEFAULT_APPID) -> str | None:
        """The newest /cgi-bin/token token of ``appid``, or None if none was issued."""
        chain = self._chains.get(("token", appid))
        return chain[-1] if chain else None

    def issued_values(self) -> set[str]:
        """Every token and ticket value handed out since the last reset (for leak checks)."""
        return set(self._tokens) | set(self._tickets)

    def stats(self) -> JSONDict:
        """``{"calls": {path: n}, "issued": {path: n}}``, JSON-able."""
        return {"calls": dict(self.calls), "issued": dict(self.issued)}

    # -- WeChat endpoints: each returns the success body or raises ApiError -------------------

    def api_token(self, grant_type: str | None, appid: str | None, secret: str | None,
                  ip: str) -> JSONDict:
        """GET /cgi-bin/token: a new token each call; the previous one overlaps."""
        self._check_app(grant_type, appid, secret, ip)
        assert appid is not None  # checked above; tells mypy
        day = self._day()
        used_day, used = self._quota_used.get(appid, (day, 0))
        used = used if used_day == day else 0
        if used >= self.daily_quota:
            raise ApiError(45009, "reach max api daily quota limit")
        self._quota_used[appid] = (day, used + 1)
        token = self._rotate("token", appid, overlap=self.overlap)
        return {"access_token": token, "expires_in": self.expires_in}

    def api_stable_token(self, raw_body: bytes, ip: str) -> JSONDict:
        """POST /cgi-bin/stable_token: the same token while it has life left, unless forced."""
        body = _json_object(raw_body)
        grant_type, appid, secret = (body.get(k) for k in ("grant_type", "appid", "secret"))
        force = body.get("force_refresh", False)
        # Strict on types so that a client sending "false" or a numeric appid learns of it here.
        fields_ok = all(v is None or isinstance(v, str) for v in (grant_type, appid, secret))
        if not fields_ok or not isinstance(force, bool):
            raise ApiError(47001, "data format error")
        self._check_app(grant_type, appid, secret, ip)
        assert isinstance(appid, str)
        now = self.clock()
        if force:
            today = [t for t in self._forced.get(appid, []) if self._day(t) == self._day(now)]
            if len(today) >= FORCE_REFRESH_DAILY_LIMIT:
                raise ApiError(45009, "reach max api daily quota limit")
            if today and now - today[-1] < FORCE_REFRESH_MIN_SPACING:
                raise ApiError(45011, "api minute-quota reach limit")
            self._forced[appid] = today + [now]
            token = self._rotate("stable", appid, overlap=self.overlap)
            return {"access_token": token, "expires_in": self.expires_in}
        chain = self._chains.get(("stable", appid))
        # Scaled down for short test lifetimes, or every call would rotate the token.
        ahead = min(STABLE_ROTATE_AHEAD, self.expires_in / 2)
        if chain:
            remaining = self._tokens[chain[-1]].expires_at - now
            if remaining > ahead:
                return {"access_token": chain[-1], "expires_in": int(remaining)}
        # WeChat's own renewal: the old token keeps its full life (overlap=None).
        token = self._rotate("stable", appid, overlap=None)
        return {"access_token": token, "expires_in": self.expires_in}

    def api_ticket(self, access_token: str | None, ticket_type: str | None) -> JSONDict:
        """GET /cgi-bin/ticket/getticket: a new jsapi or wx_card ticket each call."""
        self._check_token(access_token, allow_corp=False)
        if ticket_type not in ("jsapi", "wx_card"):
            raise ApiError(40097, "invalid args")
        ticket = self._new_value()
        self._tickets.add(ticket)
        return {"errcode": 0, "errmsg": "ok", "ticket": ticket, "expires_in": self.expires_in}

    def api_callback_ip(self, access_token: str | None) -> JSONDict:
        """GET /cgi-bin/getcallbackip: a cheap validity check (WeCom has the same path)."""
        self._check_token(access_token, allow_corp=True)
        return {"ip_list": list(CALLBACK_IPS)}

    def api_corp_token(self, corpid: str | None, corpsecret: str | None, ip: str) -> JSONDict:
        """GET /cgi-bin/gettoken (WeCom): the same token until it expires, then a new one."""
        if not corpid:
            raise ApiError(41002, "corpid missing")
        if corpid not in self.corps:
            raise ApiError(40013, "invalid corpid")
        if not corpsecret:
            raise ApiError(41004, "corpsecret missing")
        if not hmac.compare_digest(corpsecret.encode(), self.corps[corpid].encode()):
            raise ApiError(40001, "invalid credential")
        if not self._ip_allowed(ip):
            raise ApiError(60020, f"not allow to access from your ip, from ip: {ip}")
        chain = self._chains.get(("corp", corpid))
        if chain:
            remaining = self._tokens[chain[-1]].expires_at - self.clock()
            if remaining >= 1:
                return {"errcode": 0, "errmsg": "ok", "access_token": chain[-1],
                        "expires_in": int(remaining)}
        token = self._rotate("corp", corpid, overlap=None)
        return {"errcode": 0, "errmsg": "ok", "access_token": token,
                "expires_in": self.expires_in}

    def api_quota_get(self, access_token: str | None, raw_body: bytes) -> JSONDict:
        """POST /cgi-bin/openapi/quota/get: the token owner's /cgi-bin/token quota today."""
        appid = self._check_token(access_token, allow_corp=False)
        body = _json_object(raw_body)
        if body.get("cgi_path") != TOKEN_PATH:
            raise ApiError(76021, "cgi_path not found, please check")
        day, used = self._quota_used.get(appid, (self._day(), 0))
        used = used if day == self._day() else 0
        return {"errcode": 0, "errmsg": "ok",
                "quota": {"daily_limit": self.daily_quota, "used": used,
                          "remain": max(0, self.daily_quota - used)}}

    def api_clear_quota(self, access_token: str | None, raw_body: bytes) -> JSONDict:
        """POST /cgi-bin/clear_quota: zero an appid's daily quota use, 10 times a month."""
        self._check_token(access_token, allow_corp=False)
        appid = _json_object(raw_body).get("appid")
        if not appid:
            raise ApiError(41002, "appid missing")
        if not isinstance(appid, str) or appid not in self.apps:
            raise ApiError(40013, "invalid appid")
        wall = time.gmtime(self.clock() + CHINA_UTC_OFFSET)
        month = (wall.tm_year, wall.tm_mon)
        clears_month, clears = self._clears.get(appid, (month, 0))
        clears = clears if clears_month == month else 0
        if clears >= CLEAR_QUOTA_MONTHLY_LIMIT:
            raise ApiError(48006, "forbid to clear quota because of reaching the limit")
        self._clears[appid] = (month, clears + 1)
        self._quota_used.pop(appid, None)
        self._forced.pop(appid, None)
        return {"errcode": 0, "errmsg": "ok"}

    # -- helpers -------------------------------------------------------------------------------

    def _day(self, at: float | None = None) -> int:
        """The China calendar day number of clock time ``at`` (default: now)."""
        return math.floor(((self.clock() if at is None else at) + CHINA_UTC_OFFSET) / 86400)

    def _check_app(self, grant_type: str | None, appid: str | None, secret: str | None,
                   ip: str) -> None:
        if grant_type != "client_credential":
            raise ApiError(40002, "invalid grant_type")
        if not appid:
            raise ApiError(41002, "appid missing")
        if appid not in self.apps:
            raise ApiError(40013, "invalid appid")
        if not secret:
            raise ApiError(41004, "appsecret missing")
        if not hmac.compare_digest(secret.encode(), self.apps[appid].encode()):
            raise ApiError(40125, "invalid appsecret")
        if not self._ip_allowed(ip):
            ipv6 = ip if ":" in ip else f"::ffff:{ip}"
            raise ApiError(40164, f"invalid ip {ip} ipv6 {ipv6}, not in whitelist rid: {_rid()}")

    def _check_token(self, access_token: str | None, *, allow_corp: bool) -> str:
        """Raise the errcode WeChat gives for a bad ``access_token``; return its owner."""
        if not access_token:
            raise ApiError(41001, "access_token missing")
        status = self.token_status(access_token)
        entry = self._tokens.get(access_token)
        if status == 0 and entry is not None and (allow_corp or entry.kind != "corp"):
            return entry.owner
        if status == 42001:
            raise ApiError(42001, "access_token expired")
        raise ApiError(40001, "invalid credential, access_token is invalid or not latest")

    def _ip_allowed(self, ip: str) -> bool:
        if self._whitelist is None:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._whitelist)

    def _new_value(self) -> str:
        """A fresh token or ticket, never equal to one handed out before (since reset)."""
        while True:
            value = secrets.token_urlsafe(TOKEN_BYTES)
            if value not in self._tokens and value not in self._tickets:
                return value

    def _rotate(self, kind: str, owner: str, *, overlap: float | None) -> str:
        """Issue a new newest token of (kind, owner).

        The one before the previous newest dies at once; the previous newest stays valid for
        ``overlap`` more seconds (None: until its own expiry), never beyond its expiry.
        """
        now = self.clock()
        chain = self._chains.setdefault((kind, owner), [])
        if len(chain) == 2:
            self._tokens[chain.pop(0)].valid_until = -math.inf
        if chain and overlap is not None:
            previous = self._tokens[chain[0]]
            previous.valid_until = min(previous.expires_at, now + overlap)
        token = self._new_value()
        self._tokens[token] = _Token(kind, owner, now + self.expires_in, now + self.expires_in)
        chain.append(token)
        return token


# -- HTTP -----------------------------------------------------------------------------------


class BaseHandler(tornado.web.RequestHandler):
    """Counts the call, answers in JSON, and turns every error into a JSON body."""

    counted = True  # the control API is not counted, so reading stats does not change them

    def initialize(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        # Counted here, before Tornado's 405 check, so that calls a client gets wrong show too.
        if self.counted:
            sandbox.calls[self.request.path] += 1

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Only the standard reason phrase goes out: never a traceback or an internal message.
        self.finish({"errcode": status_code, "errmsg": self._reason.lower()})

    def json_body(self) -> JSONDict:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="body is not a JSON object")
        return body


class NotFoundHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class ApiHandler(BaseHandler):
    """A WeChat endpoint: suffers queued faults, then answers through ``reply``."""

    issues = False  # whether a success hands out a credential (counted in Sandbox.issued)

    async def prepare(self) -> None:
        path = self.request.path
        fault = self.sandbox.take_fault(path)
        if fault is None:
            return
        logger.info("sandbox %s: injected fault %s", path, fault.kind)
        if fault.kind == "hang":
            await asyncio.sleep(fault.delay)  # then answer normally, late
        elif fault.kind == "busy":
            self.finish({"errcode": -1, "errmsg": "system busy"})
        elif fault.kind == "errcode":
            self.finish({"errcode": fault.errcode, "errmsg": fault.errmsg})
        elif fault.kind == "http_error":
            self.set_status(fault.status)
            self.set_header("Content-Type", "text/html")
            reason = http.client.responses.get(fault.status, "Error")
            self.finish(f"<html><body><h1>{fault.status} {reason}</h1></body></html>")
        elif fault.kind == "garbage":
            # Labelled JSON on purpose: a client must not trust the Content-Type.
            self.set_header("Content-Type", "application/json; encoding=utf-8")
            self.finish('{"access_token": "trunc')
        elif fault.kind == "missing_field":
            self.finish({"expires_in": self.sandbox.expires_in})

    def reply(self, produce: Callable[[], JSONDict]) -> None:
        """Write ``produce()``'s body, or the ApiError it raised, and log the errcode."""
        try:
            body = produce()
        except ApiError as error:
            body = error.body()
        errcode = body.get("errcode", 0)
        if errcode == 0 and self.issues:
            self.sandbox.issued[self.request.path] += 1
        level = logging.DEBUG if errcode == 0 else logging.INFO
        logger.log(level, "sandbox %s -> errcode %s", self.request.path, errcode)
        self.finish(body)

    def client_ip(self) -> str:
        return self.request.remote_ip or ""

    def arg(self, name: str) -> str | None:
        # WeChat does not strip whitespace; neither do we, so a padded secret fails as there.
        return self.get_query_argument(name, None, strip=False)


class TokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/token?grant_type=client_credential&appid=wx123&secret=S``
        -> ``{"access_token": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.api_token(
            self.arg("grant_type"), self.arg("appid"), self.arg("secret"), self.client_ip()))


class StableTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)
    issues = True

    def post(self) -> None:
        """``POST /cgi-bin/stable_token {"grant_type": "client_credential", "appid": "wx123",
        "secret": "S", "force_refresh": false}`` -> ``{"access_token": "...", "expires_in": 5400}``"""
        self.reply(lambda: self.sandbox.api_stable_token(self.request.body, self.client_ip()))


class TicketHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/ticket/getticket?access_token=T&type=jsapi``
        -> ``{"errcode": 0, "errmsg": "ok", "ticket": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.api_ticket(self.arg("access_token"), self.arg("type")))


class CallbackIpHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)

    def get(self) -> None:
        """``GET /cgi-bin/getcallbackip?access_token=T`` -> ``{"ip_list": ["101.226.103.0/25"]}``"""
        self.reply(lambda: self.sandbox.api_callback_ip(self.arg("access_token")))


class CorpTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/gettoken?corpid=ww123&corpsecret=S``
        -> ``{"errcode": 0, "errmsg": "ok", "access_token": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.api_corp_token(
            self.arg("corpid"), self.arg("corpsecret"), self.client_ip()))


class QuotaGetHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/openapi/quota/get?access_token=T {"cgi_path": "/cgi-bin/token"}`` ->
        ``{"errcode": 0, "errmsg": "ok", "quota": {"daily_limit": 2000, "used": 3, "remain": 1997}}``"""
        self.reply(lambda: self.sandbox.api_quota_get(self.arg("access_token"),
                                                      self.request.body))


class ClearQuotaHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/clear_quota?access_token=T {"appid": "wx123"}``
        -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.reply(lambda: self.sandbox.api_clear_quota(self.arg("access_token"),
                                                        self.request.body))


class StatsHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET",)
    counted = False

    def get(self) -> None:
        """``GET /sandbox/stats`` -> ``{"calls": {"/cgi-bin/token": 3}, "issued": {...}}``"""
        self.finish(self.sandbox.stats())


class FaultsHandler(BaseHandler):
    SUPPORTED_METHODS = ("POST", "DELETE")
    counted = False

    def post(self) -> None:
        """``POST /sandbox/faults {"path": "/cgi-bin/token", "kind": "busy", "times": 3}``
        -> ``{"errcode": 0, "errmsg": "ok"}``; a bad fault -> HTTP 400 saying why."""
        body = self.json_body()
        try:
            path, kind = body.pop("path"), body.pop("kind")
            self.sandbox.inject(path, kind, **body)
        except (KeyError, TypeError, ValueError) as error:
            raise tornado.web.HTTPError(400, reason=f"bad fault: {error}"[:200]) from None
        self.finish({"errcode": 0, "errmsg": "ok"})

    def delete(self) -> None:
        """``DELETE /sandbox/faults`` -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.sandbox.clear_faults()
        self.finish({"errcode": 0, "errmsg": "ok"})


class ResetHandler(BaseHandler):
    SUPPORTED_METHODS = ("POST",)
    counted = False

    def post(self) -> None:
        """``POST /sandbox/reset`` -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.sandbox.reset()
        self.finish({"errcode": 0, "errmsg": "ok"})


class TokenStatusHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET",)
    counted = False

    def get(self) -> None:
        """``GET /sandbox/token_status?token=T`` -> ``{"status": 0}`` (or 40001, 42001)"""
        token = self.get_query_argument("token", "", strip=False)
        self.finish({"status": self.sandbox.token_status(token)})


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log without the query string, which carries the appsecret."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    tornado.log.access_log.log(level, "%d %s %s (%s) %.1fms", status, handler.request.method,
                               handler.request.path, handler.request.remote_ip,
                               1000.0 * handler.request.request_time())


def make_app(sandbox: Sandbox) -> tornado.web.Application:
    """The simulator's Tornado application, serving ``sandbox``."""
    routes: list[tuple[str, type[BaseHandler]]] = [
        (TOKEN_PATH, TokenHandler),
        (STABLE_TOKEN_PATH, StableTokenHandler),
        (TICKET_PATH, TicketHandler),
        (CALLBACK_IP_PATH, CallbackIpHandler),
        (CORP_TOKEN_PATH, CorpTokenHandler),
        (QUOTA_GET_PATH, QuotaGetHandler),
        (CLEAR_QUOTA_PATH, ClearQuotaHandler),
        ("/sandbox/stats", StatsHandler),
        ("/sandbox/faults", FaultsHandler),
        ("/sandbox/reset", ResetHandler),
        ("/sandbox/token_status", TokenStatusHandler),
    ]
    args = {"sandbox": sandbox}
    return tornado.web.Application(
        [(path, handler, args) for path, handler in routes],
        default_handler_class=NotFoundHandler, default_handler_args=args,
        log_function=_log_request)


# -- CLI -------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.sandbox",
                                     description="Serve the WeChat credential-API simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--expires-in", type=int, default=7200, help="token life, seconds")
    parser.add_argument("--overlap", type=float, default=300.0,
                        help="seconds a superseded token stays valid")
    parser.add_argument("--daily-quota", type=int, default=2000,
                        help="/cgi-bin/token calls per appid per day")
    parser.add_argument("--appid", default=DEFAULT_APPID)
    parser.add_argument("--secret", default=DEFAULT_APPSECRET)
    return parser.parse_args(argv)


async def _serve(sandbox: Sandbox, host: str, port: int) -> int:
    """Serve until SIGTERM or SIGINT; print the URL once listening. Returns the exit status."""
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(make_app(sandbox))
    server.add_sockets(sockets)
    bound_port = sockets[0].getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    # The parent process reads this one line to learn the port; flush or it may wait forever.
    print(f"SANDBOX_URL=http://{url_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("sandbox on port %s stopping", bound_port)
    server.stop()
    try:
        # A "hang" fault may hold a connection for its whole delay; do not wait on it for long.
        await asyncio.wait_for(server.close_all_connections(), timeout=2.0)
    except asyncio.TimeoutError:
        logger.warning("sandbox: connections still open at exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Logs go to stderr: stdout carries only the SANDBOX_URL line.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sandbox = Sandbox(apps={args.appid: args.secret}, expires_in=args.expires_in,
                      overlap=args.overlap, daily_quota=args.daily_quota)
    return asyncio.run(_serve(sandbox, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
