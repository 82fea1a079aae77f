"""The simulator's state: credentials, the official-account and mini-program token endpoints,
quotas, and the control surface tests use (faults, counters, the record of calls).

WeCom and the business APIs live in their own modules; ``Sandbox`` owns one of each so that
``reset`` and the leak checks cover everything.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from typing import Any, Callable

from server.sandbox.business import Business
from server.sandbox.common import (
    DEFAULT_AGENTID,
    DEFAULT_APPID,
    DEFAULT_APPSECRET,
    DEFAULT_CORPID,
    DEFAULT_CORPSECRET,
    TOKEN_PATH,
    ApiError,
    JSONDict,
    check_app_secret,
    json_object,
    rid,
)
from server.sandbox.component import (
    DEFAULT_AES_KEY,
    DEFAULT_COMPONENT_APPID,
    DEFAULT_COMPONENT_SECRET,
    DEFAULT_MSG_TOKEN,
    Component,
    ComponentApp,
)
from server.sandbox.control import Fault, Faults, RecordedCall, new_records
from server.sandbox.ledger import Ledger
from server.sandbox.wecom import AGENT_TICKET_HOURLY_LIMIT, CORP_TICKET_HOURLY_LIMIT, WeCom

# WeChat counts quotas per calendar day in China (UTC+8), whatever the caller's time zone.
CHINA_UTC_OFFSET = 8 * 3600.0  # seconds
STABLE_ROTATE_AHEAD = 300.0  # seconds before expiry at which WeChat renews a stable token
FORCE_REFRESH_DAILY_LIMIT = 20
FORCE_REFRESH_MIN_SPACING = 30.0  # seconds
CLEAR_QUOTA_MONTHLY_LIMIT = 10
# "authorizer": a platform's token for an account that authorised it (server.sandbox.component)
ACCOUNT_KINDS = frozenset({"token", "stable", "authorizer"})


class Sandbox:
    """All simulator state: credentials, issued tokens, quotas, counters and queued faults.

    ``apps`` maps appid -> secret for official accounts and mini programs alike (each has its
    own tokens, quota and stable token). ``corps`` maps corpid -> the secret of its app
    DEFAULT_AGENTID; ``corp_apps`` adds apps: corpid -> {agentid: secret}. ``expires_in`` is
    the life of each token and ticket in seconds; ``overlap`` the seconds a superseded token
    keeps working; ``daily_quota`` the /cgi-bin/token calls allowed per appid per China day;
    ``ip_whitelist`` a list of addresses or CIDR networks (None allows any IP);
    ``corp_ticket_hourly`` / ``agent_ticket_hourly`` WeCom's ticket limits per corp / per app.
    """

    def __init__(self, *, apps: dict[str, str] | None = None,
                 corps: dict[str, str] | None = None,
                 corp_apps: dict[str, dict[str, str]] | None = None,
                 expires_in: int = 7200, overlap: float = 300.0, daily_quota: int = 2000,
                 ip_whitelist: list[str] | None = None,
                 corp_ticket_hourly: int = CORP_TICKET_HOURLY_LIMIT,
                 agent_ticket_hourly: int = AGENT_TICKET_HOURLY_LIMIT,
                 components: dict[str, ComponentApp] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.apps = dict(apps) if apps is not None else {DEFAULT_APPID: DEFAULT_APPSECRET}
        self.corps = dict(corps) if corps is not None else {DEFAULT_CORPID: DEFAULT_CORPSECRET}
        # corpid -> {agentid: secret}: every app of every corp, the single-secret form included.
        self.corp_apps: dict[str, dict[str, str]] = {
            corpid: {DEFAULT_AGENTID: secret} for corpid, secret in self.corps.items()}
        for corpid, agents in (corp_apps or {}).items():
            self.corp_apps.setdefault(corpid, {}).update(agents)
        self.daily_quota = daily_quota
        self.ledger = Ledger(expires_in=expires_in, overlap=overlap, clock=clock)
        self.wecom = WeCom(self.ledger, self.corp_apps, self._ip_allowed,
                           corp_ticket_hourly=corp_ticket_hourly,
                           agent_ticket_hourly=agent_ticket_hourly)
        self.business = Business(self.ledger, self.apps)
        # Third-party platforms: component appid -> ComponentApp (one default platform).
        self.component = Component(self.ledger, dict(components) if components is not None else {
            DEFAULT_COMPONENT_APPID: ComponentApp(DEFAULT_COMPONENT_SECRET, DEFAULT_MSG_TOKEN, DEFAULT_AES_KEY)},
            lambda ip: self._ip_allowed(ip))
        # Parsed once so that a typo in a test's whitelist fails at construction, not per call.
        self._whitelist = (None if ip_whitelist is None else
                          tuple(ipaddress.ip_network(n, strict=False) for n in ip_whitelist))
        self.calls: collections.Counter[str] = collections.Counter()
        self.issued: collections.Counter[str] = collections.Counter()
        self.requests = new_records()
        self._faults = Faults()
        self._quota_used: dict[str, tuple[int, int]] = {}  # appid -> (china day, calls)
        self._forced: dict[str, list[float]] = {}  # appid -> clock times of today's forced calls
        self._clears: dict[str, tuple[tuple[int, int], int]] = {}  # appid -> ((year, month), n)

    # Settings tests change between calls; the ledger applies them to every kind of token.
    @property
    def expires_in(self) -> int:
        return self.ledger.expires_in

    @expires_in.setter
    def expires_in(self, seconds: int) -> None:
        self.ledger.expires_in = seconds

    @property
    def overlap(self) -> float:
        return self.ledger.overlap

    @overlap.setter
    def overlap(self, seconds: float) -> None:
        self.ledger.overlap = seconds

    @property
    def clock(self) -> Callable[[], float]:
        return self.ledger.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.ledger.clock = clock

    # -- control -----------------------------------------------------------------------------

    def inject(self, path: str, kind: str, *, times: int | None = 1, errcode: int = -1,
               errmsg: str = "system error", status: int = 500, delay: float = 0.0) -> None:
        """Fault the next ``times`` calls of ``path`` (None: until ``clear_faults``).

        Faults queue per path, first injected first served. ``delay`` is in seconds (kind
        "hang"); ``status`` is the HTTP status of kind "http_error". Raises ValueError (or
        TypeError) on an unknown path or kind or a bad value, so a test's typo is not silent.
        """
        self._faults.inject(path, kind, times=times, errcode=errcode, errmsg=errmsg,
                            status=status, delay=delay)

    def clear_faults(self) -> None:
        self._faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        """The fault this call of ``path`` must suffer, or None; uses up one of its ``times``."""
        return self._faults.take(path)

    def reset(self) -> None:
        """Forget tokens, tickets, counters, records, faults and quota use (credentials and
        settings stay)."""
        self.calls.clear()
        self.issued.clear()
        self.requests.clear()
        self.ledger.reset()
        self.wecom.reset()
        self.business.reset()
        self.component.reset()
        self._quota_used.clear()
        self._forced.clear()
        self._clears.clear()
        self._faults.clear()

    def token_status(self, token: str) -> int:
        """0 if ``token`` is valid now, 42001 if expired, 40001 if unknown or superseded."""
        return self.ledger.status(token)

    def current_token(self, appid: str = DEFAULT_APPID) -> str | None:
        """The newest /cgi-bin/token token of ``appid``, or None if none was issued."""
        return self.ledger.newest("token", appid)

    def current_stable_token(self, appid: str = DEFAULT_APPID) -> str | None:
        """The newest stable token of ``appid``, or None if none was issued."""
        return self.ledger.newest("stable", appid)

    def current_corp_token(self, corpid: str = DEFAULT_CORPID,
                           agentid: str = DEFAULT_AGENTID) -> str | None:
        """The newest WeCom token of app ``agentid`` of ``corpid``, or None."""
        return self.ledger.newest("corp", corpid, agentid)

    def issued_values(self) -> set[str]:
        """Every token and ticket value handed out since the last reset (for leak checks)."""
        return self.ledger.values()

    def stats(self) -> JSONDict:
        """``{"calls": {path: n}, "issued": {path: n}}``, JSON-able."""
        return {"calls": dict(self.calls), "issued": dict(self.issued)}

    def requests_to(self, path: str | None = None) -> list[RecordedCall]:
        """The recorded calls of ``path`` (every path when None), oldest first."""
        return [r for r in self.requests if path is None or r.path == path]

    def record(self, **fields: Any) -> None:
        """Add a RecordedCall; the token's owner, kind and status are looked up here."""
        token = fields.get("access_token")
        entry = self.ledger.tokens.get(token) if token else None
        self.requests.append(RecordedCall(
            **fields, token_owner=entry.owner if entry else None,
            token_kind=entry.kind if entry else None,
            token_status=self.ledger.status(token) if token else None))

    # -- official accounts and mini programs: each returns the body or raises ApiError -------

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
        token = self.ledger.rotate("token", appid, overlap=self.overlap)
        return {"access_token": token, "expires_in": self.expires_in}

    def api_stable_token(self, raw_body: bytes, ip: str) -> JSONDict:
        """POST /cgi-bin/stable_token: the same token while it has life left, unless forced."""
        body = json_object(raw_body)
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
            token = self.ledger.rotate("stable", appid, overlap=self.overlap)
            return {"access_token": token, "expires_in": self.expires_in}
        newest = self.ledger.newest("stable", appid)
        # Scaled down for short test lifetimes, or every call would rotate the token.
        ahead = min(STABLE_ROTATE_AHEAD, self.expires_in / 2)
        if newest is not None:
            remaining = self.ledger.remaining(newest)
            if remaining > ahead:
                return {"access_token": newest, "expires_in": int(remaining)}
        # WeChat's own renewal: the old token keeps its full life (overlap=None).
        token = self.ledger.rotate("stable", appid, overlap=None)
        return {"access_token": token, "expires_in": self.expires_in}

    def api_ticket(self, access_token: str | None, ticket_type: str | None) -> JSONDict:
        """GET /cgi-bin/ticket/getticket: a new jsapi or wx_card ticket each call."""
        self.ledger.check(access_token, ACCOUNT_KINDS)
        if ticket_type not in ("jsapi", "wx_card"):
            raise ApiError(40097, "invalid args")
        return {"errcode": 0, "errmsg": "ok", "ticket": self.ledger.new_ticket(),
                "expires_in": self.expires_in}

    def api_callback_ip(self, access_token: str | None) -> JSONDict:
        """GET /cgi-bin/getcallbackip (see Business.callback_ip)."""
        return self.business.callback_ip(access_token)

    def api_corp_token(self, corpid: str | None, corpsecret: str | None, ip: str) -> JSONDict:
        """GET /cgi-bin/gettoken (see WeCom.gettoken)."""
        return self.wecom.gettoken(corpid, corpsecret, ip)

    def api_quota_get(self, access_token: str | None, raw_body: bytes) -> JSONDict:
        """POST /cgi-bin/openapi/quota/get: the token owner's /cgi-bin/token quota today."""
        appid = self.ledger.check(access_token, ACCOUNT_KINDS).owner
        body = json_object(raw_body)
        if body.get("cgi_path") != TOKEN_PATH:
            raise ApiError(76021, "cgi_path not found, please check")
        day, used = self._quota_used.get(appid, (self._day(), 0))
        used = used if day == self._day() else 0
        return {"errcode": 0, "errmsg": "ok",
                "quota": {"daily_limit": self.daily_quota, "used": used,
                          "remain": max(0, self.daily_quota - used)}}

    def api_clear_quota(self, access_token: str | None, raw_body: bytes) -> JSONDict:
        """POST /cgi-bin/clear_quota: zero an appid's daily quota use, 10 times a month."""
        self.ledger.check(access_token, ACCOUNT_KINDS)
        appid = json_object(raw_body).get("appid")
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
        check_app_secret(self.apps, appid, secret)
        if not self._ip_allowed(ip):
            ipv6 = ip if ":" in ip else f"::ffff:{ip}"
            raise ApiError(40164, f"invalid ip {ip} ipv6 {ipv6}, not in whitelist rid: {rid()}")

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
