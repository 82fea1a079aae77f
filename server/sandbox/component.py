"""Third-party platforms (开放平台第三方平台): the component endpoints, authorisations, and the
encrypted events WeChat pushes to a platform's event URL (shared/WECHAT_API.md).

- ``POST /cgi-bin/component/api_component_token`` needs a verify ticket this simulator pushed
  to that platform in the last 12 hours (61006 otherwise); each call issues a new token (the
  previous overlaps, like ``/cgi-bin/token``).
- ``POST /cgi-bin/component/api_query_auth`` exchanges an authorisation code once (61010 for
  an unknown, used or expired code).
- ``POST /cgi-bin/component/api_authorizer_token``: 61003 when the account has not authorised
  the platform (or withdrew), 61023 for a refresh token that is not the current one; with
  ``rotate_refresh_tokens`` every call also hands out a new refresh token and retires the old.
- Authorizer tokens are ledger tokens of kind ``authorizer``: the business APIs (getticket,
  getcallbackip, message/custom/send...) take them like an official account's.

Events are encrypted here with code of its own (manual 32-byte PKCS#7 over the
``cryptography`` cipher), independent of the server's ``server.platform.crypto``, so tests
compare two implementations of WeChat's rules.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import os
import secrets
import struct
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from server.sandbox.common import ApiError, JSONDict, json_object
from server.sandbox.ledger import Ledger

DEFAULT_COMPONENT_APPID = "wxcomponent0123456"
DEFAULT_COMPONENT_SECRET = "sandbox-component-secret-0123456789"
DEFAULT_MSG_TOKEN = "sandboxMsgToken0123456789"
#: a fixed EncodingAESKey (43 base64 characters) so a config can name it
DEFAULT_AES_KEY = base64.b64encode(hashlib.sha256(b"sandbox component aes key").digest()).decode()[:43]
VERIFY_TICKET_LIFE = 12 * 3600.0  # seconds
CODE_LIFE = 3600.0  # seconds an authorisation code can be exchanged
FUNC_INFO = [{"funcscope_category": {"id": 1}}, {"funcscope_category": {"id": 15}}]


def encrypt_message(aes_key: str, appid: str, xml: bytes, random16: bytes | None = None) -> str:
    """WeChat's encryption of ``xml`` for ``appid`` (base64), written independently of the server's."""
    key = base64.b64decode(aes_key + "=")
    plain = (random16 or os.urandom(16)) + struct.pack(">I", len(xml)) + xml + appid.encode()
    pad = 32 - len(plain) % 32
    plain += bytes([pad]) * pad
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode()


def msg_signature(msg_token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    return hashlib.sha1("".join(sorted([msg_token, timestamp, nonce, encrypt])).encode()).hexdigest()


def _cdata(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"<![CDATA[{value}]]>"


@dataclasses.dataclass
class ComponentApp:
    secret: str
    msg_token: str
    aes_key: str


@dataclasses.dataclass
class Authorization:
    refresh_token: str
    active: bool = True


class Component:
    """Platforms (component appid -> ComponentApp), their verify tickets, authorisations and codes."""

    def __init__(self, ledger: Ledger, apps: dict[str, ComponentApp], ip_allowed: Callable[[str], bool] = lambda ip: True) -> None:
        self.ledger = ledger
        self.apps = apps
        self.ip_allowed = ip_allowed  # the platform's IP whitelist (the sandbox's)
        self.rotate_refresh_tokens = False
        self.tickets: dict[str, dict[str, float]] = {}  # component -> {ticket: issued at}
        self.authorizations: dict[tuple[str, str], Authorization] = {}
        self.codes: dict[str, tuple[str, str, float]] = {}  # code -> (component, authorizer, expires at)
        #: api_authorizer_token and api_query_auth calls that issued a token, per authorizer
        self.token_calls: collections.Counter[str] = collections.Counter()
        #: (clock, authorizer) of each of those calls, the newest 100,000
        self.token_log: collections.deque[tuple[float, str]] = collections.deque(maxlen=100_000)

    def reset(self) -> None:
        self.tickets.clear()
        self.authorizations.clear()
        self.codes.clear()
        self.token_calls.clear()
        self.token_log.clear()

    # -- what WeChat does on its own: tickets, authorisations ------------------------------

    def new_verify_ticket(self, component: str) -> str:
        ticket = "ticket@@@" + self.ledger.new_value()
        self.ledger.other_values.add(ticket)
        now = self.ledger.clock()
        held = self.tickets.setdefault(component, {})
        for old in [t for t, at in held.items() if now - at > VERIFY_TICKET_LIFE]:
            del held[old]
        held[ticket] = now
        return ticket

    def authorize(self, component: str, authorizer: str) -> str:
        """The merchant of ``authorizer`` authorises ``component``: the code to exchange."""
        code = "queryauthcode@@@" + self.ledger.new_value()
        self.ledger.other_values.add(code)
        self.codes[code] = (component, authorizer, self.ledger.clock() + CODE_LIFE)
        current = self.authorizations.get((component, authorizer))
        if current is None or not current.active:
            self.authorizations[(component, authorizer)] = Authorization(self._new_refresh_token())
        return code

    def unauthorize(self, component: str, authorizer: str) -> None:
        """The merchant withdraws: refresh token and tokens stop working at once."""
        auth = self.authorizations.get((component, authorizer))
        if auth is not None:
            auth.active = False
        for token in self.ledger.chains.pop(("authorizer", authorizer, component), []):
            self.ledger.tokens[token].valid_until = float("-inf")

    def invalidate_refresh_token(self, component: str, authorizer: str) -> None:
        """WeChat no longer accepts the refresh token the platform holds (61023 from now on)."""
        self.authorizations[(component, authorizer)].refresh_token = self._new_refresh_token()

    def current_token(self, authorizer: str, component: str = DEFAULT_COMPONENT_APPID) -> str | None:
        return self.ledger.newest("authorizer", authorizer, component)

    def current_refresh_token(self, authorizer: str, component: str = DEFAULT_COMPONENT_APPID) -> str | None:
        auth = self.authorizations.get((component, authorizer))
        return auth.refresh_token if auth is not None else None

    def _new_refresh_token(self) -> str:
        value = "refreshtoken@@@" + self.ledger.new_value()
        self.ledger.other_values.add(value)
        return value

    # -- events pushed to the platform's URL ----------------------------------------------

    def event(self, component: str, info_type: str, *, authorizer: str | None = None,
              code: str | None = None, create_time: int | None = None) -> bytes:
        """The plain XML of an event (a verify ticket is issued for component_verify_ticket)."""
        now = int(self.ledger.clock()) if create_time is None else create_time
        fields: list[tuple[str, Any]] = [("AppId", component), ("CreateTime", now), ("InfoType", info_type)]
        if info_type == "component_verify_ticket":
            fields.append(("ComponentVerifyTicket", self.new_verify_ticket(component)))
        else:
            fields.append(("AuthorizerAppid", authorizer or ""))
            if info_type in ("authorized", "updateauthorized"):
                assert code is not None, "authorized events carry a code"
                fields += [("AuthorizationCode", code), ("AuthorizationCodeExpiredTime", now + int(CODE_LIFE)),
                           ("PreAuthCode", "preauthcode@@@sandbox")]
        return ("<xml>" + "".join(f"<{k}>{_cdata(v)}</{k}>" for k, v in fields) + "</xml>").encode()

    def envelope(self, component: str, xml: bytes, *, timestamp: int | None = None,
                 nonce: str | None = None, aes_key: str | None = None) -> tuple[dict[str, str], bytes]:
        """The query arguments and body WeChat POSTs for ``xml``."""
        app = self.apps[component]
        ts = str(int(self.ledger.clock()) if timestamp is None else timestamp)
        nonce = nonce or str(secrets.randbelow(10**10))
        encrypted = encrypt_message(aes_key or app.aes_key, component, xml)
        query = {"timestamp": ts, "nonce": nonce, "encrypt_type": "aes",
                 "msg_signature": msg_signature(app.msg_token, ts, nonce, encrypted),
                 "signature": hashlib.sha1("".join(sorted([app.msg_token, ts, nonce])).encode()).hexdigest()}
        body = f"<xml><AppId><![CDATA[{component}]]></AppId><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
        return query, body.encode()

    # -- the component endpoints: each returns the body or raises ApiError -----------------

    def check_ip(self, ip: str) -> None:
        """61004 for a caller outside the whitelist (every component call is subject to it)."""
        if not self.ip_allowed(ip):
            raise ApiError(61004, f"access clientip is not registered, not in whitelist rid: {ip}")

    def api_component_token(self, raw_body: bytes, ip: str = "127.0.0.1") -> JSONDict:
        self.check_ip(ip)
        body = json_object(raw_body)
        appid, secret, ticket = (body.get(k) for k in ("component_appid", "component_appsecret", "component_verify_ticket"))
        if not appid or appid not in self.apps:
            raise ApiError(40013, "invalid appid")
        if not isinstance(secret, str) or not secrets.compare_digest(secret.encode(), self.apps[appid].secret.encode()):
            raise ApiError(40125, "invalid appsecret")
        issued = self.tickets.get(appid, {}).get(ticket) if isinstance(ticket, str) else None
        if issued is None or self.ledger.clock() - issued > VERIFY_TICKET_LIFE:
            raise ApiError(61006, "component ticket is invalid")
        token = self.ledger.rotate("component", appid, overlap=self.ledger.overlap)
        return {"component_access_token": token, "expires_in": self.ledger.expires_in}

    def _component(self, component_access_token: str | None, body: JSONDict) -> str:
        entry = self.ledger.check(component_access_token, frozenset({"component"}))
        if body.get("component_appid") != entry.owner:
            raise ApiError(40013, "invalid appid")
        return entry.owner

    def api_query_auth(self, component_access_token: str | None, raw_body: bytes, ip: str = "127.0.0.1") -> JSONDict:
        self.check_ip(ip)
        body = json_object(raw_body)
        component = self._component(component_access_token, body)
        code = body.get("authorization_code")
        found = self.codes.pop(code, None) if isinstance(code, str) else None
        if found is None or found[0] != component or self.ledger.clock() > found[2]:
            raise ApiError(61010, "code is expired or used")
        authorizer = found[1]
        auth = self.authorizations.get((component, authorizer))
        if auth is None or not auth.active:
            raise ApiError(61003, "component is not authorized by this account")
        token = self.ledger.rotate("authorizer", authorizer, overlap=self.ledger.overlap, agentid=component)
        self.token_calls[authorizer] += 1
        self.token_log.append((self.ledger.clock(), authorizer))
        return {"authorization_info": {
            "authorizer_appid": authorizer, "authorizer_access_token": token,
            "expires_in": self.ledger.expires_in, "authorizer_refresh_token": auth.refresh_token,
            "func_info": FUNC_INFO}}

    def api_authorizer_token(self, component_access_token: str | None, raw_body: bytes, ip: str = "127.0.0.1") -> JSONDict:
        self.check_ip(ip)
        body = json_object(raw_body)
        component = self._component(component_access_token, body)
        authorizer, refresh = body.get("authorizer_appid"), body.get("authorizer_refresh_token")
        auth = self.authorizations.get((component, authorizer)) if isinstance(authorizer, str) else None
        if auth is None or not auth.active:
            raise ApiError(61003, "component is not authorized by this account")
        assert isinstance(authorizer, str)
        if not isinstance(refresh, str) or not secrets.compare_digest(refresh.encode(), auth.refresh_token.encode()):
            raise ApiError(61023, "refresh_token is invalid")
        token = self.ledger.rotate("authorizer", authorizer, overlap=self.ledger.overlap, agentid=component)
        self.token_calls[authorizer] += 1
        self.token_log.append((self.ledger.clock(), authorizer))
        if self.rotate_refresh_tokens:
            auth.refresh_token = self._new_refresh_token()
        return {"authorizer_access_token": token, "expires_in": self.ledger.expires_in,
                "authorizer_refresh_token": auth.refresh_token}

    def stats(self) -> JSONDict:
        """Counts, and ``min_gap``: the shortest time (seconds) between two token calls for
        one authorizer in the log (a double refresh shows as a gap near 0; None: no pair)."""
        calls = self.token_calls
        last: dict[str, float] = {}
        gap: float | None = None
        for at, authorizer in self.token_log:
            if authorizer in last:
                gap = at - last[authorizer] if gap is None else min(gap, at - last[authorizer])
            last[authorizer] = at
        return {"authorizer_token_calls": sum(calls.values()), "authorizers_refreshed": len(calls),
                "authorizations": sum(1 for a in self.authorizations.values() if a.active), "min_gap": gap}


def push_body(component: Component, component_appid: str, info_type: str, **fields: Any) -> tuple[dict[str, str], bytes]:
    """Query and body of one event, ready to POST (``fields``: authorizer, code, create_time,
    timestamp, nonce, aes_key)."""
    env = {k: fields.pop(k) for k in ("timestamp", "nonce", "aes_key") if k in fields}
    xml = component.event(component_appid, info_type, **fields)
    return component.envelope(component_appid, xml, **env)


__all__ = ["Component", "ComponentApp", "DEFAULT_AES_KEY", "DEFAULT_COMPONENT_APPID", "DEFAULT_COMPONENT_SECRET",
           "DEFAULT_MSG_TOKEN", "encrypt_message", "msg_signature", "push_body"]
