"""What the face's tests share: a sandbox with several accounts, and a config naming them.

Import the ``sandbox`` fixture into a test module to replace conftest's one-account sandbox.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.sandbox import Sandbox

MAIN_ID, MAIN_SECRET = "wx1111", "main-appsecret-0123456789abcdef"
SHOP_ID, SHOP_SECRET = "wx2222", "shop-appsecret-0123456789abcdef"
MINI_ID, MINI_SECRET = "wx3333", "mini-appsecret-0123456789abcdef"
CORP_ID, CORP_AGENT, CORP_SECRET = "ww4444", "1000002", "corp-secret-0123456789abcdefgh"
CLIENT_SECRET = "shop-client-secret-0123456789abcdef"
SECRETS = {MAIN_SECRET, SHOP_SECRET, MINI_SECRET, CORP_SECRET, CLIENT_SECRET}


@pytest.fixture
def sandbox(secret_watch: Any) -> Sandbox:
    """WeChat with two official accounts, a mini program and a WeCom app."""
    sb = Sandbox(apps={MAIN_ID: MAIN_SECRET, SHOP_ID: SHOP_SECRET, MINI_ID: MINI_SECRET}, corps={}, corp_apps={CORP_ID: {CORP_AGENT: CORP_SECRET}})
    secret_watch.sandboxes.append(sb)
    secret_watch.secrets.update(SECRETS)
    return sb


def accounts(sandbox_url: str) -> dict[str, Any]:
    """main: stable token, jsapi and wx_card tickets (the default account); shop: classic
    token, jsapi ticket; mini: a mini program; corp: a WeCom app with both tickets."""
    return {
        "main": {"appid": MAIN_ID, "secret": MAIN_SECRET, "tickets": ["jsapi", "wx_card"], "api_base": sandbox_url, "default": True},
        "shop": {"appid": SHOP_ID, "secret": SHOP_SECRET, "token": "classic", "tickets": ["jsapi"], "api_base": sandbox_url},
        "mini": {"kind": "miniprogram", "appid": MINI_ID, "secret": MINI_SECRET, "api_base": sandbox_url},
        "corp": {"kind": "wecom", "corpid": CORP_ID, "corpsecret": CORP_SECRET, "agentid": int(CORP_AGENT), "tickets": ["jsapi", "agent_config"], "api_base": sandbox_url},
    }


def face_config(make_config: Any, sandbox_url: str, **sections: Any) -> Any:
    """The four accounts, and a client ``shopsrv`` allowed the shop account only."""
    base: dict[str, Any] = {
        "sources": {},
        "accounts": accounts(sandbox_url),
        "clients": [{"name": "shopsrv", "secret": CLIENT_SECRET, "accounts": ["shop"]}],
    }
    base.update(sections)
    return make_config(**base)


TOKEN_PATHS = ("/cgi-bin/token", "/cgi-bin/stable_token", "/cgi-bin/gettoken")


def token_fetches(sandbox: Sandbox) -> int:
    """Calls that reached WeChat's token endpoints."""
    return sum(sandbox.calls[p] for p in TOKEN_PATHS)
