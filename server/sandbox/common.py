"""What every part of the simulator shares: default credentials, paths, limits and ApiError."""

from __future__ import annotations

import hmac
import json
import re
import secrets
from typing import Any

JSONDict = dict[str, Any]

DEFAULT_APPID = "wx123"
DEFAULT_APPSECRET = "sandbox-appsecret-0123456789"
DEFAULT_CORPID = "ww123"
DEFAULT_CORPSECRET = "sandbox-corpsecret-0123456789"
# The app a ``corps={corpid: secret}`` secret belongs to (WeCom numbers self-built apps from 1000002).
DEFAULT_AGENTID = "1000002"

TOKEN_PATH = "/cgi-bin/token"
STABLE_TOKEN_PATH = "/cgi-bin/stable_token"
TICKET_PATH = "/cgi-bin/ticket/getticket"
CALLBACK_IP_PATH = "/cgi-bin/getcallbackip"
CORP_TOKEN_PATH = "/cgi-bin/gettoken"
QUOTA_GET_PATH = "/cgi-bin/openapi/quota/get"
CLEAR_QUOTA_PATH = "/cgi-bin/clear_quota"
CORP_JSAPI_TICKET_PATH = "/cgi-bin/get_jsapi_ticket"  # WeCom: the corp ticket, for wx.config
AGENT_TICKET_PATH = "/cgi-bin/ticket/get"  # WeCom: ?type=agent_config, for wx.agentConfig
MESSAGE_SEND_PATH = "/cgi-bin/message/custom/send"
MEDIA_UPLOAD_PATH = "/cgi-bin/media/upload"
SNS_OAUTH_PATH = "/sns/oauth2/access_token"
# Third-party platforms (server.sandbox.component)
COMPONENT_TOKEN_PATH = "/cgi-bin/component/api_component_token"
QUERY_AUTH_PATH = "/cgi-bin/component/api_query_auth"
AUTHORIZER_TOKEN_PATH = "/cgi-bin/component/api_authorizer_token"
API_PATHS = (TOKEN_PATH, STABLE_TOKEN_PATH, TICKET_PATH, CALLBACK_IP_PATH,
             CORP_TOKEN_PATH, QUOTA_GET_PATH, CLEAR_QUOTA_PATH,
             CORP_JSAPI_TICKET_PATH, AGENT_TICKET_PATH, MESSAGE_SEND_PATH, MEDIA_UPLOAD_PATH,
             SNS_OAUTH_PATH, COMPONENT_TOKEN_PATH, QUERY_AUTH_PATH, AUTHORIZER_TOKEN_PATH)

FAULT_KINDS = frozenset({"busy", "errcode", "http_error", "garbage", "missing_field", "hang"})

TOKEN_BYTES = 105  # random bytes per token or ticket: 140 URL-safe characters, like WeChat's
# WeChat asks callers to reserve 512 bytes for a token; anything longer, or with a character no
# token ever has, is malformed (40014) rather than merely unknown (40001).
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,512}")


class ApiError(Exception):
    """A WeChat error answer: HTTP 200 with ``{"errcode": N, "errmsg": "..."}``."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(errcode, errmsg)
        self.errcode = errcode
        self.errmsg = errmsg

    def body(self) -> JSONDict:
        return {"errcode": self.errcode, "errmsg": self.errmsg}


def rid() -> str:
    """A request id in WeChat's style, appended to some errmsgs."""
    return "-".join(secrets.token_hex(4) for _ in range(3))


def new_value() -> str:
    """A random token-like value: 140 URL-safe characters."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def json_object(raw: bytes) -> JSONDict:
    """Parse a POST body as WeChat does: anything but a JSON object is 47001."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(47001, "data format error") from None
    if not isinstance(body, dict):
        raise ApiError(47001, "data format error")
    return body


def check_app_secret(apps: dict[str, str], appid: str | None, secret: str | None) -> None:
    """Raise WeChat's errcode for a missing or unknown appid or a wrong secret."""
    if not appid:
        raise ApiError(41002, "appid missing")
    if appid not in apps:
        raise ApiError(40013, "invalid appid")
    if not secret:
        raise ApiError(41004, "appsecret missing")
    if not hmac.compare_digest(secret.encode(), apps[appid].encode()):
        raise ApiError(40125, "invalid appsecret")
