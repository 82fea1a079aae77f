"""The platform's HTTP endpoints, and its hooks into the token API and the API proxy.

- ``POST /wechat/component/events``: WeChat's pushes (see :mod:`server.platform.events`);
  no secret (the signature is the proof), outside ``server.allow_ips`` like ``/healthz``
  (WeChat comes through nginx, a trusted proxy).
- ``POST /wechat/component/authorizers`` (operator: ``server.secret``): exchange an
  ``authorization_code`` (the one the merchant's browser brought to the redirect URI).
- ``GET /wechat/component/status?account=P&offset=0&count=50`` (operator): a summary and one
  page of authorizers (usable with 10,000 of them).
- ``/wechat/token?type=access_token&appid=<authorizer>`` (``type=ticket``: its jsapi ticket,
  fetched the first time it is asked for) for a client allowed the platform's source.
- The API proxy accepts an authorizer's token and puts its current one in.
- ``/status``: the core's, where a component token waiting for its first verify ticket says
  ``"state": "waiting"`` (the refresher alone knows only that it has no value and no failure).

:func:`platform_routes` takes a prefix: the standalone server mounts them at the root, an
embedding (``server.embed``) under its own prefix.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import tornado.web
from redis.exceptions import RedisError

from server.accounts import TOKEN, Account
from server.auth import OPERATOR, Principal
from server.config import JssdkConfig
from server.face.base import INVALID_CREDENTIAL, SYSTEM_ERROR, WeChatError
from server.face.proxy import ProxyHandler
from server.handlers import BaseHandler, NotFoundHandler, TokenHandler
from server.platform.events import EventRefused
from server.platform.service import Platform, Platforms
from server.state import Unavailable
from server.upstream import UpstreamError

logger = logging.getLogger(__name__)

MAX_PAGE = 500


class PlatformHandler(BaseHandler):
    def initialize(self, platforms: Platforms, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.platforms = platforms

    def platform(self, name: str | None) -> Platform:
        if name is None and len(self.platforms.by_name) == 1:
            return next(iter(self.platforms.by_name.values()))
        found = self.platforms.by_name.get(name or "")
        if found is None:
            raise tornado.web.HTTPError(404, reason="unknown platform account" if name else "name the platform: account=NAME")
        return found

    def operator_only(self) -> None:
        p = self.principal
        if p is None or p.name != OPERATOR or p.via != "secret":
            raise tornado.web.HTTPError(403, "client %s is not the operator", p.name if p else "-", reason="operator only")


class EventsHandler(PlatformHandler):
    SUPPORTED_METHODS = ("POST",)
    needs_auth = False
    check_ip = False
    arguments = frozenset({"timestamp", "nonce", "encrypt_type", "msg_signature", "signature", "openid"})

    async def post(self) -> None:
        """``POST /wechat/component/events?timestamp=1700000000&nonce=123&encrypt_type=aes&msg_signature=S``
        with ``<xml><AppId>wx..</AppId><Encrypt>..</Encrypt></xml>`` -> ``200 success`` (plain text)."""
        query = {k: v for k in self.arguments if (v := self.argument(k)) is not None}
        try:
            answer = await self.platforms.events.handle(query, self.request.body)
        except EventRefused as e:
            raise tornado.web.HTTPError(e.status, "%s", e, reason=e.reason) from None
        except (Unavailable, UpstreamError) as e:
            raise tornado.web.HTTPError(503, "component event could not be handled: %s", e, reason="try again") from None
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(answer)


class AuthorizersHandler(PlatformHandler):
    SUPPORTED_METHODS = ("POST",)
    arguments = frozenset({"account"})

    async def post(self) -> None:
        """``POST /wechat/component/authorizers {"authorization_code": "queryauthcode@@@..."}`` (operator)
        -> ``200 {"authorizer_appid": "wx...", "exchanged": true}`` (``false``: already exchanged)."""
        self.operator_only()
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON") from None
        code = body.get("authorization_code") if isinstance(body, dict) else None
        if not isinstance(code, str) or not code or len(code) > 512:
            raise tornado.web.HTTPError(400, reason="authorization_code missing")
        p = self.platform(self.argument("account") or (body.get("account") if isinstance(body.get("account"), str) else None))
        try:
            appid = await self.platforms.authorize(p, code)
        except Unavailable as e:
            raise tornado.web.HTTPError(503, "authorisation on %s: %s", p.parts.name, e, reason=str(e)[:200]) from None
        except UpstreamError as e:
            raise tornado.web.HTTPError(502, "authorisation on %s: %s", p.parts.name, e, reason=f"WeChat refused the code: errcode {e.errcode}") from None
        self.finish({"authorizer_appid": appid, "exchanged": appid is not None})


class StatusHandler(PlatformHandler):
    arguments = frozenset({"account", "offset", "count"})

    async def get(self) -> None:
        """``GET /wechat/component/status?offset=0&count=50`` (operator) -> ``{"platform": "myplatform",
        "verify_ticket": "held", "scheduled": 10000, "due": 0, "claimed": 3, "blocked": 1, "authorizers": [{"appid":
        "wx..", "what": "access_token", "due_in": 5234.1, "state": "ok", "failures": 0}, ...],
        "blocked_authorizers": [{"appid": "wx..", "errcode": 61023}]}``"""
        self.operator_only()
        try:
            offset, count = int(self.argument("offset") or 0), int(self.argument("count") or 50)
        except ValueError:
            raise tornado.web.HTTPError(400, reason="offset and count are numbers") from None
        p = self.platform(self.argument("account"))
        self.finish(await self.platforms.status(p, max(0, offset), min(max(1, count), MAX_PAGE)))


class PlatformTokenHandler(TokenHandler):
    """``/wechat/token`` with an ``appid`` that is an authorizer's rather than an account's."""

    def initialize(self, platforms: Platforms, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.platforms = platforms

    async def get(self) -> None:
        """``GET /wechat/token?type=access_token&appid=wxAUTHORIZER`` -> ``200 {"access_token": "...",
        "expires_in": 5231}``; ``type=ticket`` -> ``{"ticket": "...", "expires_in": 7000}``.  503 for a
        blocked or withdrawn authorizer (with why), 404 for an appid no platform knows."""
        appid = self.argument("appid")
        if appid is None or self.argument("account") is not None or appid in self.accounts.by_appid:
            return await super().get()
        try:
            p = await self.platforms.locate(appid)
        except RedisError as e:
            raise tornado.web.HTTPError(503, "authorizer %s: redis unreachable: %s", appid, type(e).__name__, reason="redis unreachable") from None
        if p is None:
            return await super().get()  # its 404
        type_ = self.argument("type")
        if type_ not in (TOKEN, "ticket"):
            raise tornado.web.HTTPError(404, reason="unknown type")
        if self.principal is not None and not self.principal.may_use(p.parts.source):
            raise tornado.web.HTTPError(403, "client %s may not use platform %s", self.principal.name, p.parts.name, reason="type not allowed for this client")
        try:
            value = await (self.platforms.token(p, appid) if type_ == TOKEN else self.platforms.ticket(p, appid))
        except Unavailable as e:
            raise tornado.web.HTTPError(503, "%s", e, reason=str(e)[:200]) from None
        self.finish({type_: value.value, "expires_in": max(0, int(value.expires_in))})


class AuthorizerProxyHandler(ProxyHandler):
    """The API proxy, also for authorizers' tokens (which the face's own lookup does not know)."""

    authorizer: tuple[Platform, str] | None = None

    def initialize(self, platforms: Platforms, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.platforms = platforms

    async def token_owner(self) -> tuple[Account, str]:
        try:
            return await super().token_owner()
        except WeChatError as e:
            if e.errcode != INVALID_CREDENTIAL[0]:
                raise
            token = self.query("access_token") or ""
            try:
                found = await self.platforms.owner_of(token) if len(token) <= 512 else None
            except RedisError as err:
                raise WeChatError(SYSTEM_ERROR, "face: authorizer token lookup: redis %s", type(err).__name__) from None
            if found is None:
                raise
        p, appid = found
        self.authorizer = found
        name = f"{p.parts.name}.{appid}"
        account = Account(name, "official", appid, None, p.parts.api.api_base, {TOKEN: name + "." + TOKEN}, False, JssdkConfig(), b"")
        self.principal = Principal(f"authorizer:{name}", frozenset({p.parts.source}), via="token")
        return account, token

    async def current_token(self, source: str) -> str:
        if self.authorizer is None:
            return await super().current_token(source)
        p, appid = self.authorizer
        try:
            return (await self.platforms.token(p, appid)).value
        except Unavailable as e:
            raise WeChatError(SYSTEM_ERROR, "face: %s", e) from None

    async def rotate(self, source: str, errcode: int) -> str | None:
        if self.authorizer is None:
            return await super().rotate(source, errcode)
        p, appid = self.authorizer
        assert self.token_used is not None
        logger.warning("face: authorizer %s %s: WeChat answered %d; refreshing its token (if still current) and retrying once", appid, self.request.path, errcode)
        return await self.platforms.refresh_if_current(p, appid, self.token_used)

    async def note_rejected(self, source: str, fresh: str) -> None:
        if self.authorizer is None:
            return await super().note_rejected(source, fresh)
        p, appid = self.authorizer
        await self.platforms.note_rejected(p, appid, fresh)


def platform_routes(platforms: Platforms, deps: dict[str, Any], prefix: str = "") -> list[Any]:
    """Routes under ``prefix`` ("" or "/path") that go before the application's own
    (``/wechat/token`` is taken over for authorizers' appids)."""
    args = {**deps, "platforms": platforms}
    return [
        (prefix + r"/wechat/component/events", EventsHandler, args),
        (prefix + r"/wechat/component/authorizers", AuthorizersHandler, args),
        (prefix + r"/wechat/component/status", StatusHandler, args),
        (prefix + r"/wechat/token", PlatformTokenHandler, args),
    ]


def take_proxy(app: tornado.web.Application, platforms: Platforms, face: Any, deps: dict[str, Any]) -> None:
    """Make the face's API proxy (the default handler) accept authorizers' tokens too, also
    when no account of another kind is configured (then the face alone would have no proxy)."""
    if face is None:
        return
    if not deps["accounts"]:
        app.wildcard_router.add_rules([(r"/wechat/.*", NotFoundHandler, deps)])  # our namespace keeps our dialect
    app.settings["default_handler_class"] = AuthorizerProxyHandler
    app.settings["default_handler_args"] = {**deps, "face": face, "platforms": platforms}
