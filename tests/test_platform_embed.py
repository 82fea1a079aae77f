"""A platform inside a host Tornado application (server.embed): its routes are mounted under
the prefix with the API's, so the event URL receives the verify ticket and authorizers are
served."""

from __future__ import annotations

import pytest
import tornado.web
from conftest import serve_app
from helpers_platform import COMPONENT_TOKEN_PATH, platform_sections, wait_for

from server.embed import TokenService
from server.sandbox.component import DEFAULT_COMPONENT_APPID
from server.sandbox.component_handlers import push

pytestmark = pytest.mark.timeout(60)

AUTHORIZER = "wxauthorizer0embed"


@pytest.mark.gen_test(timeout=60)
async def test_an_embedded_platform_is_mounted_under_the_prefix(make_config, sandbox, sandbox_url, call) -> None:
    tokens = await TokenService.start(make_config(**platform_sections(sandbox_url)))
    server = None
    try:
        server, port = serve_app(tornado.web.Application(tokens.handlers("/t")))
        status, body = await push(sandbox.component, f"http://127.0.0.1:{port}/t/wechat/component/events", DEFAULT_COMPONENT_APPID, "component_verify_ticket")
        assert (status, body) == (200, "success"), f"the embedded platform's event URL: {status}"
        await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 1, 5, "the component token")
        code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, AUTHORIZER)
        status, body = await call(port, "/t/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}"}}'.encode())
        assert status == 200 and body["authorizer_appid"] == AUTHORIZER, body
        status, body = await call(port, "/t/wechat/token", type="access_token", appid=AUTHORIZER)
        assert status == 200 and body["access_token"] == sandbox.component.current_token(AUTHORIZER), body
    finally:
        if server is not None:
            server.stop()
        await tokens.stop(1.0)
