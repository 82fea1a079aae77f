"""The HTTP API through real HTTP, with real Redis and the sandbox as upstream."""

import pytest


@pytest.mark.gen_test
async def test_serves_token_and_ticket(make_config, start_server, call, sandbox):
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200
    assert body["access_token"] == sandbox.current_token()
    assert 6900 < body["expires_in"] <= 7000
    status, body = await call(srv.port, "/wechat/token", type="ticket")
    assert status == 200 and body["ticket"]
    assert sandbox.calls["/cgi-bin/token"] == 1
