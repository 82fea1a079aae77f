"""The operator's view: /readyz, the daily quota accounting, the version (server.ops, issue 10).

Real parts only: a redis-server (the session's, or one of the test's own that is killed or
paused), the sandbox as WeChat with its faults, the server pipeline, real HTTP.  Upstream
calls are counted at the sandbox and compared with what Redis counted.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import yaml
from helpers_procs import REPO, sandbox_sources, wait_until
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from server import __version__
from server.config import ConfigError
from server.config_file import parse_config
from server.ops.quota import _CALLS_LUA, CHINA_OFFSET, KEEP_SECONDS
from server.sandbox import TICKET_PATH, TOKEN_PATH
from tests.conftest import AUTH

CHINA = datetime.timezone(datetime.timedelta(hours=8))
NO_SECRET: dict[str, str] = {}




def china_day(r: redis.Redis) -> str:
    """Today in China by Redis's clock, as the count keys spell it."""
    seconds, _ = r.time()
    return datetime.datetime.fromtimestamp(seconds, CHINA).strftime("%Y%m%d")


def calls_in_redis(r: redis.Redis, name: str, day: str) -> int:
    return int(r.get(f"{name}:calls:{day}") or 0)


def assert_no_value_in(text: str, sandbox: Any) -> None:
    values = [v for v in sandbox.issued_values() if v in text]
    assert not values, f"a token or ticket value in {text!r}"


# --- /readyz --------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_readyz_is_ready_without_a_secret_for_a_probe_outside_the_allowlist(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(server={"allow_ips": ["127.0.0.1"], "trusted_proxies": [], "probe_ips": ["127.0.0.3"]}))
    client = AsyncHTTPClient(force_instance=True)

    async def from_probe(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        req = HTTPRequest(f"http://127.0.0.1:{srv.port}{path}", headers=headers, network_interface="127.0.0.3", request_timeout=5)
        resp = await client.fetch(req, raise_error=False)
        return resp.code, json.loads(resp.body)

    try:
        assert await from_probe("/readyz", NO_SECRET) == (200, {"status": "ready"})
        assert await from_probe("/healthz", NO_SECRET) == (200, {"status": "ok"})
        assert (await from_probe("/status", AUTH))[0] == 403  # the allowlist still holds elsewhere
    finally:
        client.close()
    assert (await call(srv.port, "/readyz", headers=NO_SECRET)) == (200, {"status": "ready"})


@pytest.mark.gen_test(timeout=30)
async def test_readyz_is_not_ready_while_redis_is_down_or_hung_and_healthz_stays_ok(make_config, start_server, call, sandbox, own_redis):
    srv = await start_server(make_config(redis={"url": own_redis.url, "socket_timeout": 2}))
    assert (await call(srv.port, "/readyz", headers=NO_SECRET)) == (200, {"status": "ready"})
    assert own_redis.process is not None

    # Hung (paused): the probe answers within its 0.5 s bound, not redis.socket_timeout (2 s).
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):  # the first probe and those that join its PING
            started = time.monotonic()
            status, body = await call(srv.port, "/readyz", headers=NO_SECRET)
            took = time.monotonic() - started
            assert status == 503 and took < 1.5, (status, took)
            # Values held in memory are still valid: Redis is the only problem named.
            assert body == {"status": "not ready", "redis": "unreachable", "sources": {}}
            assert (await call(srv.port, "/healthz", headers=NO_SECRET)) == (200, {"status": "ok"})
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    async def ready() -> bool:
        return (await call(srv.port, "/readyz", headers=NO_SECRET))[0] == 200

    await wait_until(ready, 5, "ready again after Redis resumed")

    # Down (killed): the same, and the token is still served from memory.
    own_redis.process.kill()
    own_redis.process.wait()
    status, body = await call(srv.port, "/readyz", headers=NO_SECRET)
    assert (status, body) == (503, {"status": "not ready", "redis": "unreachable", "sources": {}})
    assert (await call(srv.port, "/healthz", headers=NO_SECRET)) == (200, {"status": "ok"})
    status, token = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200
    assert_no_value_in(str(body), sandbox)


