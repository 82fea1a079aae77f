"""The library face: the token service embedded in a host Tornado application.

The host app has a handler of its own and mounts the service's handlers under a prefix; a
standalone token_server.py process shares the same Redis.  Upstream calls are counted at
the sandbox: embedding is one more instance, never one more fetcher.
"""

from __future__ import annotations

import asyncio

import pytest
import tornado.netutil
import tornado.web
from conftest import AUTH, TEST_SECRET
from helpers_procs import proc_config
from tornado.httpserver import HTTPServer

from server.config import ConfigError
from server.embed import TokenService
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, STABLE_TOKEN_PATH, TICKET_PATH


class HelloHandler(tornado.web.RequestHandler):
    """The host application's own handler, which uses the token in process."""

    def initialize(self, tokens: TokenService) -> None:
        self.tokens = tokens

    async def get(self) -> None:
        token = await self.tokens.token("access_token")
        self.finish({"hello": "world", "token_prefix": token[:6]})


def embedded_config(redis_url: str, sandbox_url: str) -> dict:
    return {
        "server": {"secret": TEST_SECRET},
        "redis": {"url": redis_url},
        "refresh": {"interval": 60, "ahead": 600, "max_ttl": 7000, "timeout": 2},
        "accounts": {"main": {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": ["jsapi"], "api_base": sandbox_url}},
        "face": True,
    }


@pytest.fixture
def host_app(io_loop, redis_url, sandbox_url):
    """Start the service from a dict, mount it under /tokens next to the host's own handler."""
    started = []

    async def make():
        tokens = await TokenService.start(embedded_config(redis_url, sandbox_url))
        app = tornado.web.Application([(r"/hello", HelloHandler, {"tokens": tokens}), *tokens.handlers("/tokens")],
                                      log_function=tokens.log_function)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets(sockets)
        started.append((tokens, server))
        return tokens, sockets[0].getsockname()[1]

    yield make
    for tokens, server in started:
        server.stop()
        io_loop.run_sync(lambda tokens=tokens: tokens.stop(1.0))


@pytest.mark.gen_test(timeout=30)
async def test_mounted_under_a_prefix_next_to_the_host_handlers(host_app, call, sandbox, redis_sync):
    tokens, port = await host_app()
    token = redis_sync.get("access_token")
    assert token == sandbox.current_stable_token(DEFAULT_APPID)

    status, body = await call(port, "/hello", headers={})
    assert status == 200 and body == {"hello": "world", "token_prefix": token[:6]}
    status, body = await call(port, "/tokens/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == token
    status, body = await call(port, "/tokens/wechat/token", headers={}, type="access_token")
    assert status == 401  # same gate as the standalone server
    # the face's token answer under the prefix, for an SDK whose API base is http://host/tokens
    status, body = await call(port, "/tokens/cgi-bin/token", headers={}, grant_type="client_credential",
                              appid=DEFAULT_APPID, secret=DEFAULT_APPSECRET)
    assert status == 200 and body["access_token"] == token
    assert (await call(port, "/wechat/token", type="access_token"))[0] == 404  # nothing outside the prefix
    assert await tokens.token("ticket") == redis_sync.get("ticket")
    assert (sandbox.calls[STABLE_TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)


@pytest.mark.gen_test(timeout=60)
async def test_an_embedding_and_a_standalone_server_share_one_fetch_per_rotation(host_app, token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    cfg = proc_config(redis_url, sandbox_url, sources={},
                      accounts={"main": {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": ["jsapi"], "api_base": sandbox_url}})
    proc = token_servers(cfg, "standalone").start()
    await proc.wait_ready()
    tokens, port = await host_app()
    assert (sandbox.calls[STABLE_TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)  # the embedding reused the value
    old = await tokens.token()
    assert old == await proc.token()

    # WeChat rejected the token: the embedding rotates it once, the standalone server serves the new one
    new = await tokens.refresh_after_rejection(old)
    assert new != old and sandbox.calls[STABLE_TOKEN_PATH] == 2
    assert await tokens.refresh_after_rejection(old) == new  # a stale value costs nothing
    status, body = await proc.get("/wechat/token/forcerefresh", type="access_token", old=old)
    assert status == 200 and body["access_token"] == new
    assert sandbox.calls[STABLE_TOKEN_PATH] == 2
    assert await proc.token() == new


@pytest.mark.gen_test(timeout=30)
async def test_a_bad_embedded_config_is_one_line(redis_url, sandbox_url):
    raw = embedded_config(redis_url, sandbox_url)
    raw["refresh"]["ahead"] = "soon"
    with pytest.raises(ConfigError) as err:
        await TokenService.start(raw)
    assert str(err.value).startswith("refresh.ahead") and "\n" not in str(err.value)


@pytest.mark.gen_test(timeout=30)
async def test_reload_in_process(host_app, call, sandbox, sandbox_url, redis_url):
    tokens, port = await host_app()
    raw = embedded_config(redis_url, sandbox_url)
    raw["clients"] = [{"name": "shop", "secret": "shop-client-secret-0123456789ab", "accounts": ["main"]}]
    changes = await tokens.reload(raw)
    assert changes["added"] == changes["removed"] == []
    status, _ = await call(port, "/tokens/wechat/token", headers={"X-Token-Secret": "shop-client-secret-0123456789ab"}, type="access_token")
    assert status == 200
    assert (await call(port, "/tokens/wechat/token", headers=AUTH, type="access_token"))[0] == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_read_in_flight_when_a_reload_removes_its_source_does_not_crash(host_app, call, sandbox, sandbox_url, redis_url, redis_sync):
    """README: "Requests in flight finish with the parts they started with".  A request for the
    ticket whose Redis read is under way when a reload removes the ticket ends in a 500 (and an
    "uncaught exception" traceback in the log): the read lands in Mirror._reconcile, which looks
    up ``self.states[name]`` after Refresher.reconfigure popped it (server/mirror.py
    _read_redis -> _reconcile; server/refresher.py reconfigure pops the state of a source with
    no fetch under way at once)."""
    tokens, port = await host_app()
    assert "ticket" in tokens.service.refresher.sources
    assert (await call(port, "/tokens/wechat/token", type="ticket"))[0] == 200
    loop = asyncio.get_running_loop()
    # Redis stalls for 1.6 s (a slow fork, a big KEYS): memory's confirmation ages past
    # read_max_age (1 s), so the next read asks Redis and waits for it (up to 0.5 s).
    stall = loop.run_in_executor(None, redis_sync.execute_command, "DEBUG", "SLEEP", "1.6")
    await asyncio.sleep(1.2)
    request = asyncio.ensure_future(call(port, "/tokens/wechat/token", type="ticket"))
    await asyncio.sleep(0.1)
    cfg = embedded_config(redis_url, sandbox_url)
    cfg["accounts"]["main"]["tickets"] = []
    changes = await tokens.reload(cfg)  # touches no Redis: done while Redis still sleeps
    assert changes["removed"] == ["ticket"]
    status, body = await request
    await stall
    # 200 (the value it started with) or a clean 404/503 would do; a 500 is a crash
    assert status != 500, f"a request in flight during the reload crashed: {status} {body}"
    assert (sandbox.calls[STABLE_TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)
