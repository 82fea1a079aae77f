"""Redis unreachable: an authorizer's token read before is served from this process's memory
while valid (as the core serves an account's); what was never read is a JSON 503, never a 500."""

from __future__ import annotations

import asyncio

import pytest
from helpers_platform import authorise, platform_sections, ready_platform

pytestmark = pytest.mark.timeout(120)

AUTHORIZER = "wxauthorizer0outage"




@pytest.mark.gen_test(timeout=60)
async def test_authorizer_tokens_are_served_from_memory_while_redis_is_unreachable(own_redis, make_config, start_server, sandbox, sandbox_url, call) -> None:
    cfg = make_config(redis={"url": own_redis.url, "socket_timeout": 0.5}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER, "wxauthorizer0unread")
    status, served = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    own_redis.process.kill()
    own_redis.process.wait()
    await asyncio.sleep(0.2)
    account = await call(running.port, "/wechat/token", type="access_token")
    authorizer = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert account[0] == 200, account  # the core: from memory
    assert authorizer[0] == 200 and authorizer[1]["access_token"] == served["access_token"], f"authorizer token while Redis is unreachable: {authorizer}"
    # never read by this process: nothing in memory to serve, a clean JSON 503
    status, body = await call(running.port, "/wechat/token", type="access_token", appid="wxauthorizer0unread")
    assert status == 503 and "redis unreachable" in body["errmsg"], body
    status, body = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 503 and "redis unreachable" in body["errmsg"], body