@pytest.mark.gen_test(timeout=20)
async def test_readyz_names_a_blocked_source_by_its_errcode_and_nothing_more(make_config, start_server, call, sandbox, secret_watch):
    # The account's IP is not whitelisted: the token is blocked, so the ticket has nothing to
    # be fetched with.  WeChat's errmsg carries an IP: the probe never repeats it.
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9, not in whitelist", times=None)
    since = len(secret_watch.records)
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/readyz", headers=NO_SECRET)
    assert status == 503
    assert body == {"status": "not ready", "redis": "ok", "sources": {"access_token": "blocked: 40164", "ticket": "no valid value"}}
    status, raw = await call(srv.port, "/readyz", headers=NO_SECRET)
    assert "203.0.113.9" not in str(raw) and "whitelist" not in str(raw)
    # The log says so once, not once per probe.
    not_ready = [line for line in secret_watch.records[since:] if line.startswith("not ready:")]
    assert len(not_ready) == 1 and "access_token: blocked: 40164" in not_ready[0]

    # The operator lifts the block (WeChat accepts the IP again): ready, and the log says so.
    sandbox.clear_faults()
    assert (await call(srv.port, "/wechat/token/forcerefresh", type="access_token"))[0] == 200

    async def ready() -> bool:
        return (await call(srv.port, "/readyz", headers=NO_SECRET)) == (200, {"status": "ready"})

    await wait_until(ready, 5, "the ticket fetched once its token is back")
    assert any(line == "ready again" for line in secret_watch.records[since:])


# --- quota accounting -----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_calls_are_counted_in_redis_across_instances_and_survive_a_restart(make_config, start_server, call, sandbox, sandbox_url, redis_sync):
    from server.app import stop

    sources = sandbox_sources(sandbox_url)
    sources["access_token"]["daily_quota"] = 2000
    cfg = make_config(sources=sources, refresh={"force_min_interval": 0})
    day = china_day(redis_sync)
    a = await start_server(cfg)
    b = await start_server(cfg)  # a second instance on the same Redis: reuses the values, no call
    for srv in (a, b, a, b, b):
        status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
        assert status == 200
    assert sandbox.calls[TOKEN_PATH] == 6 and sandbox.calls[TICKET_PATH] == 1

    def counted() -> bool:
        return calls_in_redis(redis_sync, "access_token", day) == sandbox.calls[TOKEN_PATH] and calls_in_redis(redis_sync, "ticket", day) == sandbox.calls[TICKET_PATH]

    await wait_until(counted, 5, "every call counted in Redis")
    ttl = redis_sync.ttl(f"access_token:calls:{day}")
    assert 86400 < ttl <= KEEP_SECONDS

    # Either instance shows the sum of both.
    for srv in (a, b):
        status, body = await call(srv.port, "/status")
        assert status == 200
        assert body["sources"]["access_token"]["calls_today"] == 6 and body["sources"]["access_token"]["quota"] == 2000
        assert body["sources"]["ticket"]["calls_today"] == 1 and body["sources"]["ticket"]["quota"] is None

    # Both stop; a new one starts with the values in Redis (no call) and the day's figure.
    await stop(a, 1.0)
    await stop(b, 1.0)
    c = await start_server(cfg)
    assert sandbox.calls[TOKEN_PATH] == 6
    status, body = await call(c.port, "/status")
    assert body["sources"]["access_token"]["calls_today"] == 6
    assert body["sources"]["access_token"]["upstream_calls"] == 0  # this process's own: none
    status, text = await call(c.port, "/metrics")
    assert 'wechat_token_upstream_calls_today{source="access_token"} 6.0' in text
    assert 'wechat_token_upstream_calls_today{source="ticket"} 1.0' in text
    assert 'wechat_token_daily_quota{source="access_token"} 2000.0' in text
    assert 'wechat_token_daily_quota{source="ticket"}' not in text
    if china_day(redis_sync) != day:
        pytest.skip("midnight in China passed during the test")


