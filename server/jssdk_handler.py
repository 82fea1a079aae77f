"""``GET /wechat/jssdk/config``: a signed ``wx.config`` (or ``wx.agentConfig``) for a web page.

The signature is computed here (:mod:`server.jssdk`) from the account's cached ticket, read
through ``refresher.current``: signing never calls WeChat.

Two ways in:

- **Authenticated** (default, like every endpoint): the usual gate of
  :class:`server.handlers.BaseHandler` (IP allowlist, brute-force limit, credential); the
  client needs the account's ticket source in its scope.
- **Public** (``accounts.NAME.jssdk.public: true``): a request that presents *no* credential
  and names a public account is let in without one, so a static page can sign itself from the
  browser.  Such a request skips the IP allowlist (browsers cannot be listed; with
  ``server.allow_ips`` set they reach the server through a trusted proxy, since other peers are
  refused at accept) and is instead counted per client IP (IPv6: per /64) against
  ``jssdk.public_per_minute`` in Redis (:class:`server.ratelimit.SharedLimit`, shared by every
  instance): past it, 429 with ``Retry-After``.  It can only ever read that account's ticket
  signatures for pages on ``jssdk.allowed_domains``; every other endpoint, and every other
  account, still wants a credential.  CORS: ``Access-Control-Allow-Origin`` echoes the
  request's ``Origin`` only when that origin is a page origin on ``allowed_domains`` (never
  ``*``), errors included so the page can read them; ``Vary: Origin`` always.  ``OPTIONS`` (the
  CORS preflight) answers 204 for such an origin.

A request that presents a credential always takes the authenticated way, even for a public
account: a wrong secret is a wrong secret.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis.asyncio as aioredis
import tornado.web

from server import jssdk
from server.accounts import Account, Accounts, LookupFailed
from server.auth import Authenticator, AuthError, Principal, presented_credential
from server.handlers import ActiveRequests, BaseHandler, Refused
from server.ratelimit import SharedLimit
from server.redact import printable
from server.refresher import Refresher
from server.state import Unavailable

#: ``type`` -> the ticket type (account source type) it signs with
SIGN_WITH = {"config": "ticket", "agent_config": "agent_config_ticket"}
#: The principal of a public request, for the access log (``client=public auth=public``).
PUBLIC = "public"
PREFLIGHT_MAX_AGE = 600  # seconds a browser may cache a preflight answer


def public_limits(redis: aioredis.Redis, prefix: str, accounts: Accounts) -> dict[str, SharedLimit]:
    """One shared per-IP limit for each account with ``jssdk.public: true``, by account name."""
    return {
        a.name: SharedLimit(redis, prefix, f"jssdk-public-{a.name}", a.jssdk.public_per_minute)
        for a in accounts.by_name.values()
        if a.jssdk.public
    }


class JssdkConfigHandler(BaseHandler):
    arguments = frozenset({"url", "type", "account", "appid"})
    #: the allowed Origin to echo in Access-Control-Allow-Origin (public mode only).  A class
    #: attribute: Tornado sets the default headers before ``initialize`` runs.
    cors_origin: str | None = None

    def initialize(  # type: ignore[override]
        self,
        refresher: Refresher,
        auth: Authenticator,
        active: ActiveRequests,
        accounts: Accounts,
        public_limits: Mapping[str, SharedLimit],
    ) -> None:
        super().initialize(refresher, auth, active, accounts)
        self.public_limits = public_limits

    def set_default_headers(self) -> None:
        super().set_default_headers()
        # Every answer depends on Origin, so no cache may hand one origin's answer to another.
        self.set_header("Vary", "Origin")
        if self.cors_origin is not None:
            self.set_header("Access-Control-Allow-Origin", self.cors_origin)

    async def prepare(self) -> None:
        account = self._public_account()
        if account is None:
            await self.gate()
        else:
            await self._public_gate(account)
        self.check_arguments()

    def _public_account(self) -> Account | None:
        """The public account this request may use without a credential, or None (then it takes
        the ordinary gate, which answers whatever is wrong with it in the usual order)."""
        try:
            if presented_credential(self.request) is not None:
                return None
        except AuthError:
            return None  # a repeated credential: the gate says so
        try:
            names = [self._single_argument(n) for n in ("account", "appid")]
            account = self.accounts.find(names[0], names[1])
        except (LookupFailed, ValueError):
            return None
        # Without its limit (an app built with no public_limits) public mode is off: never unlimited.
        if account is None or not account.jssdk.public or account.name not in self.public_limits:
            return None
        return account

    def _single_argument(self, name: str) -> str | None:
        """A query argument before check_arguments has run; ValueError when it is ambiguous."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        if len(values) > 1 or len(values[0]) > 256:
            raise ValueError(name)
        return values[0].decode("utf-8")  # UnicodeDecodeError is a ValueError

    async def _public_gate(self, account: Account) -> None:
        """Public mode: CORS for an allowed Origin, then the per-IP limit (see the module docstring)."""
        origin = self.request.headers.get_list("Origin")
        if len(origin) == 1 and jssdk.origin_allowed(origin[0], account.jssdk.allowed_domains):
            self.cors_origin = origin[0]
            self.set_header("Access-Control-Allow-Origin", origin[0])  # the defaults were set already
        self.ip = self.auth.client_ip(self.request)
        # Only this account's tickets: the scope check in get() holds public requests to them too.
        tickets = frozenset(s for t, s in account.sources.items() if t in SIGN_WITH.values())
        self.principal = Principal(PUBLIC, tickets, via=PUBLIC)
        key = self.auth.limit_key(self.ip)
        wait = await self.public_limits[account.name].hit(key)
        if wait > 0:
            detail = f"public jssdk of {account.name}: ip {printable(key, 64)} over jssdk.public_per_minute"
            raise Refused(AuthError(429, "too many requests", detail, retry_after=wait))

    async def get(self) -> None:
        """A signature for ``url``, ready for ``wx.config`` (or ``wx.agentConfig``).

        ``GET /wechat/jssdk/config?url=https%3A%2F%2Fshop.example.com%2Fpay%3Fid%3D7&account=main``
        -> ``200 {"appId": "wx123", "timestamp": 1700000000, "nonceStr": "Wm3WZYTPz0wzccnW",
        "signature": "0f9d...", "url": "https://shop.example.com/pay?id=7"}``.  The fragment is
        cut from ``url`` before signing; ``timestamp`` is unix seconds.  WeCom: without ``type``
        ``appId`` is the corpid (corp jsapi ticket); ``type=agent_config`` -> ``{"corpid",
        "agentid", "timestamp", "nonceStr", "signature", "url"}`` (agent ticket).

        400 missing or malformed url; 403 a page not on ``jssdk.allowed_domains`` or a client
        without the ticket in its scope; 404 unknown account, or no such ticket for it; 503 no
        valid ticket now.
        """
        account = self._account()
        kind = self.argument("type") or "config"
        if kind not in SIGN_WITH:
            raise tornado.web.HTTPError(404, reason="unknown type; use config or agent_config")
        source = account.source(SIGN_WITH[kind])
        if source is None or source not in self.refresher.sources or (kind == "agent_config" and account.agentid is None):
            ticket = "agent_config" if kind == "agent_config" else "jsapi"
            raise tornado.web.HTTPError(404, reason=f"account has no {ticket} ticket (accounts.NAME.tickets)")
        if self.principal is not None and not self.principal.may_use(source):
            raise tornado.web.HTTPError(403, "client %s may not use %s", self.principal.name, source, reason="type not allowed for this client")
        raw = self.argument("url")
        if not raw:
            raise tornado.web.HTTPError(400, reason="missing url")
        try:
            page = jssdk.parse_page(raw)
        except jssdk.BadPageURL as e:
            raise tornado.web.HTTPError(400, reason=str(e)) from None
        if not jssdk.host_allowed(page.host, page.port, account.jssdk.allowed_domains):
            raise tornado.web.HTTPError(
                403, "jssdk: %s:%d not on accounts.%s.jssdk.allowed_domains", printable(page.host, 64), page.port, account.name,
                reason="page not on this account's jssdk.allowed_domains",
            )
        try:
            entry = await self.refresher.current(source)
        except Unavailable as e:
            raise tornado.web.HTTPError(503, "jssdk of %s: %s", account.name, e, reason="no valid ticket: upstream is failing") from None
        # WeChat only hashes the timestamp (no validity window is documented), so no other host
        # orders it against ours: the local clock is enough, and costs no Redis round trip.
        timestamp = int(time.time())
        nonce = jssdk.new_nonce()
        signature = jssdk.sign(entry.value, nonce, timestamp, page.url)
        if kind == "agent_config":
            self.finish({"corpid": account.appid, "agentid": str(account.agentid), "timestamp": timestamp,
                         "nonceStr": nonce, "signature": signature, "url": page.url})
        else:
            self.finish({"appId": account.appid, "timestamp": timestamp, "nonceStr": nonce, "signature": signature, "url": page.url})

    async def options(self) -> None:
        """The CORS preflight of public mode: ``204`` with ``Access-Control-Allow-Origin`` for an
        allowed page origin, ``403`` for any other (a non-public account needs a credential
        first, which a preflight never carries: 401)."""
        if self.cors_origin is None:
            raise tornado.web.HTTPError(403, reason="origin not allowed")
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", "GET")
        self.set_header("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))
        self.clear_header("Content-Type")
        self.finish()

    def _account(self) -> Account:
        try:
            account = self.accounts.find(self.argument("account"), self.argument("appid"))
        except LookupFailed as e:
            raise tornado.web.HTTPError(404, reason=str(e)) from None
        if account is None:
            if not self.accounts:
                raise tornado.web.HTTPError(404, reason="no accounts configured: JS-SDK signing needs accounts:")
            raise tornado.web.HTTPError(400, reason="name the account: account=NAME or appid=APPID")
        return account
