"""The token and ticket endpoints of WeChat's API, answered from the cache.

An SDK whose API host is this server fetches its token here, exactly as from WeChat, and
gets the value the refresher holds: no upstream call is made that the refresher would not
make anyway (``refresher.current`` never calls; ``force_refresh`` is a forced refresh under
the usual rules).  The account's one token is served whichever endpoint asks (stable,
classic): to the SDK any valid token is as good, and the account's ``token:`` setting decides
which one WeChat issues.
"""

from __future__ import annotations

import json
import logging

from server.accounts import TOKEN, Account
from server.face.base import (
    APPID_MISSING,
    APPSECRET_MISSING,
    DAILY_QUOTA,
    DATA_FORMAT,
    INVALID_APPID,
    INVALID_APPSECRET,
    INVALID_ARGS,
    INVALID_GRANT_TYPE,
    MINUTE_QUOTA,
    SYSTEM_ERROR,
    FaceHandler,
    WeChatError,
)
from server.handlers import encoded_answer
from server.state import Blocked, NotPermitted, Unavailable
from server.store import Entry
from server.upstream import UpstreamError

logger = logging.getLogger(__name__)

CORPID_MISSING = (41002, "corpid missing")
CORPSECRET_MISSING = (41004, "corpsecret missing")
INVALID_CORPID = (40013, "invalid corpid")
INVALID_CORPSECRET = (40001, "invalid credential")


class TokenFace(FaceHandler):
    """What the three token endpoints share: who the caller is, and the answer."""

    async def official_account(self, grant_type: object, appid: object, secret: object) -> Account:
        """The official account or mini program the request names, in WeChat's order of
        checks: 40002, 41002, 40013, 41004, 40125 (the last two of three counted as failures)."""
        if grant_type != "client_credential":
            raise WeChatError(INVALID_GRANT_TYPE)
        if not appid or not isinstance(appid, str):
            raise WeChatError(APPID_MISSING)
        key = await self.limit_key()
        account = self.accounts.by_appid.get(appid)
        if account is None or account.kind == "wecom":
            await self.failed(key, INVALID_APPID, "unknown appid")
        if not secret or not isinstance(secret, str):
            raise WeChatError(APPSECRET_MISSING)
        if not self.secret_admits(account, secret):
            await self.failed(key, INVALID_APPSECRET, f"wrong secret for account {account.name}")
        return account

    async def token_entry(self, account: Account, force: bool = False) -> Entry:
        """The account's token from the cache, or a forced refresh under the usual rules
        (``refresh.force_min_interval``, ``server.forcerefresh_per_minute``)."""
        name = account.sources[TOKEN]
        try:
            if not force:
                return await self.refresher.current(name)
            assert self.principal is not None  # set by secret_admits
            return await self.refresher.refresh(name, force=True, permit=self.auth.forcerefresh_permit(self.principal, name))
        except NotPermitted as e:
            raise WeChatError(MINUTE_QUOTA, "face: %s", e) from None
        except Blocked as e:
            quota = "45009" in str(e)
            raise WeChatError(DAILY_QUOTA if quota else SYSTEM_ERROR, "face: token of %s: %s", account.name, e) from None
        except (Unavailable, UpstreamError) as e:
            raise WeChatError(SYSTEM_ERROR, "face: token of %s: %s", account.name, e) from None


class ClassicTokenHandler(TokenFace):
    SUPPORTED_METHODS = ("GET",)

    async def get(self) -> None:
        """``GET /cgi-bin/token?grant_type=client_credential&appid=wx123&secret=APPSECRET`` ->
        ``{"access_token": "ACCESS_TOKEN", "expires_in": 5231}``"""
        account = await self.official_account(self.query("grant_type"), self.query("appid"), self.query("secret"))
        entry = await self.token_entry(account)
        self.finish(encoded_answer("access_token", entry.value, max(0, int(entry.remaining()))))


