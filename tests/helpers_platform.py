"""What the platform tests share: a config with the sandbox's default platform, pushes, waits."""

from __future__ import annotations

from typing import Any

from helpers_procs import wait_until as wait_for  # one poll-until for every test

from server.sandbox import Sandbox
from server.sandbox.common import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, QUERY_AUTH_PATH
from server.sandbox.component import (
    DEFAULT_AES_KEY,
    DEFAULT_COMPONENT_APPID,
    DEFAULT_COMPONENT_SECRET,
    DEFAULT_MSG_TOKEN,
)
from server.sandbox.component_handlers import push

__all__ = ["AUTHORIZER_TOKEN_PATH", "COMPONENT_TOKEN_PATH", "QUERY_AUTH_PATH", "authorise", "platform_sections", "push_event",
           "ready_platform", "wait_for"]


def platform_sections(sandbox_url: str, **platform: Any) -> dict[str, Any]:
    """Config sections: the sandbox's default platform as ``myplatform``, a fast schedule."""
    return {
        "accounts": {"myplatform": {
            "kind": "component", "appid": DEFAULT_COMPONENT_APPID, "secret": DEFAULT_COMPONENT_SECRET,
            "msg_token": DEFAULT_MSG_TOKEN, "aes_key": DEFAULT_AES_KEY, "api_base": sandbox_url}},
        "platform": {"tick": 0.2, "batch": 50, "concurrency": 10, "lease": 10, **platform},
    }


async def push_event(sandbox: Sandbox, port: int, info_type: str, **fields: Any) -> tuple[int, str]:
    """WeChat's push of one event to the server on ``port`` (authorized: a code is made)."""
    if info_type in ("authorized", "updateauthorized") and "code" not in fields:
        fields["code"] = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, fields["authorizer"])
    return await push(sandbox.component, f"http://127.0.0.1:{port}/wechat/component/events", DEFAULT_COMPONENT_APPID, info_type, **fields)




async def ready_platform(sandbox: Sandbox, port: int) -> None:
    """Push a verify ticket to the server on ``port`` and wait for its component token."""
    assert await push_event(sandbox, port, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 1, 5, "the component token")


async def authorise(sandbox: Sandbox, call: Any, port: int, *appids: str) -> None:
    """Each of ``appids`` authorises the default platform; the operator posts each code."""
    for appid in appids:
        code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, appid)
        status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}"}}'.encode())
        assert status == 200 and body["authorizer_appid"] == appid, body
