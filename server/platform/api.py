"""The component calls to WeChat an authorizer needs: one POST or GET each, errors classified
as :mod:`server.upstream` does (``UpstreamError`` with its ``kind``), URLs never in a message.

``api_query_auth`` and ``api_authorizer_token`` take the ``component_access_token`` in the
query and JSON bodies holding the refresh token: neither is ever logged.
"""

from __future__ import annotations

import collections
import json
import urllib.parse
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server.upstream import ErrorKind, UpstreamError, classify

QUERY_AUTH = "/cgi-bin/component/api_query_auth"
AUTHORIZER_TOKEN = "/cgi-bin/component/api_authorizer_token"
GETTICKET = "/cgi-bin/ticket/getticket"
#: Calls of one instance at once; more wait in the client's queue (the worker bounds them too).
MAX_CLIENTS = 64
MAX_BODY = 64 * 1024


class ComponentApi:
    """Calls for one platform (``component_appid``) to ``api_base``, each waiting ``timeout`` seconds."""

    def __init__(self, api_base: str, component_appid: str, timeout: float) -> None:
        self.api_base = api_base.rstrip("/")
        self.component_appid = component_appid
        self.timeout = timeout
        self.client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CLIENTS, max_body_size=MAX_BODY)
        #: calls made by this process, by path (the benchmark's count, /wechat/component/status)
        self.calls: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"ComponentApi({self.api_base}, {self.component_appid})"

    def close(self) -> None:
        self.client.close()

    async def query_auth(self, component_token: str, code: str) -> dict[str, Any]:
        """``authorization_info`` of an authorisation code (exchanged once)."""
        body = {"component_appid": self.component_appid, "authorization_code": code}
        answer = await self._call("POST", QUERY_AUTH, {"component_access_token": component_token}, body)
        info = answer.get("authorization_info")
        if not isinstance(info, dict):
            raise UpstreamError(ErrorKind.TRANSIENT, "api_query_auth answer has no authorization_info")
        return info

    async def authorizer_token(self, component_token: str, authorizer: str, refresh_token: str) -> dict[str, Any]:
        body = {"component_appid": self.component_appid, "authorizer_appid": authorizer, "authorizer_refresh_token": refresh_token}
        return await self._call("POST", AUTHORIZER_TOKEN, {"component_access_token": component_token}, body)

    async def jsapi_ticket(self, authorizer_token: str) -> dict[str, Any]:
        return await self._call("GET", GETTICKET, {"access_token": authorizer_token, "type": "jsapi"}, None)

    async def _call(self, method: str, path: str, query: dict[str, str], body: dict[str, Any] | None) -> dict[str, Any]:
        self.calls[path] += 1
        req = HTTPRequest(
            f"{self.api_base}{path}?{urllib.parse.urlencode(query)}", method=method,
            body=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"} if body is not None else {},
            connect_timeout=self.timeout, request_timeout=self.timeout, follow_redirects=False,
        )
        try:
            resp = await self.client.fetch(req, raise_error=False)
        except HTTPClientError:
            raise UpstreamError(ErrorKind.TRANSIENT, f"no answer from {path} (timeout)") from None
        except Exception as e:  # connection refused, DNS: messages that name no URL
            raise UpstreamError(ErrorKind.TRANSIENT, f"{path}: {type(e).__name__}") from None
        if resp.code != 200:
            raise UpstreamError(ErrorKind.TRANSIENT, f"HTTP {resp.code} from {path}")
        try:
            answer = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UpstreamError(ErrorKind.TRANSIENT, f"non-JSON answer from {path}") from None
        if not isinstance(answer, dict):
            raise UpstreamError(ErrorKind.TRANSIENT, f"answer from {path} is not an object")
        errcode = answer.get("errcode", 0)
        if errcode:
            errcode = errcode if isinstance(errcode, int) else -1
            errmsg = str(answer.get("errmsg", ""))
            raise UpstreamError(classify(errcode, uses_token=True), f"{path}: errcode {errcode}: {errmsg[:200]}", errcode, errmsg)
        return answer
