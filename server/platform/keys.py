"""Every Redis key the platform package writes, named here and nowhere else.

For a platform account ``P`` (its name under ``accounts:``), an authorizer appid ``A`` and the
configured ``prefix``:

``<prefix>P.A.access_token``
    The authorizer's ``authorizer_access_token``, a plain string with a TTL equal to its life:
    ``redis-cli GET myplatform.wxAUTHORIZER.access_token`` (like an account's plain key).
``<prefix>P.A.ticket``
    The authorizer's JS-SDK ``jsapi`` ticket, once someone asked for it (plain, with a TTL).
``{<prefix>P.A.access_token}:meta``
    A hash without TTL: ``version`` (fencing, microseconds on Redis's clock), ``expires_at``,
    ``refresh_token`` (the only durable credential of the authorisation: never logged or
    served), ``state`` (``ok``, ``blocked`` after 61023 / 61003, ``unauthorized``),
    ``errcode``/``errmsg``, ``failures``; for the jsapi ticket ``ticket_failures`` and
    ``ticket_errcode``/``ticket_errmsg`` (its last failure, gone once a ticket is stored).  The braces put it in the plain key's Redis Cluster
    slot, so one script writes both.
``<prefix>P.component_verify_ticket``
    A hash ``{ticket, create_time}`` kept 12 hours after its CreateTime; the newest wins.
``{<prefix>P:authorizers}:due`` / ``:claims`` / ``:blocked``
    The schedule: a sorted set of members (``A`` for the token, ``A#jsapi`` for the ticket)
    by due time (milliseconds, Redis's clock), and the hash of members an instance claimed
    (member -> lease end); one slot, so claiming is one script.  ``:blocked`` is the set of
    authorizers blocked by 61023 / 61003 (off the schedule), for the operator's status.
``{<prefix>P.A.access_token}:rejected``
    The SHA-256 of an authorizer token WeChat rejected right after it was fetched in answer
    to a rejected one, while that token lives: no instance rotates it again (the core's
    ``NAME:rejected``, :meth:`server.store.Store.mark_rejected`).
``<prefix>P:issued:<sha256 of a token>``
    The authorizer a token was issued to (the API proxy's lookup), kept as long as the token.
``<prefix>wechat-token:events`` (a channel)
    Every stored change, as JSON ``{"event", "source", "account", "id", "version",
    "expires_at"}``: the channel and shape of the core's events (``rotated`` for a new
    token or ticket, ``blocked`` after 61023 / 61003, ``dropped`` when an authorizer
    withdrew), with ``source`` the plain key's name (``P.A.access_token``) and ``account`` P.
``<prefix>P:event:<sha1 of timestamp and nonce>`` and ``<prefix>P:code:<sha256 of a code>``
    An event already handled (replays do nothing), and an authorisation code claimed for
    its one exchange.
"""

from __future__ import annotations

import hashlib
import json
import secrets

TICKET_SUFFIX = "#jsapi"


def authorizer_token(prefix: str, platform: str, appid: str) -> str:
    return f"{prefix}{platform}.{appid}.access_token"


def authorizer_ticket(prefix: str, platform: str, appid: str) -> str:
    return f"{prefix}{platform}.{appid}.ticket"


def authorizer_meta(prefix: str, platform: str, appid: str) -> str:
    return "{" + authorizer_token(prefix, platform, appid) + "}:meta"


def authorizer_rejected(prefix: str, platform: str, appid: str) -> str:
    return "{" + authorizer_token(prefix, platform, appid) + "}:rejected"


def verify_ticket(prefix: str, platform: str) -> str:
    return f"{prefix}{platform}.component_verify_ticket"


def schedule(prefix: str, platform: str) -> tuple[str, str]:
    """The due sorted set and the claims hash (one Cluster slot)."""
    tag = "{" + f"{prefix}{platform}:authorizers" + "}"
    return tag + ":due", tag + ":claims"


def blocked(prefix: str, platform: str) -> str:
    return "{" + f"{prefix}{platform}:authorizers" + "}:blocked"


def issued(prefix: str, platform: str, token: str) -> str:
    return f"{prefix}{platform}:issued:" + hashlib.sha256(token.encode()).hexdigest()


def event_seen(prefix: str, platform: str, timestamp: str, nonce: str) -> str:
    return f"{prefix}{platform}:event:" + hashlib.sha1(f"{timestamp}\0{nonce}".encode()).hexdigest()


def code_claim(prefix: str, platform: str, code: str) -> str:
    return f"{prefix}{platform}:code:" + hashlib.sha256(code.encode()).hexdigest()


def ticket_member(appid: str) -> str:
    return appid + TICKET_SUFFIX


def split_member(member: str) -> tuple[str, bool]:
    """``(appid, is_ticket)`` of a schedule member."""
    if member.endswith(TICKET_SUFFIX):
        return member[: -len(TICKET_SUFFIX)], True
    return member, False


def events_channel(prefix: str) -> str:
    """The channel the core publishes stored changes on (``<prefix>wechat-token:events``)."""
    return prefix + "wechat-token:events"


def event_head(event: str, source: str, account: str) -> str:
    """An event's JSON without its closing brace: the scripts add ``version`` and
    ``expires_at``, which only they know; ``id`` is unique per message.  No value in it."""
    return json.dumps({"event": event, "source": source, "account": account, "id": secrets.token_hex(12)})[:-1]