class StableTokenHandler(TokenFace):
    SUPPORTED_METHODS = ("POST",)

    async def post(self) -> None:
        """``POST /cgi-bin/stable_token {"grant_type": "client_credential", "appid": "wx123",
        "secret": "APPSECRET", "force_refresh": false}`` -> ``{"access_token": "ACCESS_TOKEN",
        "expires_in": 5231}``; 47001 for a body that is not such an object."""
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise WeChatError(DATA_FORMAT) from None
        if not isinstance(body, dict):
            raise WeChatError(DATA_FORMAT)
        force = body.get("force_refresh", False)
        fields = [body.get(k) for k in ("grant_type", "appid", "secret")]
        if not isinstance(force, bool) or not all(v is None or isinstance(v, str) for v in fields):
            raise WeChatError(DATA_FORMAT)
        account = await self.official_account(*fields)
        entry = await self.token_entry(account, force=force)
        self.finish(encoded_answer("access_token", entry.value, max(0, int(entry.remaining()))))


class CorpTokenHandler(TokenFace):
    SUPPORTED_METHODS = ("GET",)

    async def get(self) -> None:
        """WeCom: ``GET /cgi-bin/gettoken?corpid=ww123&corpsecret=SECRET`` -> ``{"errcode": 0,
        "errmsg": "ok", "access_token": "ACCESS_TOKEN", "expires_in": 5231}``.

        A corp may have several apps (one account each): the secret says which one.
        """
        corpid, secret = self.query("corpid"), self.query("corpsecret")
        if not corpid:
            raise WeChatError(CORPID_MISSING)
        key = await self.limit_key()
        apps = [a for a in self.accounts.by_name.values() if a.kind == "wecom" and a.appid == corpid]
        if not apps:
            await self.failed(key, INVALID_CORPID, "unknown corpid")
        if not secret:
            raise WeChatError(CORPSECRET_MISSING)
        # The app whose own secret it is; else the one app a client secret is allowed
        # (several would be ambiguous: refused like a wrong secret).
        own = [a for a in apps if a.secret_matches(secret)]
        admitted = own or [a for a in apps if self.secret_admits(a, secret)]
        if len(admitted) != 1:
            await self.failed(key, INVALID_CORPSECRET, f"wrong corpsecret for corpid of {apps[0].name}")
        account = admitted[0]
        self.secret_admits(account, secret)  # the principal of the one chosen
        entry = await self.token_entry(account)
        self.finish(encoded_answer("access_token", entry.value, max(0, int(entry.remaining())), errcode=True))


class TicketHandler(FaceHandler):
    """``GET /cgi-bin/ticket/getticket?access_token=T&type=jsapi`` -> ``{"errcode": 0, "errmsg":
    "ok", "ticket": "TICKET", "expires_in": 5231}``: the cached ticket of the account T was
    issued for (40001 for a T this server did not issue)."""

    SUPPORTED_METHODS = ("GET",)
    #: the ``type`` argument -> the account's ticket type (None: the route takes no type)
    TYPES: dict[str | None, str] = {"jsapi": "ticket", "wx_card": "wx_card_ticket"}

    async def get(self) -> None:
        account, _ = await self.token_owner()
        type_ = self.TYPES.get(self.query("type"))
        name = account.source(type_) if type_ is not None else None
        if name is None:
            # Not kept for this account: configure it under accounts.NAME.tickets.
            raise WeChatError(INVALID_ARGS, "face: %s asked for a ticket account %s does not keep", self.request.path, account.name)
        try:
            entry = await self.refresher.current(name)
        except Unavailable as e:
            raise WeChatError(SYSTEM_ERROR, "face: %s: %s", name, e) from None
        self.finish(encoded_answer("ticket", entry.value, max(0, int(entry.remaining())), errcode=True))


class CorpJsapiTicketHandler(TicketHandler):
    """WeCom: ``GET /cgi-bin/get_jsapi_ticket?access_token=T`` -> the corp's jsapi ticket."""

    TYPES = {None: "ticket"}


class AgentTicketHandler(TicketHandler):
    """WeCom: ``GET /cgi-bin/ticket/get?access_token=T&type=agent_config`` -> the app's ticket."""

    TYPES = {"agent_config": "agent_config_ticket"}

