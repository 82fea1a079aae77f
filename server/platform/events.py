"""The platform's event URL (授权事件接收 URL): checks, then what each event does.

Order of checks for ``POST /wechat/component/events?timestamp=T&nonce=N&encrypt_type=aes&msg_signature=S``
with ``<xml><AppId>..</AppId><Encrypt>..</Encrypt></xml>``:

1. the outer XML (no DTD, no entities) and its ``<AppId>``, which picks the platform
   (with one platform, a body without AppId is that platform's);
2. ``msg_signature`` over (msg_token, timestamp, nonce, Encrypt): a body that fails is
   refused (403) and logged without the body;
3. ``timestamp`` within ``platform.replay_window`` seconds of Redis's clock (403 otherwise:
   an old message replayed does nothing), then (timestamp, nonce) seen before: a replay, or
   WeChat retrying a push we answered: ``success`` and nothing done;
4. decryption (current key, then previous) and the inner appid: refused (400) on failure;
5. the event: ``component_verify_ticket`` stored (newest wins); ``authorized`` /
   ``updateauthorized``: the code exchanged once (a claim on it in Redis); ``unauthorized``:
   that authorizer stops and its token goes.

An event whose handling failed (the code could not be exchanged) forgets its nonce and
answers 503, so WeChat's own retry tries again.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.platform import keys
from server.platform.crypto import CryptoError, MessageCrypto

logger = logging.getLogger(__name__)

MAX_XML_BYTES = 64 * 1024
APPID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class EventRefused(Exception):
    """An event that is not handled: ``status`` (4xx/5xx) and a short ``reason`` for the
    client; ``str()`` is the log line (never the body)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


def parse_xml(raw: bytes) -> dict[str, str]:
    """The child elements of a flat ``<xml>`` document, as text; ValueError for anything else
    (a DTD or entity declaration included: nothing is expanded)."""
    if len(raw) > MAX_XML_BYTES or b"<!" in raw.replace(b"<![CDATA[", b""):
        raise ValueError("too big, or declares a DTD or entity")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError:
        raise ValueError("not well-formed XML") from None
    return {child.tag: (child.text or "").strip() for child in root}


@dataclass
class Receiver:
    """One platform's side of the event URL: its crypto and what to do with each event."""

    name: str
    appid: str
    crypto: MessageCrypto
    on_ticket: Callable[[str, int], Awaitable[bool]]
    on_authorized: Callable[[str, str], Awaitable[None]]  # (authorizer appid, code)
    on_unauthorized: Callable[[str], Awaitable[None]]


class Events:
    """The event URL for every platform (by component appid)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, receivers: Mapping[str, Receiver], replay_window: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.receivers = dict(receivers)
        self.replay_window = replay_window

    async def handle(self, query: Mapping[str, str], body: bytes) -> str:
        """Handle one push; ``"success"`` or EventRefused (see the module docstring)."""
        timestamp, nonce, signature = query.get("timestamp", ""), query.get("nonce", ""), query.get("msg_signature", "")
        if not timestamp.isdigit() or not nonce or len(nonce) > 64 or not signature:
            raise EventRefused(400, "missing timestamp, nonce or msg_signature", "event without timestamp, nonce or msg_signature")
        if query.get("encrypt_type", "aes") != "aes":
            raise EventRefused(400, "encrypt_type must be aes", "event with encrypt_type other than aes")
        try:
            outer = parse_xml(body)
        except ValueError as e:
            raise EventRefused(400, "bad body", f"event body refused: {e}") from None
        receiver = self._receiver(outer.get("AppId", ""))
        encrypt = outer.get("Encrypt", "")
        try:
            receiver.crypto.verify(timestamp, nonce, encrypt, signature)
        except CryptoError as e:
            raise EventRefused(403, "bad signature", f"platform {receiver.name}: event refused: {e}") from None
        redis = self.redis
        now = float((await redis.time())[0])
        if abs(now - int(timestamp)) > self.replay_window:
            raise EventRefused(403, "timestamp out of window", f"platform {receiver.name}: event with a timestamp {now - int(timestamp):+.0f}s off; ignored (a replay?)")
        seen = keys.event_seen(self.prefix, receiver.name, timestamp, nonce)
        if not await redis.set(seen, "1", nx=True, ex=int(2 * self.replay_window) + 60):
            logger.info("platform %s: event seen before (same timestamp and nonce); nothing done", receiver.name)
            return "success"
        try:
            await self._dispatch(receiver, encrypt)
        except BaseException:
            try:
                await redis.delete(seen)
            except RedisError:
                pass
            raise
        return "success"

    def _receiver(self, appid: str) -> Receiver:
        if appid:
            found = self.receivers.get(appid)
            if found is None:
                shown = appid if APPID_RE.match(appid) else "?"
                raise EventRefused(400, "unknown AppId", f"event for AppId {shown}, which is no configured platform")
            return found
        if len(self.receivers) == 1:
            return next(iter(self.receivers.values()))
        raise EventRefused(400, "missing AppId", "event without AppId, and several platforms are configured")

    async def _dispatch(self, receiver: Receiver, encrypt: str) -> None:
        try:
            opened = receiver.crypto.decrypt(encrypt)
        except CryptoError as e:
            raise EventRefused(400, "cannot decrypt", f"platform {receiver.name}: event refused: {e}") from None
        if opened.key_index:
            logger.info("platform %s: event opened with previous_aes_key (WeChat still uses the old key)", receiver.name)
        try:
            event = parse_xml(opened.xml)
        except ValueError as e:
            raise EventRefused(400, "bad message", f"platform {receiver.name}: decrypted message refused: {e}") from None
        info_type = event.get("InfoType", "")
        authorizer = event.get("AuthorizerAppid", "")
        if authorizer and not APPID_RE.match(authorizer):
            raise EventRefused(400, "bad AuthorizerAppid", f"platform {receiver.name}: {info_type} event with a malformed AuthorizerAppid")
        if info_type == "component_verify_ticket":
            ticket, created = event.get("ComponentVerifyTicket", ""), event.get("CreateTime", "")
            if not ticket or not created.isdigit():
                raise EventRefused(400, "bad ticket", f"platform {receiver.name}: verify ticket event without ticket or CreateTime")
            await receiver.on_ticket(ticket, int(created))
        elif info_type in ("authorized", "updateauthorized"):
            code = event.get("AuthorizationCode", "")
            if not authorizer or not code:
                raise EventRefused(400, "bad authorisation", f"platform {receiver.name}: {info_type} event without AuthorizerAppid or AuthorizationCode")
            logger.info("platform %s: %s event for authorizer %s", receiver.name, info_type, authorizer)
            await receiver.on_authorized(authorizer, code)
        elif info_type == "unauthorized":
            if not authorizer:
                raise EventRefused(400, "bad event", f"platform {receiver.name}: unauthorized event without AuthorizerAppid")
            logger.info("platform %s: unauthorized event for authorizer %s", receiver.name, authorizer)
            await receiver.on_unauthorized(authorizer)
        else:
            shown = info_type if re.fullmatch(r"[A-Za-z_]{1,40}", info_type) else "?"
            logger.info("platform %s: event %s ignored", receiver.name, shown)
