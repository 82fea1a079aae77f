"""The event URL refuses what WeChat did not send: bad signatures, undecryptable bodies, other
platforms' messages, replays; and the code of an authorisation is exchanged once."""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse

import pytest
from helpers_platform import COMPONENT_TOKEN_PATH, QUERY_AUTH_PATH, platform_sections, push_event, wait_for

from server.sandbox.component import DEFAULT_COMPONENT_APPID, push_body
from server.sandbox.component_handlers import push

pytestmark = pytest.mark.timeout(60)

TICKET_KEY = "myplatform.component_verify_ticket"


async def post(call, port, query, body):
    return await call(port, "/wechat/component/events", headers={"Content-Type": "text/xml"}, method="POST", body=body, query=urllib.parse.urlencode(query))


@pytest.mark.gen_test(timeout=50)
async def test_refused_and_replayed(make_config, start_server, sandbox, sandbox_url, call, redis_sync, secret_watch) -> None:
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    port = running.port
    comp = sandbox.component
    log_from = len(secret_watch.records)

    # A tampered signature: 403, nothing stored.
    query, body = push_body(comp, DEFAULT_COMPONENT_APPID, "component_verify_ticket")
    status, _ = await post(call, port, {**query, "msg_signature": "0" * 40}, body)
    assert status == 403
    # A body encrypted with another key but signed right (the key changed at WeChat, not here): 400.
    other = base64.b64encode(os.urandom(32)).decode()[:43]
    query2, body2 = push_body(comp, DEFAULT_COMPONENT_APPID, "component_verify_ticket", aes_key=other)
    status, _ = await post(call, port, query2, body2)
    assert status == 400
    # Another platform's AppId: 400.
    status, _ = await post(call, port, query, body.replace(DEFAULT_COMPONENT_APPID.encode(), b"wxnotmine00000000"))
    assert status == 400
    # A DTD: 400 (nothing is expanded).
    status, _ = await post(call, port, query, b'<!DOCTYPE x [<!ENTITY a "b">]>' + body)
    assert status == 400
    # A timestamp far off (an old message replayed with its own valid signature): 403.
    query3, body3 = push_body(comp, DEFAULT_COMPONENT_APPID, "component_verify_ticket", timestamp=int(sandbox.clock()) - 3600)
    status, _ = await post(call, port, query3, body3)
    assert status == 403
    assert redis_sync.exists(TICKET_KEY) == 0 and sandbox.calls[COMPONENT_TOKEN_PATH] == 0

    # The good one, then the same message again (same timestamp and nonce): success, nothing done.
    status, text = await post(call, port, query, body)
    assert (status, text) == (200, "success")
    created = redis_sync.hget(TICKET_KEY, "create_time")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] == 1, 5, "the component token")
    redis_sync.hset(TICKET_KEY, "create_time", "1")  # so a second handling would show
    status, text = await post(call, port, query, body)
    assert (status, text) == (200, "success")
    assert redis_sync.hget(TICKET_KEY, "create_time") == "1"
    redis_sync.hset(TICKET_KEY, "create_time", created)

    # No body reached a log line.
    encrypted = [body.split(b"<Encrypt><![CDATA[")[1].split(b"]]>")[0].decode() for body in (body, body2, body3)]
    assert not [line for line in secret_watch.records[log_from:] if any(e[:40] in line for e in encrypted)]


@pytest.mark.gen_test(timeout=50)
async def test_previous_key_and_newest_ticket_wins(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    old = base64.b64encode(hashlib.sha256(b"old key").digest()).decode()[:43]
    sections = platform_sections(sandbox_url)
    sections["accounts"]["myplatform"]["previous_aes_key"] = old
    running = await start_server(make_config(**sections))
    comp = sandbox.component
    now = int(sandbox.clock())
    url = f"http://127.0.0.1:{running.port}/wechat/component/events"
    assert await push(comp, url, DEFAULT_COMPONENT_APPID, "component_verify_ticket", create_time=now - 10, aes_key=old) == (200, "success")
    first = redis_sync.hget(TICKET_KEY, "ticket")
    # an older push arriving late does not replace the newer ticket
    assert await push(comp, url, DEFAULT_COMPONENT_APPID, "component_verify_ticket", create_time=now - 20) == (200, "success")
    assert redis_sync.hget(TICKET_KEY, "ticket") == first
    assert await push(comp, url, DEFAULT_COMPONENT_APPID, "component_verify_ticket", create_time=now) == (200, "success")
    assert redis_sync.hget(TICKET_KEY, "ticket") != first
    assert 0 < redis_sync.ttl(TICKET_KEY) <= 12 * 3600


@pytest.mark.gen_test(timeout=50)
async def test_code_exchanged_once(make_config, start_server, sandbox, sandbox_url, call) -> None:
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    port = running.port
    await push_event(sandbox, port, "component_verify_ticket")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] == 1, 5, "the component token")
    code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, "wxauthorizer000009")
    # the event and the operator's endpoint bring the same code: one exchange
    assert await push_event(sandbox, port, "authorized", authorizer="wxauthorizer000009", code=code) == (200, "success")
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}"}}'.encode())
    assert status == 200 and body == {"authorizer_appid": None, "exchanged": False}
    assert sandbox.calls[QUERY_AUTH_PATH] == 1
    # the operator's endpoint with a new code
    code2 = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, "wxauthorizer000010")
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code2}"}}'.encode())
    assert status == 200 and body == {"authorizer_appid": "wxauthorizer000010", "exchanged": True}
    # a client that is not the operator may not
    status, _ = await call(port, "/wechat/component/authorizers", headers={}, method="POST", body=b"{}")
    assert status == 401
    # a code WeChat refuses: the claim is given back, the answer says so
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=b'{"authorization_code": "queryauthcode@@@nonsense"}')
    assert status == 502 and "61010" in body["errmsg"]
    status, page = await call(port, "/wechat/component/status")
    assert status == 200 and page["scheduled"] == 2 and {a["appid"] for a in page["authorizers"]} == {"wxauthorizer000009", "wxauthorizer000010"}
    assert "refresh" not in str(page)
