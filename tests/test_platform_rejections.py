"""Tokens WeChat keeps rejecting: an authorizer's token on the API proxy, the component token
on api_authorizer_token.  A rejected value is rotated once (compare-and-refresh); a value
rejected right after it was rotated in is noted and never rotated again, as the core's
``Refresher.note_rejected_after_rotation`` does for accounts."""

from __future__ import annotations

import asyncio

import pytest
from helpers_platform import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, authorise, platform_sections, ready_platform

pytestmark = pytest.mark.timeout(120)

AUTHORIZER = "wxauthorizer0reject"


@pytest.mark.gen_test(timeout=60)
async def test_proxy_rotates_a_rejected_authorizer_token_once(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    """An SDK retrying a call WeChat keeps answering 40001: the first costs one
    api_authorizer_token call (and one retry); the token it brought is noted
    (``{myplatform.A.access_token}:rejected``) and no later call rotates it again."""
    cfg = make_config(face=True, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    status, token = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    sandbox.inject("/cgi-bin/getcallbackip", "errcode", errcode=40001, errmsg="invalid credential", times=None)
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    for _ in range(6):  # an SDK retrying
        status, answer = await call(running.port, "/cgi-bin/getcallbackip", headers={}, access_token=token["access_token"])
        assert status == 200 and answer["errcode"] == 40001, answer  # WeChat's answer, passed back
    rotations = sandbox.calls[AUTHORIZER_TOKEN_PATH] - before
    assert rotations == 1, f"{rotations} api_authorizer_token calls for 6 proxied calls WeChat kept answering 40001"
    assert redis_sync.exists(f"{{myplatform.{AUTHORIZER}.access_token}}:rejected")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_component_token_rejected_right_after_its_rotation_is_not_rotated_again(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """api_authorizer_token answering 40001 for good: the component token is rotated once; the
    value that rotation brought, rejected too, is noted and the authorizers back off instead
    of rotating it (a small daily quota, and every rotation retires the token others hold)."""
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)  # a component token for 7000 s: no renewal of its own in this test
    sandbox.expires_in = 8  # the authorizers' tokens: refreshed within seconds
    await authorise(sandbox, call, running.port, *(f"wxauth40001{i:06d}" for i in range(5)))
    sandbox.expires_in = 7200
    before = sandbox.calls[COMPONENT_TOKEN_PATH]
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    await asyncio.sleep(15)
    rotations = sandbox.calls[COMPONENT_TOKEN_PATH] - before
    assert rotations == 1, f"the component token was rotated {rotations} times in 15 s by authorizer refreshes answered 40001"
