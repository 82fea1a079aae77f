"""The component endpoints over HTTP, and the control API that makes WeChat push events.

``POST /sandbox/component/push {"url": "http://127.0.0.1:12123/wechat/component/events",
"info_type": "component_verify_ticket"}`` (or ``authorized`` / ``updateauthorized`` with
``"authorizer_appid"`` (a code is made for it), ``unauthorized``) -> ``{"status": 200, "body": "success"}``;
``POST /sandbox/component/authorize {"authorizers": ["wxa1", ...]}`` -> ``{"codes": {"wxa1": "..."}}``
(codes only: nothing is pushed); ``POST /sandbox/component/unauthorize`` and ``/invalidate``
``{"authorizer_appid": "wxa1"}``; ``POST /sandbox/component/settings {"rotate_refresh_tokens": true}``;
``GET /sandbox/component/stats``.  Every one takes ``"component_appid"`` (default: the default platform).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from server.sandbox.common import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, QUERY_AUTH_PATH, JSONDict
from server.sandbox.component import DEFAULT_COMPONENT_APPID, Component, push_body
from server.sandbox.handlers import ApiHandler, BaseHandler


class ComponentTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)
    issues = True

    def post(self) -> None:
        """``POST /cgi-bin/component/api_component_token {"component_appid", "component_appsecret",
        "component_verify_ticket"}`` -> ``{"component_access_token": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.component.api_component_token(self.request.body, self.client_ip()))


class QueryAuthHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)
    issues = True

    def post(self) -> None:
        """``POST /cgi-bin/component/api_query_auth?component_access_token=T {"component_appid",
        "authorization_code"}`` -> ``{"authorization_info": {...}}``"""
        self.reply(lambda: self.sandbox.component.api_query_auth(self.arg("component_access_token"), self.request.body, self.client_ip()))


class AuthorizerTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)
    issues = True

    def post(self) -> None:
        """``POST /cgi-bin/component/api_authorizer_token?component_access_token=T {"component_appid",
        "authorizer_appid", "authorizer_refresh_token"}`` -> ``{"authorizer_access_token", "expires_in",
        "authorizer_refresh_token"}``"""
        self.reply(lambda: self.sandbox.component.api_authorizer_token(self.arg("component_access_token"), self.request.body, self.client_ip()))


async def push(component: Component, url: str, component_appid: str, info_type: str,
               client: AsyncHTTPClient | None = None, **fields: Any) -> tuple[int, str]:
    """POST one encrypted event to ``url`` as WeChat does; (status, body) of the answer
    (599 when there was none)."""
    query, body = push_body(component, component_appid, info_type, **fields)
    own = client is None
    client = client or AsyncHTTPClient(force_instance=True)
    try:
        req = HTTPRequest(url + ("&" if "?" in url else "?") + urllib.parse.urlencode(query), method="POST", body=body,
                          headers={"Content-Type": "text/xml"}, request_timeout=10)
        resp = await client.fetch(req, raise_error=False)
        return resp.code, (resp.body or b"").decode("utf-8", "replace")
    finally:
        if own:
            client.close()


class ControlHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET", "POST")
    counted = False

    def component_appid(self, body: JSONDict) -> str:
        return str(body.get("component_appid") or DEFAULT_COMPONENT_APPID)

    def get(self, action: str) -> None:
        if action != "stats":
            self.send_error(404)
            return
        self.finish(self.sandbox.component.stats())

    async def post(self, action: str) -> None:
        body = self.json_body()
        comp = self.sandbox.component
        appid = self.component_appid(body)
        if action == "push":
            info_type = str(body.get("info_type", ""))
            fields: dict[str, Any] = {}
            if body.get("authorizer_appid"):
                fields["authorizer"] = str(body["authorizer_appid"])
            if info_type in ("authorized", "updateauthorized"):
                fields["code"] = comp.authorize(appid, fields["authorizer"])
            status, text = await push(comp, str(body["url"]), appid, info_type, **fields)
            self.finish({"status": status, "body": text[:200]})
        elif action == "authorize":
            self.finish({"codes": {a: comp.authorize(appid, a) for a in body.get("authorizers", [])}})
        elif action == "unauthorize":
            comp.unauthorize(appid, str(body["authorizer_appid"]))
            self.finish({"errcode": 0})
        elif action == "invalidate":
            comp.invalidate_refresh_token(appid, str(body["authorizer_appid"]))
            self.finish({"errcode": 0})
        elif action == "settings":
            comp.rotate_refresh_tokens = bool(body.get("rotate_refresh_tokens", comp.rotate_refresh_tokens))
            self.finish({"errcode": 0})
        else:
            self.send_error(404)


def component_routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (COMPONENT_TOKEN_PATH, ComponentTokenHandler),
        (QUERY_AUTH_PATH, QueryAuthHandler),
        (AUTHORIZER_TOKEN_PATH, AuthorizerTokenHandler),
        (r"/sandbox/component/(\w+)", ControlHandler),
    ]