@pytest.mark.gen_test(timeout=30)
async def test_the_80_percent_warning_is_logged_once_across_instances(make_config, start_server, call, sandbox, sandbox_url, redis_sync, secret_watch):
    sources = sandbox_sources(sandbox_url)
    sources["access_token"]["daily_quota"] = 5  # the warning at the 4th call
    cfg = make_config(sources=sources, refresh={"force_min_interval": 0})
    day = china_day(redis_sync)
    since = len(secret_watch.records)
    a = await start_server(cfg)
    b = await start_server(cfg)
    for srv in (a, b, a, b, a):
        assert (await call(srv.port, "/wechat/token/forcerefresh", type="access_token"))[0] == 200
    assert sandbox.calls[TOKEN_PATH] == 6
    await wait_until(lambda: calls_in_redis(redis_sync, "access_token", day) == 6, 5, "every call counted")
    warnings = [line for line in secret_watch.records[since:] if "of its daily quota" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("source access_token: 4 upstream calls today") and "80% of its daily quota of 5" in warnings[0]
    if china_day(redis_sync) != day:
        pytest.skip("midnight in China passed during the test")


@pytest.mark.gen_test(timeout=30)
async def test_a_fetch_goes_on_when_its_call_cannot_be_counted(make_config, start_server, call, sandbox, own_redis, secret_watch):
    srv = await start_server(make_config(redis={"url": own_redis.url, "socket_timeout": 0.5}, refresh={"force_min_interval": 0}))
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    day = china_day(r)
    await wait_until(lambda: calls_in_redis(r, "access_token", day) == 1, 5, "the first call counted")
    assert (await call(srv.port, "/status"))[1]["sources"]["access_token"]["calls_today"] == 1
    r.close()
    assert own_redis.process is not None
    own_redis.process.kill()
    own_redis.process.wait()
    since = len(secret_watch.records)
    # The operator's forced refresh goes through without Redis (see Failures in the README).
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200 and body["access_token"] == sandbox.current_token()
    assert sandbox.calls[TOKEN_PATH] == 2
    await wait_until(lambda: any("cannot count upstream calls" in line for line in secret_watch.records[since:]), 5, "the counting failure logged")
    status, body = await call(srv.port, "/status")  # the figure Redis gave last, within its bound
    assert status == 200 and body["sources"]["access_token"]["calls_today"] == 1


def test_daily_quotas_default_per_kind_and_are_checked():
    secret = "a-request-secret-0123456789abcdef"
    appsecret = "an-appsecret-from-wechat-0123456789"

    def parse(accounts: dict[str, Any] | None = None, sources: dict[str, Any] | None = None) -> Any:
        raw: dict[str, Any] = {"server": {"secret": secret}}
        raw.update({"accounts": accounts} if accounts else {}, **({"sources": sources} if sources else {}))
        return parse_config(yaml.safe_dump(raw), env={}, source="test")

    cfg = parse({
        "main": {"appid": "wxmain1", "secret": appsecret, "tickets": ["jsapi"], "default": True},
        "mini": {"kind": "miniprogram", "appid": "wxmini", "secret": appsecret, "daily_quota": 500},
        "corp": {"kind": "wecom", "corpid": "wwcorp1", "corpsecret": appsecret, "agentid": 1000002, "tickets": ["jsapi"]},
    })
    quotas = {name: src.daily_quota for name, src in cfg.sources.items()}
    assert quotas == {"access_token": 2000, "ticket": None, "mini.access_token": 500, "corp.access_token": None, "corp.ticket": None}
    bare = parse(sources={"t": {"url": "https://api.weixin.qq.com/cgi-bin/token", "daily_quota": 100}, "u": {"url": "https://example.com/u"}})
    assert (bare.sources["t"].daily_quota, bare.sources["u"].daily_quota) == (100, None)
    with pytest.raises(ConfigError, match=r"^accounts\.main\.daily_quota: at least 1"):
        parse({"main": {"appid": "wxmain1", "secret": appsecret, "daily_quota": 0}})
    with pytest.raises(ConfigError, match=r"^sources\.t\.daily_quota: at least 1"):
        parse(sources={"t": {"url": "https://example.com/t", "daily_quota": -5}})
    with pytest.raises(ConfigError, match=r"^sources\.t\.daily_quota: must be an integer"):
        parse(sources={"t": {"url": "https://example.com/t", "daily_quota": 2.5}})


def test_the_china_day_is_computed_right_in_redis(redis_sync):
    """The script's calendar (Lua has none) against Python's, over 12 years of days, leap days included."""
    script = redis_sync.register_script(_CALLS_LUA)
    for k in range(-400, 12 * 366):
        offset = CHINA_OFFSET + k * 86400  # the same moment, k days later
        before = time.time()
        day, left_ms, count = script(keys=["nothing:calls:"], args=[offset, "0", KEEP_SECONDS])
        after = time.time()
        expected = {datetime.datetime.fromtimestamp(t + offset, datetime.timezone.utc).strftime("%Y%m%d") for t in (before, after)}
        assert day in expected, (k, day, expected)
        assert 0 < int(left_ms) <= 86400 * 1000 and int(count) == 0
    assert redis_sync.keys("nothing:*") == []  # reading creates no key


# --- the version ----------------------------------------------------------------------------


def test_version_prints_and_exits_0():
    done = subprocess.run([sys.executable, os.path.join(REPO, "token_server.py"), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.strip() == f"wechat-token-server {__version__}"


@pytest.mark.gen_test
async def test_the_version_is_in_the_startup_log_status_and_build_info(make_config, start_server, call, secret_watch):
    since = len(secret_watch.records)
    srv = await start_server(make_config())
    assert any(line.startswith(f"wechat-token-server {__version__} starting") for line in secret_watch.records[since:])
    status, body = await call(srv.port, "/status")
    assert status == 200 and body["version"] == __version__
    status, text = await call(srv.port, "/metrics")
    build = [line for line in text.splitlines() if line.startswith("wechat_token_build_info{")]
    assert len(build) == 1 and f'version="{__version__}"' in build[0] and build[0].endswith(" 1.0")
