"""A WeChat-shaped face: any SDK's API host can be this server.

Point an SDK's API host here (wechatpy, WxJava, EasyWeChat... see README, *SDKs*) and it sends
both its token fetches and its API calls to this server:

- ``tokens``: ``/cgi-bin/token``, ``/cgi-bin/stable_token``, WeCom's ``/cgi-bin/gettoken`` and
  the ticket endpoints, answered from the cache in WeChat's shape;
- ``proxy``: every other path, forwarded to the account's ``api_base`` with the current
  token in place of the one the SDK sent (only tokens this server issued: ``issued``);
- ``base``: WeChat's dialect for every answer, and the face's gate.

The face needs ``accounts:`` (an account knows its appid, secret and ``api_base``).  With only
bare ``sources:`` the token endpoints answer 40013 and other paths keep the API's 404: there
is nowhere to proxy to.  ``face: false`` leaves all of it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tornado.web
from tornado.httpclient import AsyncHTTPClient

from server.accounts import Accounts
from server.face.issued import Issued
from server.face.proxy import MAX_BODY_BYTES, ProxyHandler
from server.face.tokens import (
    AgentTicketHandler,
    ClassicTokenHandler,
    CorpJsapiTicketHandler,
    CorpTokenHandler,
    StableTokenHandler,
    TicketHandler,
)
from server.handlers import NotFoundHandler
from server.refresher import Refresher

#: Answers of WeChat up to this size are relayed (a media download is at most 20 MB).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: Calls to WeChat in the air at once; more wait in the client's queue.
MAX_CLIENTS = 100


@dataclass
class Face:
    """What the face's handlers share: the token lookup, the HTTP client to WeChat, and
    and the bytes of proxied bodies held in memory now (bounded by MAX_BYTES_IN_FLIGHT)."""

    issued: Issued
    client: AsyncHTTPClient
    max_body: int = MAX_BODY_BYTES
    bytes_in_flight: int = 0

    @classmethod
    def build(cls, refresher: Refresher, accounts: Accounts, overlap: float) -> Face:
        client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CLIENTS, max_body_size=MAX_ANSWER_BYTES)
        return cls(Issued(refresher, accounts, overlap), client)

    def close(self) -> None:
        self.client.close()


def add_face(app: tornado.web.Application, face: Face, deps: dict[str, Any]) -> None:
    """Add the face's routes after the application's own (which keep precedence: they come
    first in the same router), and make the proxy the default handler when accounts are
    configured (see the module docstring)."""
    rules, default, default_args = face_routes(face, deps)
    app.wildcard_router.add_rules(rules)
    app.settings["default_handler_class"] = default
    app.settings["default_handler_args"] = default_args


def face_routes(face: Face, deps: dict[str, Any]) -> tuple[list[Any], type, dict[str, Any]]:
    """The face's routes, and the default handler with its arguments: the proxy when
    accounts are configured, else the API's 404 (see the module docstring)."""
    args = {**deps, "face": face}
    rules: list[Any] = [
        (r"/cgi-bin/token", ClassicTokenHandler, args),
        (r"/cgi-bin/stable_token", StableTokenHandler, args),
        (r"/cgi-bin/gettoken", CorpTokenHandler, args),
        (r"/cgi-bin/ticket/getticket", TicketHandler, args),
        (r"/cgi-bin/get_jsapi_ticket", CorpJsapiTicketHandler, args),
        (r"/cgi-bin/ticket/get", AgentTicketHandler, args),
    ]
    if not deps["accounts"]:
        return rules, NotFoundHandler, deps
    # Our own namespace keeps our own dialect: a typo there is a 404, not a WeChat call.
    rules.append((r"/wechat/.*", NotFoundHandler, deps))
    return rules, ProxyHandler, args


__all__ = ["Face", "add_face", "face_routes"]
