"""Business APIs: the calls a token is *used* for, which the face proxies to WeChat.

Each checks the access_token like WeChat (41001 missing, 40014 malformed, 42001 expired, 40001
unknown or not latest) before looking at its own arguments, so that a proxy test can tell a
stale token from a bad request.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from server.sandbox.common import ApiError, JSONDict, check_app_secret, json_object
from server.sandbox.ledger import Ledger

CALLBACK_IPS = ("101.226.103.0/25", "101.226.62.0/26", "101.226.233.128/25",
                "58.247.206.128/25", "182.254.86.128/25")
# "authorizer": a third-party platform's token for an account that authorised it (component)
ANY_KIND = frozenset({"token", "stable", "corp", "authorizer"})
ACCOUNT_KINDS = frozenset({"token", "stable", "authorizer"})  # official accounts and mini programs
# Temporary media limits (bytes) by type, from WeChat's media/upload documentation.
MEDIA_LIMITS = {"image": 10 * 1024 * 1024, "voice": 2 * 1024 * 1024,
                "video": 10 * 1024 * 1024, "thumb": 64 * 1024}
# WeCom's media/upload shares the path and takes a "file" type too.
WECOM_MEDIA_LIMITS = {**MEDIA_LIMITS, "file": 20 * 1024 * 1024}
SNS_SCOPE = "snsapi_base"


class Business:
    """Business endpoints over ``ledger``; ``apps`` (appid -> secret) is shared, not copied."""

    def __init__(self, ledger: Ledger, apps: dict[str, str]) -> None:
        self.ledger = ledger
        self.apps = apps
        self._used_codes: set[tuple[str, str]] = set()  # (appid, code) of web logins

    def reset(self) -> None:
        self._used_codes.clear()

    def callback_ip(self, access_token: str | None) -> JSONDict:
        """GET /cgi-bin/getcallbackip: a cheap validity check (WeCom has the same path)."""
        self.ledger.check(access_token, ANY_KIND)
        return {"ip_list": list(CALLBACK_IPS)}

    def message_send(self, access_token: str | None, raw_body: bytes) -> JSONDict:
        """POST /cgi-bin/message/custom/send: a customer-service message, JSON body.

        44002 for an empty body, 47001 for one that is not a JSON object, 40003 without a
        ``touser``, 40008 without a ``msgtype``.
        """
        self.ledger.check(access_token, ACCOUNT_KINDS)
        if not raw_body.strip():
            raise ApiError(44002, "empty post data")
        body = json_object(raw_body)
        if not isinstance(body.get("touser"), str) or not body["touser"]:
            raise ApiError(40003, "invalid openid")
        if not isinstance(body.get("msgtype"), str) or not body["msgtype"]:
            raise ApiError(40008, "invalid message type")
        return {"errcode": 0, "errmsg": "ok"}

    def media_upload(self, access_token: str | None, media_type: str | None,
                     media: bytes | None) -> JSONDict:
        """POST /cgi-bin/media/upload?type=image: ``media`` is the multipart "media" part's
        content (None when there is no such part).

        40004 for an unknown type, 41005 without a media part, 44001 for an empty one, 40006
        over the type's size limit. ``size`` (bytes received) is the sandbox's own addition,
        so that a test sees that a proxy forwarded the whole file.
        """
        entry = self.ledger.check(access_token, ANY_KIND)
        limits = WECOM_MEDIA_LIMITS if entry.kind == "corp" else MEDIA_LIMITS
        if media_type not in limits:
            raise ApiError(40004, "invalid media type")
        if media is None:
            raise ApiError(41005, "media data missing")
        if not media:
            raise ApiError(44001, "empty media data")
        if len(media) > limits[media_type]:
            raise ApiError(40006, "invalid file size")
        return {"type": media_type, "media_id": secrets.token_urlsafe(48),
                "created_at": int(self.ledger.clock()), "size": len(media)}

    def sns_oauth(self, appid: str | None, secret: str | None, code: str | None,
                  grant_type: str | None) -> JSONDict:
        """GET /sns/oauth2/access_token: web login, exchanging a user's ``code``.

        Any non-empty code works, once (40163 the second time); the openid is derived from
        appid and code, so the same code names the same user in every run.
        """
        check_app_secret(self.apps, appid, secret)
        assert appid is not None  # checked above; tells mypy
        if not code:
            raise ApiError(41008, "missing code")
        if grant_type != "authorization_code":
            raise ApiError(40002, "invalid grant_type")
        if (appid, code) in self._used_codes:
            raise ApiError(40163, "code been used")
        self._used_codes.add((appid, code))
        digest = hashlib.sha256(f"{appid}\0{code}".encode()).digest()
        openid = "o" + base64.urlsafe_b64encode(digest).decode()[:27]
        # Web-login tokens are not access_tokens: they never pass Ledger.check.
        token, refresh = self.ledger.new_value(), self.ledger.new_value()
        self.ledger.other_values.update((token, refresh))
        return {"access_token": token, "expires_in": self.ledger.expires_in,
                "refresh_token": refresh, "openid": openid, "scope": SNS_SCOPE}
