"""Live reload: SIGHUP and POST /admin/reload apply a new config file without a restart.

The server reads a real file (written by the test), serves real HTTP, and every upstream
call is counted at the sandbox: unchanged sources must cost none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal

import pytest
import yaml
from conftest import AUTH, TEST_SECRET, base_config
from helpers_procs import merge, proc_config, wait_until

from server.app import start, stop
from server.config_file import load_config
from server.ops.reload import ConfigFile
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, STABLE_TOKEN_PATH, TICKET_PATH, TOKEN_PATH, Sandbox

SHOP_APPID, SHOP_SECRET = "wx_reload_shop_0001", "shop-secret-for-reload-0123456789"
CLIENT_A = "client-a-secret-0123456789abcdef"
CLIENT_B = "client-b-secret-0123456789abcdef"


@pytest.fixture
def sandbox(secret_watch) -> Sandbox:
    sb = Sandbox(apps={DEFAULT_APPID: DEFAULT_APPSECRET, SHOP_APPID: SHOP_SECRET})
    secret_watch.sandboxes.append(sb)
    secret_watch.secrets.update({SHOP_SECRET, CLIENT_A, CLIENT_B})
    return sb


def main_account(sandbox_url: str) -> dict:
    return {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": ["jsapi"], "default": True, "api_base": sandbox_url}


def shop_account(sandbox_url: str) -> dict:
    return {"appid": SHOP_APPID, "secret": SHOP_SECRET, "token": "classic", "api_base": sandbox_url}


class FileServer:
    """The server of these tests: a config file on disk, read at start and at each reload."""

    def __init__(self, tmp_path, redis_url: str, sandbox_url: str) -> None:
        self.path = str(tmp_path / "config.yaml")
        self.redis_url, self.sandbox_url = redis_url, sandbox_url
        self.running = None

    def write(self, **sections) -> None:
        raw = merge(base_config(self.redis_url, self.sandbox_url), {"sources": {}, **sections})
        raw["server"]["port"] = 1
        with open(self.path, "w") as fh:
            yaml.safe_dump(raw, fh)

    async def start(self):
        def read(path: str):
            cfg = load_config(path)
            return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))

        self.running = await start(read(self.path), ConfigFile(self.path, read))
        return self.running


@pytest.fixture
def file_server(tmp_path, redis_url, sandbox_url, io_loop):
    fs = FileServer(tmp_path, redis_url, sandbox_url)
    yield fs
    if fs.running is not None and not fs.running.stopped.is_set():
        io_loop.run_sync(lambda: stop(fs.running, 1.0))


@pytest.mark.gen_test(timeout=30)
async def test_an_added_account_starts_and_unchanged_ones_cost_no_call(file_server, call, sandbox, sandbox_url, redis_sync):
    file_server.write(accounts={"main": main_account(sandbox_url)})
    srv = await file_server.start()
    before = dict(sandbox.calls)
    main_token = redis_sync.get("access_token")

    file_server.write(accounts={"main": main_account(sandbox_url), "shop": shop_account(sandbox_url)})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200, body
    assert body["added"] == ["shop.access_token"] and body["removed"] == [] and body["restart_needed"] == []

    # the new account was fetched once, as at startup; the old ones not at all
    assert sandbox.calls[TOKEN_PATH] == before.get(TOKEN_PATH, 0) + 1
    assert sandbox.calls[STABLE_TOKEN_PATH] == before[STABLE_TOKEN_PATH]
    assert sandbox.calls[TICKET_PATH] == before[TICKET_PATH]
    status, body = await call(srv.port, "/wechat/token", type="access_token", account="shop")
    assert status == 200 and body["access_token"] == sandbox.current_token(SHOP_APPID)
    assert redis_sync.get("access_token") == main_token

    # a second reload of the same file: nothing at all
    calls = dict(sandbox.calls)
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200 and body["added"] == body["removed"] == body["changed"] == []
    assert dict(sandbox.calls) == calls


@pytest.mark.gen_test(timeout=30)
async def test_a_removed_account_is_no_longer_served_and_its_keys_stay(file_server, call, sandbox, sandbox_url, redis_sync, secret_watch):
    file_server.write(accounts={"main": main_account(sandbox_url), "shop": shop_account(sandbox_url)})
    srv = await file_server.start()
    shop_token = redis_sync.get("shop.access_token")
    assert shop_token
    since = len(secret_watch.records)

    file_server.write(accounts={"main": main_account(sandbox_url)})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200 and body["removed"] == ["shop.access_token"]
    status, body = await call(srv.port, "/wechat/token", type="access_token", account="shop")
    assert status == 404
    status, body = await call(srv.port, "/wechat/token", type="shop.access_token")
    assert status == 404
    assert redis_sync.get("shop.access_token") == shop_token  # left alone, as the log says
    assert any("shop.access_token removed" in line and "left alone" in line for line in secret_watch.records[since:])
    assert "shop.access_token" not in srv.refresher.states


@pytest.mark.gen_test(timeout=30)
async def test_changed_clients_and_secrets_apply_to_the_next_request(file_server, call, sandbox, sandbox_url):
    clients = [{"name": "a", "secret": CLIENT_A, "accounts": ["main"]}]
    file_server.write(accounts={"main": main_account(sandbox_url)}, clients=clients)
    srv = await file_server.start()
    calls = dict(sandbox.calls)
    assert (await call(srv.port, "/wechat/token", headers={"X-Token-Secret": CLIENT_A}, type="access_token"))[0] == 200

    file_server.write(accounts={"main": main_account(sandbox_url)}, clients=[{"name": "b", "secret": CLIENT_B, "accounts": ["main"]}],
                      server={"allow_ips": ["127.0.0.1/32"]})
    status, _ = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200
    assert (await call(srv.port, "/wechat/token", headers={"X-Token-Secret": CLIENT_A}, type="access_token"))[0] == 403
    assert (await call(srv.port, "/wechat/token", headers={"X-Token-Secret": CLIENT_B}, type="access_token"))[0] == 200

    # an IP rule that excludes the caller applies at once as well
    file_server.write(accounts={"main": main_account(sandbox_url)}, clients=[{"name": "b", "secret": CLIENT_B, "accounts": ["main"]}],
                      server={"allow_ips": ["10.0.0.0/8"]})
    assert (await call(srv.port, "/admin/reload", method="POST", body=b""))[0] == 200
    assert (await call(srv.port, "/wechat/token", headers={"X-Token-Secret": CLIENT_B}, type="access_token"))[0] == 403
    assert dict(sandbox.calls) == calls


@pytest.mark.gen_test(timeout=30)
async def test_a_bad_file_is_refused_in_one_line_and_the_running_config_stays(file_server, call, sandbox, sandbox_url, secret_watch):
    file_server.write(accounts={"main": main_account(sandbox_url)})
    srv = await file_server.start()
    since = len(secret_watch.records)
    with open(file_server.path, "a") as fh:
        fh.write("refresh: {interval: -1}\n")
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 400
    assert body["errcode"] == 400 and body["errmsg"].startswith("refresh.interval") and "\n" not in body["errmsg"]
    refused = [line for line in secret_watch.records[since:] if "reload refused" in line]
    assert len(refused) == 1 and body["errmsg"] in refused[0]
    # still serving, with the old config
    assert (await call(srv.port, "/wechat/token", type="access_token"))[0] == 200

    # a second account without default: true would rename the first one's keys: refused
    file_server.write(accounts={"main": {**main_account(sandbox_url), "default": False}, "shop": shop_account(sandbox_url)})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 400
    assert body["errmsg"].startswith("accounts.main: its source access_token would be renamed main.access_token"), body
    assert "default: true" in body["errmsg"]

    # the same account under the same source name but another appid: refused, not mixed up
    other = {**main_account(sandbox_url), "appid": "wx_someone_else_0001"}
    file_server.write(accounts={"main": other})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 400 and body["errmsg"].startswith("sources.access_token: its request now names another account")


@pytest.mark.gen_test(timeout=30)
async def test_only_the_operator_may_reload(file_server, call, sandbox_url):
    file_server.write(accounts={"main": main_account(sandbox_url)}, clients=[{"name": "a", "secret": CLIENT_A, "accounts": ["main"]}])
    srv = await file_server.start()
    assert (await call(srv.port, "/admin/reload", method="POST", body=b"", headers={"X-Token-Secret": CLIENT_A}))[0] == 403
    assert (await call(srv.port, "/admin/reload", method="POST", body=b"", headers={}))[0] == 401
    assert (await call(srv.port, "/admin/reload", method="POST", body=b"", headers={"X-Token-Secret": TEST_SECRET}))[0] == 200
    assert (await call(srv.port, "/admin/reload", headers=AUTH))[0] == 405


@pytest.mark.gen_test(timeout=30)
async def test_a_fetch_under_way_for_a_removed_source_still_lands(file_server, call, sandbox, sandbox_url, redis_sync):
    file_server.write(accounts={"main": main_account(sandbox_url), "shop": shop_account(sandbox_url)},
                      refresh={"force_min_interval": 0})
    srv = await file_server.start()
    old = redis_sync.get("shop.access_token")
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)
    forced = asyncio.ensure_future(call(srv.port, "/wechat/token/forcerefresh", type="access_token", account="shop", old=old))
    await wait_until(lambda: redis_sync.exists("shop.access_token:lock"), 5, "the fetch under way")
    file_server.write(accounts={"main": main_account(sandbox_url)}, refresh={"force_min_interval": 0})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200 and body["removed"] == ["shop.access_token"]
    status, body = await forced  # the request in flight is answered...
    assert status == 200 and body["access_token"] != old
    assert redis_sync.get("shop.access_token") == body["access_token"]  # ...and its value stored
    assert sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reloads_a_running_process(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    cfg = proc_config(redis_url, sandbox_url, sources={}, accounts={"main": main_account(sandbox_url)})
    proc = token_servers(cfg, "hup").start()
    await proc.wait_ready()
    calls = dict(sandbox.calls)
    with open(proc.config_path, "w") as fh:
        yaml.safe_dump(merge(cfg, {"accounts": {"shop": shop_account(sandbox_url)}}), fh)
    proc.send(signal.SIGHUP)
    await wait_until(lambda: redis_sync.get("shop.access_token"), 10, "the added account's token")
    status, body = await proc.get("/wechat/token", type="access_token", account="shop")
    assert status == 200 and body["access_token"] == sandbox.current_token(SHOP_APPID)
    assert sandbox.calls[TOKEN_PATH] == calls.get(TOKEN_PATH, 0) + 1
    assert sandbox.calls[STABLE_TOKEN_PATH] == calls[STABLE_TOKEN_PATH]

    with open(proc.config_path, "w") as fh:
        fh.write("server: {port: 99999}\n")
    proc.send(signal.SIGHUP)
    await wait_until(lambda: "reload refused" in proc.log(), 10, "the refusal in the log")
    assert proc.alive()
    assert (await proc.get("/wechat/token", type="access_token", account="shop"))[0] == 200
    assert await proc.stop() == 0


@pytest.mark.gen_test(timeout=30)
async def test_what_needs_a_restart_is_said_and_left_as_it_was(file_server, call, sandbox_url):
    file_server.write(accounts={"main": main_account(sandbox_url)})
    srv = await file_server.start()
    before = srv.service.cfg
    file_server.write(accounts={"main": main_account(sandbox_url)}, refresh={"interval": 5}, server={"shutdown_timeout": 3})
    status, body = await call(srv.port, "/admin/reload", method="POST", body=b"")
    assert status == 200 and body["restart_needed"] == ["refresh", "server.shutdown_timeout"]
    assert srv.service.cfg.refresh == before.refresh and srv.service.cfg.server.shutdown_timeout == before.server.shutdown_timeout
