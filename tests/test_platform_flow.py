"""A third-party platform end to end on the sandbox: verify ticket push -> component token ->
authorisation event -> authorizer token (served, plain key, proxy, lazy JS-SDK ticket) ->
refresh (with refresh-token rotation) -> unauthorised; /status while the verify ticket is awaited.
Upstream calls counted at the sandbox."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers_platform import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, QUERY_AUTH_PATH, platform_sections, push_event, wait_for

from server.sandbox.common import TICKET_PATH

pytestmark = pytest.mark.timeout(60)

AUTHORIZER = "wxauthorizer000001"


@pytest.mark.slow
@pytest.mark.gen_test(timeout=50)
async def test_whole_flow(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    sandbox.expires_in = 8  # every token and ticket: refreshed within seconds
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    port = running.port
    events = redis_sync.pubsub()
    events.subscribe("wechat-token:events")

    # No verify ticket yet: the component token waits, and /readyz says why.
    status, body = await call(port, "/readyz", headers={})
    assert status == 503
    assert "component_verify_ticket" in body["sources"]["myplatform.component_access_token"]
    assert sandbox.calls[COMPONENT_TOKEN_PATH] == 0

    assert await push_event(sandbox, port, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] == 1, 5, "the component token")
    assert redis_sync.hget("myplatform.component_verify_ticket", "ticket").startswith("ticket@@@")

    assert await push_event(sandbox, port, "authorized", authorizer=AUTHORIZER) == (200, "success")
    assert sandbox.calls[QUERY_AUTH_PATH] == 1
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200 and body["access_token"] == sandbox.component.current_token(AUTHORIZER)
    # the plain key, for direct readers
    assert redis_sync.get(f"myplatform.{AUTHORIZER}.access_token") == body["access_token"]
    assert redis_sync.ttl(f"myplatform.{AUTHORIZER}.access_token") > 0

    # Refreshes, one call each, also when WeChat rotates the refresh token.
    sandbox.component.rotate_refresh_tokens = True
    await wait_for(lambda: sandbox.component.token_calls[AUTHORIZER] >= 4, 20, "three refreshes")
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0
    times = [t for t, a in sandbox.component.token_log if a == AUTHORIZER]
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) > 1.5, "refreshed twice for one rotation"
    assert sandbox.calls[AUTHORIZER_TOKEN_PATH] == sandbox.component.token_calls[AUTHORIZER] - 1

    # The JS-SDK ticket: fetched on the first request only.
    before = sandbox.calls[TICKET_PATH]
    status, body = await call(port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 200 and body["ticket"] in sandbox.issued_values()
    status, again = await call(port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert again["ticket"] == body["ticket"] and sandbox.calls[TICKET_PATH] == before + 1

    # The API proxy takes an authorizer's token and puts the current one in.
    status, token = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    status, answer = await call(port, "/cgi-bin/getcallbackip", headers={}, access_token=token["access_token"])
    assert status == 200 and "ip_list" in answer, answer
    forwarded = sandbox.requests_to("/cgi-bin/getcallbackip")[-1]
    assert forwarded.token_owner == AUTHORIZER and forwarded.token_status == 0

    # Unauthorised: refreshes stop, the token goes.
    assert await push_event(sandbox, port, "unauthorized", authorizer=AUTHORIZER) == (200, "success")
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 503 and "withdrew" in body["errmsg"]
    assert redis_sync.get(f"myplatform.{AUTHORIZER}.access_token") is None
    assert redis_sync.hget(f"{{myplatform.{AUTHORIZER}.access_token}}:meta", "refresh_token") is None
    calls = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    await asyncio.sleep(6)  # more than its token's life
    assert sandbox.calls[AUTHORIZER_TOKEN_PATH] == calls

    # Every change was announced on the core's events channel, without a value.
    seen = []
    while (message := events.get_message(timeout=0)) is not None:
        if message["type"] == "message":
            seen.append(json.loads(message["data"]))
    mine = [e for e in seen if e["source"].startswith(f"myplatform.{AUTHORIZER}.")]
    kinds = [(e["event"], e["source"].rsplit(".", 1)[1]) for e in mine]
    assert kinds.count(("rotated", "access_token")) == sandbox.component.token_calls[AUTHORIZER]
    assert ("rotated", "ticket") in kinds and kinds[-1] == ("dropped", "access_token")
    assert all(e["account"] == "myplatform" and set(e) == {"event", "source", "account", "id", "version", "expires_at"} for e in mine)
    events.close()


@pytest.mark.gen_test(timeout=30)
async def test_status_says_the_component_token_waits_for_its_verify_ticket(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """Before the first verify ticket /status says ``waiting`` (and why), not ``ok``; once the
    ticket came and the token was fetched, ``ok``."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    status, body = await call(running.port, "/status")
    state = body["sources"]["myplatform.component_access_token"]
    assert status == 200 and state["state"] == "waiting", f"/status before any verify ticket: {state}"
    assert "component_verify_ticket" in state["last_error"]
    assert await push_event(sandbox, running.port, "component_verify_ticket") == (200, "success")


    async def ok() -> bool:
        _, body = await call(running.port, "/status")
        return body["sources"]["myplatform.component_access_token"]["state"] == "ok"

    await wait_for(ok, 5, "the component token ok on /status")
