"""A simulator of WeChat's APIs, for tests, benchmarks and ``--demo`` mode.

The real API cannot be reached from build and test machines, so this package reproduces the
behaviour described in WECHAT_API.md: token rotation with a five-minute overlap, the stable-token
rules, tickets, errcodes, daily quotas and an IP whitelist, for several official accounts, mini
programs and WeCom corps at once; and the business APIs a WeChat-shaped proxy forwards (a JSON
POST, a multipart media upload, web login), recording what reached them. Tests drive it either
in-process (``make_app(Sandbox(clock=...))``) or as a subprocess (``python -m server.sandbox``)
through the ``/sandbox/*`` control API; faults (busy, errcodes, HTTP 5xx, garbage, hangs) are
injected here so that the code under test never needs monkeypatching.

All times are seconds of ``Sandbox.clock`` (``time.time`` unless a test passes a fake clock).

Rooms, each depending only on those above it:

- ``common``: default credentials, paths, ApiError;
- ``ledger``: issued tokens and tickets, and when each dies;
- ``control``: queued faults, the record of calls;
- ``wecom`` / ``business``: WeCom's token and tickets / the business APIs;
- ``core``: ``Sandbox``, owning all of the above, with the official-account token endpoints;
- ``handlers``: HTTP (``make_app``); ``cli``: ``python -m server.sandbox``.
"""

from server.sandbox.business import CALLBACK_IPS, MEDIA_LIMITS
from server.sandbox.cli import main
from server.sandbox.common import (
    AGENT_TICKET_PATH,
    API_PATHS,
    CALLBACK_IP_PATH,
    CLEAR_QUOTA_PATH,
    CORP_JSAPI_TICKET_PATH,
    CORP_TOKEN_PATH,
    DEFAULT_AGENTID,
    DEFAULT_APPID,
    DEFAULT_APPSECRET,
    DEFAULT_CORPID,
    DEFAULT_CORPSECRET,
    FAULT_KINDS,
    MEDIA_UPLOAD_PATH,
    MESSAGE_SEND_PATH,
    QUOTA_GET_PATH,
    SNS_OAUTH_PATH,
    STABLE_TOKEN_PATH,
    TICKET_PATH,
    TOKEN_BYTES,
    TOKEN_PATH,
    ApiError,
    JSONDict,
)
from server.sandbox.control import RecordedCall
from server.sandbox.core import (
    CHINA_UTC_OFFSET,
    CLEAR_QUOTA_MONTHLY_LIMIT,
    FORCE_REFRESH_DAILY_LIMIT,
    FORCE_REFRESH_MIN_SPACING,
    STABLE_ROTATE_AHEAD,
    Sandbox,
)
from server.sandbox.handlers import MAX_BODY_BYTES, make_app
from server.sandbox.wecom import AGENT_TICKET_HOURLY_LIMIT, CORP_TICKET_HOURLY_LIMIT

__all__ = [
    "AGENT_TICKET_HOURLY_LIMIT", "AGENT_TICKET_PATH", "API_PATHS", "CALLBACK_IPS",
    "CALLBACK_IP_PATH", "CHINA_UTC_OFFSET", "CLEAR_QUOTA_MONTHLY_LIMIT", "CLEAR_QUOTA_PATH",
    "CORP_JSAPI_TICKET_PATH", "CORP_TICKET_HOURLY_LIMIT", "CORP_TOKEN_PATH", "DEFAULT_AGENTID",
    "DEFAULT_APPID", "DEFAULT_APPSECRET", "DEFAULT_CORPID", "DEFAULT_CORPSECRET", "FAULT_KINDS",
    "FORCE_REFRESH_DAILY_LIMIT", "FORCE_REFRESH_MIN_SPACING", "MAX_BODY_BYTES", "MEDIA_LIMITS",
    "MEDIA_UPLOAD_PATH", "MESSAGE_SEND_PATH", "QUOTA_GET_PATH", "SNS_OAUTH_PATH",
    "STABLE_ROTATE_AHEAD", "STABLE_TOKEN_PATH", "TICKET_PATH", "TOKEN_BYTES", "TOKEN_PATH",
    "ApiError", "JSONDict", "RecordedCall", "Sandbox", "main", "make_app",
]
