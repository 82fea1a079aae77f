"""The HTTP API through real HTTP, with real Redis and the sandbox as upstream."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import TEST_SECRET


@pytest.mark.gen_test
async def test_serves_token_and_ticket_in_wechat_shape(make_config, start_server, call, sandbox):
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and set(body) == {"access_token", "expires_in"}
    assert body["access_token"] == sandbox.current_token()
    assert isinstance(body["expires_in"], int) and 6900 < body["expires_in"] <= 7000
    status, body = await call(srv.port, "/wechat/token", type="ticket")
    assert status == 200 and set(body) == {"ticket", "expires_in"} and body["ticket"]


@pytest.mark.gen_test
async def test_secret_accepted_from_query_header_and_bearer(make_config, start_server, call):
    srv = await start_server(make_config())
    ways = [
        ({}, {"secret": TEST_SECRET}),
        ({"X-Token-Secret": TEST_SECRET}, {}),
        ({"Authorization": f"Bearer {TEST_SECRET}"}, {}),
    ]
    for headers, extra in ways:
        status, body = await call(srv.port, "/wechat/token", headers=headers, type="access_token", **extra)
        assert status == 200, (headers, extra, body)


STATUSES = [
    # (path, headers, params, method, status, errmsg)
    ("/wechat/token", None, {}, "GET", 400, "missing type"),
    ("/wechat/token/forcerefresh", None, {}, "GET", 400, "missing type"),
    ("/wechat/token", {}, {"type": "access_token"}, "GET", 401, "missing secret"),
    ("/wechat/token/forcerefresh", {}, {"type": "access_token"}, "GET", 401, "missing secret"),
    ("/wechat/token", {"X-Token-Secret": "wrong-secret-0123456789"}, {"type": "access_token"}, "GET", 403, "wrong secret"),
    ("/wechat/token", {}, {"type": "access_token", "secret": TEST_SECRET[:-1]}, "GET", 403, "wrong secret"),
    ("/wechat/token", None, {"type": "jsapi_ticket"}, "GET", 404, "unknown type"),
    ("/wechat/token/forcerefresh", None, {"type": "../../etc"}, "GET", 404, "unknown type"),
    ("/nowhere", None, {}, "GET", 404, "not found"),
    ("/wechat/token", None, {"type": "access_token"}, "POST", 405, None),
    ("/wechat/token", None, {"type": "access_token"}, "DELETE", 405, None),
]


@pytest.mark.parametrize("path,headers,params,method,status,errmsg", STATUSES)
@pytest.mark.gen_test
async def test_error_statuses_are_json(path, headers, params, method, status, errmsg, make_config, start_server, call):
    srv = await start_server(make_config())
    body_bytes = b"" if method in ("POST",) else None
    got, body = await call(srv.port, path, headers=headers, method=method, body=body_bytes, **params)
    assert got == status
    assert body["errcode"] == status and isinstance(body["errmsg"], str)
    if errmsg:
        assert body["errmsg"] == errmsg
    assert TEST_SECRET not in str(body) and "Traceback" not in str(body)


@pytest.mark.gen_test
async def test_503_when_upstream_fails_and_no_value(make_config, start_server, call, sandbox):
    sandbox.inject("/cgi-bin/token", "http_error", status=502, times=None)
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert (status, body) == (503, {"errcode": 503, "errmsg": "no valid value: upstream is failing"})
    status, body = await call(srv.port, "/wechat/token", type="ticket")
    assert status == 503


@pytest.mark.gen_test
async def test_healthz_needs_no_secret(make_config, start_server, call):
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/healthz", headers={})
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.gen_test
async def test_status_shows_state_never_values(make_config, start_server, call, sandbox):
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/status")
    assert status == 200
    assert body["sources"]["access_token"]["state"] == "ok" and body["sources"]["access_token"]["upstream_calls"] == 1
    assert sandbox.current_token() not in str(body)
    status, _ = await call(srv.port, "/status", headers={})
    assert status == 401


@pytest.mark.gen_test
async def test_responses_are_not_cacheable(make_config, start_server):
    from tornado.httpclient import AsyncHTTPClient

    srv = await start_server(make_config())
    resp = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{srv.port}/wechat/token?type=access_token", headers={"X-Token-Secret": TEST_SECRET}
    )
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"].startswith("application/json")


@pytest.mark.gen_test
async def test_server_reads_a_value_another_writer_put_in_redis(make_config, start_server, call, redis_sync, sandbox):
    """Redis is the source of truth: a value written by another writer, even one that
    announces nothing on the events channel, is served within refresh.read_max_age (1 s)."""
    srv = await start_server(make_config())
    other = sandbox.api_token("client_credential", "wx123", "sandbox-appsecret-0123456789", "127.0.0.1")["access_token"]
    version = int(redis_sync.hget("access_token:meta", "version"))
    redis_sync.set("access_token", other, ex=5000)
    redis_sync.hset("access_token:meta", "version", version + 1)
    written = time.monotonic()
    while True:
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        if body["access_token"] == other or time.monotonic() - written > 1.5:
            break
        await asyncio.sleep(0.02)
    assert status == 200 and body["access_token"] == other and 4990 < body["expires_in"] <= 5000


@pytest.mark.gen_test
async def test_metrics_count_upstream_calls_and_show_life_left(make_config, start_server, call, sandbox):
    sandbox.inject("/cgi-bin/token", "busy", times=1)
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    status, text = await call(srv.port, "/metrics")
    assert status == 200
    assert 'wechat_token_upstream_requests_total{result="transient",source="access_token"} 1.0' in text
    assert 'wechat_token_upstream_requests_total{result="ok",source="access_token"} 1.0' in text
    assert 'wechat_token_source_state{source="ticket",state="ok"} 1.0' in text
    left = [line for line in text.splitlines() if line.startswith('wechat_token_seconds_left{source="access_token"}')]
    assert len(left) == 1 and 6900 < float(left[0].split()[-1]) <= 7000
    assert sandbox.current_token() not in text
    status, _ = await call(srv.port, "/metrics", headers={})
    assert status == 401
