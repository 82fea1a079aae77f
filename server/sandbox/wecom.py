"""WeCom (企业微信): one token per app secret, the corp and app JS-SDK tickets, their hourly limits.

WeCom speaks its own dialect of the errcodes: every answer carries ``errcode`` and ``errmsg``, a
token it does not know is 40014 (its 40001 means a wrong secret), and a call over a frequency
limit is 45009 ("api freq out of limit", WeCom's global error code for it).
"""

from __future__ import annotations

import collections
import hmac
from typing import Callable

from server.sandbox.common import ApiError, JSONDict
from server.sandbox.ledger import IssuedToken, Ledger

HOUR = 3600.0  # seconds
CORP_TICKET_HOURLY_LIMIT = 400  # corp jsapi tickets an hour, per corp
AGENT_TICKET_HOURLY_LIMIT = 100  # agent_config tickets an hour, per app
CORP_KINDS = frozenset({"corp"})


class WeCom:
    """The WeCom endpoints. ``corps`` maps corpid -> {agentid: app secret} (shared, not copied);
    ``ip_allowed(ip)`` says whether the whitelist lets ``ip`` fetch a token."""

    def __init__(self, ledger: Ledger, corps: dict[str, dict[str, str]],
                 ip_allowed: Callable[[str], bool], *,
                 corp_ticket_hourly: int = CORP_TICKET_HOURLY_LIMIT,
                 agent_ticket_hourly: int = AGENT_TICKET_HOURLY_LIMIT) -> None:
        self.ledger = ledger
        self.corps = corps
        self.ip_allowed = ip_allowed
        self.corp_ticket_hourly = corp_ticket_hourly
        self.agent_ticket_hourly = agent_ticket_hourly
        # (ticket kind, corpid, agentid) -> clock times of the tickets issued in the last hour
        self._windows: dict[tuple[str, str, str], collections.deque[float]] = {}

    def reset(self) -> None:
        self._windows.clear()

    def gettoken(self, corpid: str | None, corpsecret: str | None, ip: str) -> JSONDict:
        """GET /cgi-bin/gettoken: the same token of that app until it expires, then a new one."""
        if not corpid:
            raise ApiError(41002, "corpid missing")
        if corpid not in self.corps:
            raise ApiError(40013, "invalid corpid")
        if not corpsecret:
            raise ApiError(41004, "corpsecret missing")
        agentid = self._agent_of(corpid, corpsecret)
        if agentid is None:
            raise ApiError(40001, "invalid credential")
        if not self.ip_allowed(ip):
            raise ApiError(60020, f"not allow to access from your ip, from ip: {ip}")
        token = self.ledger.newest("corp", corpid, agentid)
        if token is not None:
            remaining = self.ledger.remaining(token)
            if remaining >= 1:
                return {"errcode": 0, "errmsg": "ok", "access_token": token,
                        "expires_in": int(remaining)}
        token = self.ledger.rotate("corp", corpid, overlap=None, agentid=agentid)
        return {"errcode": 0, "errmsg": "ok", "access_token": token,
                "expires_in": self.ledger.expires_in}

    def corp_jsapi_ticket(self, access_token: str | None) -> JSONDict:
        """GET /cgi-bin/get_jsapi_ticket: a new corp ticket; 400 an hour per corp."""
        entry = self._check(access_token)
        # Only the corp-wide limit of WECHAT_API.md is simulated; counted per corp, any app.
        self._take("corp", entry.owner, "", self.corp_ticket_hourly)
        return self._ticket()

    def agent_ticket(self, access_token: str | None, ticket_type: str | None) -> JSONDict:
        """GET /cgi-bin/ticket/get?type=agent_config: a new app ticket; 100 an hour per app."""
        entry = self._check(access_token)
        if ticket_type != "agent_config":
            # WeCom's "invalid parameter"; the exact code for a wrong type is undocumented.
            raise ApiError(40058, "invalid type")
        self._take("agent", entry.owner, entry.agentid, self.agent_ticket_hourly)
        return self._ticket()

    # -- helpers ----------------------------------------------------------------------------

    def _agent_of(self, corpid: str, corpsecret: str) -> str | None:
        """The agentid whose secret is ``corpsecret``, or None."""
        for agentid, secret in self.corps[corpid].items():
            if hmac.compare_digest(corpsecret.encode(), secret.encode()):
                return agentid
        return None

    def _check(self, access_token: str | None) -> IssuedToken:
        try:
            return self.ledger.check(access_token, CORP_KINDS)
        except ApiError as error:
            if error.errcode == 40001:  # WeCom's word for a token it does not accept
                raise ApiError(40014, "invalid access_token") from None
            raise

    def _take(self, kind: str, corpid: str, agentid: str, limit: int) -> None:
        """Count one ticket in its sliding hour, or raise 45009 if the hour is full.

        A sliding window is at least as strict as WeCom's (undocumented) one, so a client
        that stays within it stays within WeCom's.
        """
        now = self.ledger.clock()
        window = self._windows.setdefault((kind, corpid, agentid), collections.deque())
        while window and window[0] <= now - HOUR:
            window.popleft()
        if len(window) >= limit:
            raise ApiError(45009, "api freq out of limit")
        window.append(now)

    def _ticket(self) -> JSONDict:
        return {"errcode": 0, "errmsg": "ok", "ticket": self.ledger.new_ticket(),
                "expires_in": self.ledger.expires_in}
