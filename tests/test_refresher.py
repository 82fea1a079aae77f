"""The refresher, through the running server: every upstream call is counted at the sandbox."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from server.sandbox import TICKET_PATH, TOKEN_PATH

FAST = {"interval": 0.2, "ahead": 1.0, "max_ttl": 7000, "timeout": 2, "backoff_max": 5}


async def wait_until(predicate, timeout=5.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


@pytest.mark.gen_test
async def test_first_pass_is_done_when_start_returns_and_stores_plain_keys(make_config, start_server, sandbox, redis_sync):
    await start_server(make_config())
    # start() returned: the first pass is done, nothing waited for a tick.
    assert sandbox.calls[TOKEN_PATH] == 1 and sandbox.calls[TICKET_PATH] == 1
    assert redis_sync.get("access_token") == sandbox.current_token()
    assert 6990 <= redis_sync.ttl("access_token") <= 7000  # life = min(expires_in 7200, max_ttl 7000)
    assert sandbox.token_status(redis_sync.get("access_token")) == 0
    meta = redis_sync.hgetall("access_token:meta")
    # The version is a hybrid clock: microseconds of Redis's TIME when the fetch took the lock.
    assert abs(int(meta["version"]) / 1e6 - redis_sync.time()[0]) < 5 and meta["field"] == "access_token"
    assert redis_sync.hget("ticket:meta", "field") == "ticket"


@pytest.mark.gen_test
async def test_restart_reuses_values_in_redis_with_zero_upstream_calls(make_config, start_server, call, sandbox):
    from server.app import stop

    first = await start_server(make_config())
    _, before = await call(first.port, "/wechat/token", type="access_token")
    await stop(first, 1.0)
    second = await start_server(make_config())
    status, after = await call(second.port, "/wechat/token", type="access_token")
    assert status == 200 and after["access_token"] == before["access_token"]
    assert sandbox.calls[TOKEN_PATH] == 1 and sandbox.calls[TICKET_PATH] == 1


@pytest.mark.gen_test
async def test_prefix_namespaces_every_key(make_config, start_server, sandbox, redis_sync):
    await start_server(make_config(redis={"prefix": "wx:"}))
    assert redis_sync.get("wx:access_token") == sandbox.current_token()
    assert redis_sync.get("access_token") is None


@pytest.mark.gen_test(timeout=20)
async def test_refreshes_ahead_of_expiry_using_expires_in(make_config, start_server, call, sandbox, redis_sync):
    sandbox.expires_in = 6  # seconds: ahead (3 s) is reached 3 s after each fetch
    before_start = time.monotonic()
    srv = await start_server(make_config(refresh=dict(FAST, ahead=3)))
    _, first = await call(srv.port, "/wechat/token", type="access_token")
    assert 4 <= first["expires_in"] <= 6
    # Readers see the value renewed while it still has about `ahead` left, never run down.
    served = []
    while sandbox.calls[TOKEN_PATH] < 2 and time.monotonic() < before_start + 8:
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        served.append((status, body.get("expires_in")))
        await asyncio.sleep(0.05)
    renewed_after = time.monotonic() - before_start
    assert sandbox.calls[TOKEN_PATH] == 2, "not renewed before the first value expired"
    # Not at once (the value has more than `ahead` left for 3 s), and well before its
    # expiry at 6 s from the fetch (the start): ahead of it, as `expires_in` and `ahead` say.
    assert 2.5 <= renewed_after <= 5.0, f"renewed {renewed_after:.1f}s after the fetch of a 6 s value (ahead 3 s)"
    assert all(status == 200 and left >= 1 for status, left in served), served
    assert await wait_until(lambda: redis_sync.get("access_token") != first["access_token"], timeout=2)
    _, second = await call(srv.port, "/wechat/token", type="access_token")
    assert second["access_token"] != first["access_token"]
    assert sandbox.token_status(second["access_token"]) == 0
    assert redis_sync.get("access_token") == second["access_token"]
    assert redis_sync.pttl("access_token") <= 6000
    # The ticket was fetched again with the new token (it is valid at the sandbox).
    assert await wait_until(lambda: sandbox.calls[TICKET_PATH] >= 2, timeout=3)
    # One fetch per rotation, not one per tick: the new value is not due for 3 s.
    await asyncio.sleep(1.0)
    assert sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test
async def test_max_ttl_caps_the_life(make_config, start_server, call, redis_sync):
    srv = await start_server(make_config(refresh={"max_ttl": 5, "ahead": 2, "interval": 1}))
    _, body = await call(srv.port, "/wechat/token", type="access_token")
    assert body["expires_in"] <= 5
    assert 0 < redis_sync.pttl("access_token") <= 5000


@pytest.mark.parametrize("kind", ["busy", "garbage", "missing_field", "http_error"])
@pytest.mark.gen_test(timeout=15)
async def test_failed_fetch_stores_nothing_then_retries_with_backoff(kind, make_config, start_server, call, sandbox, redis_sync):
    sandbox.inject(TOKEN_PATH, kind, times=1)
    srv = await start_server(make_config(refresh=FAST))
    assert redis_sync.get("access_token") is None  # an error is never stored as a value
    assert redis_sync.get("ticket") is None
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 503 and body["errcode"] == 503
    # The retry comes from the backoff (0.5-1 s), not from the next 0.2 s tick.
    failed_at = time.monotonic()
    assert await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2, timeout=4, step=0.02)
    assert time.monotonic() - failed_at >= 0.4
    assert await wait_until(lambda: redis_sync.get("access_token") is not None, timeout=2)
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0
    assert await wait_until(lambda: redis_sync.get("ticket") is not None, timeout=4)


@pytest.mark.gen_test(timeout=15)
async def test_timeout_is_a_transient_failure(make_config, start_server, call, sandbox, redis_sync):
    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    srv = await start_server(make_config(refresh=dict(FAST, timeout=0.5)))
    status, _ = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 503
    assert await wait_until(lambda: redis_sync.get("access_token") is not None, timeout=5)


@pytest.mark.gen_test(timeout=20)
async def test_transient_failures_back_off_exponentially_up_to_the_cap(make_config, start_server, sandbox):
    sandbox.inject(TOKEN_PATH, "busy", times=None)
    await start_server(make_config(refresh=dict(FAST, backoff_max=2)))
    times = [time.monotonic()]
    deadline = times[0] + 6.5
    while time.monotonic() < deadline:  # note when each attempt lands
        if sandbox.calls[TOKEN_PATH] > len(times):
            times.append(time.monotonic())
        await asyncio.sleep(0.02)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 32 ticks passed.  Delays: 0.5-1 s, then 1-2 s, then capped at 1-2 s (backoff_max 2).
    assert 3 <= len(gaps) <= 7, gaps
    assert 0.45 <= gaps[0] <= 1.3, gaps
    assert gaps[1] >= 0.95, gaps
    assert max(gaps) <= 2.3, gaps


@pytest.mark.gen_test(timeout=15)
async def test_failed_refresh_keeps_serving_the_old_value(make_config, start_server, call, sandbox, redis_sync):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    _, old = await call(srv.port, "/wechat/token", type="access_token")
    sandbox.inject(TOKEN_PATH, "busy", times=None)
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503 and body == {"errcode": 503, "errmsg": "refresh failed: upstream is failing"}
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == old["access_token"]
    assert redis_sync.get("access_token") == old["access_token"]


@pytest.mark.parametrize("errcode", [40013, 40125, 40164, 41004, 48001, 89503])
@pytest.mark.gen_test(timeout=15)
async def test_fatal_errcode_blocks_the_source_until_forced(errcode, make_config, start_server, call, sandbox, caplog):
    msg = "invalid ip 203.0.113.9 ipv6 ::ffff:203.0.113.9, not in whitelist" if errcode == 40164 else "fatal"
    sandbox.inject(TOKEN_PATH, "errcode", errcode=errcode, errmsg=msg, times=None)
    with caplog.at_level(logging.ERROR, logger="server.refresher"):
        srv = await start_server(make_config(refresh=FAST))
        await asyncio.sleep(1.5)  # seven ticks
    assert sandbox.calls[TOKEN_PATH] == 1  # not one per tick
    assert sandbox.calls[TICKET_PATH] == 0  # the ticket needs a token: no call without one
    blocked = [r.getMessage() for r in caplog.records if "BLOCKED" in r.getMessage()]
    assert len(blocked) == 1 and f"errcode {errcode}" in blocked[0]
    if errcode == 40164:
        assert "203.0.113.9" in blocked[0] and "whitelist" in blocked[0]
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 503 and body["errmsg"] == "no valid value: upstream is failing"
    assert srv.refresher.status()["access_token"]["state"] == "blocked"
    # An operator's forced refresh (server.secret) tries again, once.
    sandbox.clear_faults()
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200 and sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=15)
async def test_daily_quota_stops_calls_until_reset(make_config, start_server, sandbox, caplog, redis_sync):
    sandbox.inject(TOKEN_PATH, "errcode", errcode=45009, errmsg="reach max api daily quota limit", times=None)
    with caplog.at_level(logging.ERROR, logger="server.refresher"):
        srv = await start_server(make_config(refresh=FAST))
        await asyncio.sleep(1.2)
    assert sandbox.calls[TOKEN_PATH] == 1
    assert any("45009" in r.getMessage() and "daily quota" in r.getMessage() for r in caplog.records)
    assert srv.refresher.status()["access_token"]["state"] == "quota"
    # Blocked until midnight China time by Redis's clock, in Redis (for every instance) and here.
    seconds, micros = redis_sync.time()
    ttl = redis_sync.pttl("access_token:blocked") / 1000
    midnight = seconds + micros / 1e6 + ttl + 8 * 3600
    assert 0 < ttl <= 86400 and min(midnight % 86400, 86400 - midnight % 86400) < 2
    assert abs(srv.refresher.states["access_token"].block_until - time.monotonic() - ttl) < 2


@pytest.mark.gen_test(timeout=15)
async def test_ticket_with_stale_token_refreshes_the_token_once_and_retries(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    _, ours = await call(srv.port, "/wechat/token", type="access_token")
    # Someone else fetches twice behind our back: our token dies at once (40001).
    for _ in range(2):
        sandbox.api_token("client_credential", "wx123", "sandbox-appsecret-0123456789", "127.0.0.1")
    assert sandbox.token_status(ours["access_token"]) == 40001
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="ticket")
    assert status == 200 and body["ticket"]
    assert sandbox.calls[TOKEN_PATH] == 2  # our start + exactly one refresh
    assert sandbox.calls[TICKET_PATH] == 3  # start, the 40001, the retry
    _, token = await call(srv.port, "/wechat/token", type="access_token")
    assert token["access_token"] != ours["access_token"] and sandbox.token_status(token["access_token"]) == 0


@pytest.mark.gen_test(timeout=15)
async def test_stale_token_never_loops(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    sandbox.inject(TICKET_PATH, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="ticket")
    assert status == 503
    assert sandbox.calls[TICKET_PATH] == 3  # start + one try + one retry
    assert sandbox.calls[TOKEN_PATH] == 2  # start + one refresh, never more


@pytest.mark.gen_test(timeout=15)
async def test_concurrent_forced_refreshes_share_one_call(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)  # keep the flight open while the crowd arrives
    results = await asyncio.gather(*(call(srv.port, "/wechat/token/forcerefresh", type="access_token") for _ in range(50)))
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert sandbox.calls[TOKEN_PATH] == 2  # start + one


@pytest.mark.gen_test
async def test_forcerefresh_with_old(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    _, first = await call(srv.port, "/wechat/token", type="access_token")
    status, new = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=first["access_token"])
    assert status == 200 and new["access_token"] != first["access_token"]
    assert sandbox.calls[TOKEN_PATH] == 2
    # A caller still holding the first token: someone already rotated it, no call.
    status, again = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=first["access_token"])
    assert status == 200 and again["access_token"] == new["access_token"]
    assert sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test
async def test_force_min_interval_returns_the_fresh_value(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 30}))
    _, first = await call(srv.port, "/wechat/token", type="access_token")
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200 and body["access_token"] == first["access_token"]
    assert sandbox.calls[TOKEN_PATH] == 1


@pytest.mark.gen_test(timeout=15)
async def test_stable_token_source_forces_with_force_refresh(make_config, start_server, call, sandbox, sandbox_url):
    stable = {
        "url": f"{sandbox_url}/cgi-bin/stable_token",
        "method": "POST",
        "json": {"grant_type": "client_credential", "appid": "wx123", "secret": "sandbox-appsecret-0123456789", "force_refresh": False},
        "force": {"force_refresh": True},
    }
    srv = await start_server(make_config(sources={"access_token": stable}, refresh={"force_min_interval": 0}))
    _, first = await call(srv.port, "/wechat/token", type="access_token")
    # A normal refresh returns the same stable token; a forced one a new one.
    status, forced = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200 and forced["access_token"] != first["access_token"]
    assert sandbox.calls["/cgi-bin/stable_token"] == 2
    assert sandbox.token_status(first["access_token"]) == 0  # still in its overlap


@pytest.mark.gen_test(timeout=15)
async def test_same_value_from_upstream_is_not_asked_again_every_tick(make_config, start_server, sandbox, sandbox_url):
    # stable_token answers with the same token until about 300 s before its expiry.
    sandbox.expires_in = 20  # the sandbox renews a stable token when under 10 s remain
    stable = {
        "url": f"{sandbox_url}/cgi-bin/stable_token",
        "method": "POST",
        "json": {"grant_type": "client_credential", "appid": "wx123", "secret": "sandbox-appsecret-0123456789"},
    }
    await start_server(make_config(sources={"access_token": stable}, refresh={"interval": 0.2, "ahead": 19.5}))
    await asyncio.sleep(2.0)  # ten ticks, every one of them inside `ahead`
    assert sandbox.calls["/cgi-bin/stable_token"] <= 2


@pytest.mark.gen_test(timeout=20)
async def test_instances_on_one_redis_back_off_together(make_config, start_server, sandbox, redis_sync):
    """Three servers, WeChat busy: the calls are those of one backing-off server, not three."""
    sandbox.inject(TOKEN_PATH, "busy", times=None)
    cfg = make_config(refresh=FAST)
    for _ in range(3):
        await start_server(cfg)
    assert sandbox.calls[TOKEN_PATH] == 1  # the two later starts saw the announced backoff
    assert redis_sync.get("access_token:backoff") is not None
    await asyncio.sleep(3.0)
    # One server alone: attempts at about 0, 0.5-1, 1.5-3 s (at most 4). Three on their own: ~3x.
    assert 2 <= sandbox.calls[TOKEN_PATH] <= 4
    assert int(redis_sync.get("access_token:failures")) == sandbox.calls[TOKEN_PATH]  # one count for all



# --- the review's findings: each test fails on the code before its fix --------------------

SHOP = {"name": "shop", "secret": "shop-client-secret-0123456789", "sources": ["access_token", "ticket"]}
SHOP_AUTH = {"X-Token-Secret": SHOP["secret"]}


@pytest.mark.gen_test(timeout=20)
async def test_a_slow_redis_read_never_lets_a_refresh_skip_the_lock(make_config, start_server, call, sandbox, redis_sync):
    srv = await start_server(make_config(refresh={"force_min_interval": 0, "timeout": 1}))
    _, before = await call(srv.port, "/wechat/token", type="access_token")
    redis_sync.set("access_token:lock", "another-instance", px=2500)  # someone else is fetching
    lock_ends = time.monotonic() + 2.5
    loop = asyncio.get_running_loop()
    stall = loop.run_in_executor(None, redis_sync.execute_command, "DEBUG", "SLEEP", "0.8")
    await asyncio.sleep(0.05)
    started = time.monotonic()
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == before["access_token"]  # from memory...
    assert time.monotonic() - started < 0.75  # ...without waiting for the stalled Redis
    await stall
    # Redis answers again: a forced refresh waits for the lock holder; it calls only once
    # the holder has let go (here without a value or an announced failure).
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200 and body["access_token"] != before["access_token"]
    assert time.monotonic() >= lock_ends - 0.1
    assert sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=15)
async def test_a_wrong_redis_password_stops_the_start(make_config, start_server, sandbox, tmp_path):
    from server.app import StartupError
    from server.embedded_redis import EmbeddedRedis

    guarded = EmbeddedRedis(str(tmp_path), persistent=False, extra_args=["--requirepass", "the-right-password-0123"])
    guarded.start()
    try:
        with pytest.raises(StartupError, match=r"cannot use Redis at redis://127\.0\.0\.1:\d+/0: AuthenticationError"):
            await start_server(make_config(redis={"url": guarded.url, "password": "not-the-password-0123"}))
        assert sandbox.calls[TOKEN_PATH] == 0  # no lock, no start: no token fetched either
        srv = await start_server(make_config(redis={"url": guarded.url, "password": "the-right-password-0123"}))
        assert srv.refresher.status()["access_token"]["state"] == "ok"
    finally:
        guarded.stop()


@pytest.mark.gen_test(timeout=15)
async def test_only_the_operator_unblocks_a_blocked_source(make_config, start_server, call, sandbox):
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9, not in whitelist", times=None)
    srv = await start_server(make_config(clients=[SHOP], refresh=FAST))
    assert sandbox.calls[TOKEN_PATH] == 1
    # A business server's forced refresh, with or without a stale `old`: no call, 503 saying why.
    for extra in ({}, {"old": "some-token-it-holds"}):
        status, body = await call(srv.port, "/wechat/token/forcerefresh", headers=SHOP_AUTH, type="access_token", **extra)
        assert status == 503 and "blocked after errcode 40164" in body["errmsg"]
    await asyncio.sleep(0.5)  # ticks pass
    assert sandbox.calls[TOKEN_PATH] == 1
    assert srv.refresher.status()["access_token"]["state"] == "blocked"
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")  # the operator
    assert status == 503 and sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=15)
async def test_a_ticket_is_not_blamed_for_its_tokens_error(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    for _ in range(2):  # someone else rotates twice: our token dies
        sandbox.api_token("client_credential", "wx123", "sandbox-appsecret-0123456789", "127.0.0.1")
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40013, errmsg="invalid appid", times=None)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="ticket")
    assert status == 503
    states = srv.refresher.status()
    assert states["access_token"]["state"] == "blocked"
    assert states["ticket"]["state"] != "blocked" and states["ticket"]["failures"] == 0
    # The token comes back: both are healthy, and the ticket (still valid) is not fetched again.
    sandbox.clear_faults()
    tickets = sandbox.calls[TICKET_PATH]
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200
    states = srv.refresher.status()
    assert states["access_token"]["state"] == states["ticket"]["state"] == "ok"
    assert sandbox.calls[TICKET_PATH] == tickets


@pytest.mark.gen_test(timeout=20)
async def test_a_fatal_error_blocks_every_instance_with_one_call(make_config, start_server, sandbox, redis_sync):
    sandbox.expires_in = 3  # due 2 s after each fetch (ahead 1 s)
    cfg = make_config(refresh=FAST)
    servers = [await start_server(cfg) for _ in range(3)]
    assert sandbox.calls[TOKEN_PATH] == 1  # the later starts reused the value
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40125, errmsg="invalid appsecret", times=None)
    await asyncio.sleep(3.5)  # the value falls due on all three
    assert sandbox.calls[TOKEN_PATH] == 2  # one instance tried, the others took its word
    assert redis_sync.get("access_token:blocked") is not None
    assert [s.refresher.status()["access_token"]["state"] for s in servers] == ["blocked"] * 3


@pytest.mark.gen_test
async def test_a_value_key_deleted_by_hand_is_put_back_without_a_call(make_config, start_server, call, sandbox, redis_sync):
    srv = await start_server(make_config())
    _, body = await call(srv.port, "/wechat/token", type="access_token")
    redis_sync.delete("access_token")  # eviction, or an operator's DEL
    status, again = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and again["access_token"] == body["access_token"]
    # put back by the check every second (reads may be served from memory meanwhile)
    assert await wait_until(lambda: redis_sync.get("access_token") == body["access_token"], 2.5)
    assert sandbox.calls[TOKEN_PATH] == 1


@pytest.mark.gen_test(timeout=15)
async def test_a_business_servers_forced_refresh_respects_the_backoff(make_config, start_server, call, sandbox):
    srv = await start_server(make_config(clients=[SHOP], refresh={"force_min_interval": 0, "backoff_max": 60}))
    sandbox.inject(TOKEN_PATH, "busy", times=None)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")  # fails, backs off
    assert status == 503 and sandbox.calls[TOKEN_PATH] == 2
    from tornado.httpclient import AsyncHTTPClient

    resp = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{srv.port}/wechat/token/forcerefresh?type=access_token", headers=SHOP_AUTH, raise_error=False
    )
    assert resp.code == 503 and b"backing off" in resp.body
    assert 1 <= int(resp.headers["Retry-After"]) <= 2
    assert sandbox.calls[TOKEN_PATH] == 2  # no call during the backoff


@pytest.mark.gen_test(timeout=20)
async def test_forced_refreshes_across_instances_share_one_call_without_min_interval(make_config, start_server, call, sandbox):
    cfg = make_config(server={"forcerefresh_per_minute": 100000}, refresh={"force_min_interval": 0})
    a, b = await start_server(cfg), await start_server(cfg)
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)  # the crowd arrives while the fetch runs
    results = await asyncio.gather(*(call(srv.port, "/wechat/token/forcerefresh", type="access_token") for srv in [a, b] * 50))
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert sandbox.calls[TOKEN_PATH] == 2  # start + one


@pytest.mark.gen_test
async def test_a_json_nesting_bomb_is_a_transient_failure(io_loop):
    import tornado.web

    from server.config import SourceConfig
    from server.sources import Source
    from server.upstream import ErrorKind, Upstream, UpstreamError
    from tests.conftest import serve_app

    class Bomb(tornado.web.RequestHandler):
        def get(self):
            self.write("[" * 100000)

    server, port = serve_app(tornado.web.Application([(r"/t", Bomb)]))
    source = Source(SourceConfig(url=f"http://127.0.0.1:{port}/t", name="access_token"))
    upstream = Upstream(2)
    with pytest.raises(UpstreamError) as info:
        await upstream.fetch(source, source.build_request({}))
    assert info.value.kind is ErrorKind.TRANSIENT
    upstream.close()
    server.stop()


# --- the second review's findings ----------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_restart_lifts_a_block_even_when_nothing_is_due(make_config, start_server, call, sandbox, redis_sync):
    from server.app import stop

    first = await start_server(make_config(refresh={"force_min_interval": 0}))
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9", times=1)
    status, _ = await call(first.port, "/wechat/token/forcerefresh", type="access_token")  # the operator's
    assert status == 503 and redis_sync.get("access_token:blocked") is not None
    await stop(first, 1.0)
    second = await start_server(make_config(clients=[SHOP], refresh={"force_min_interval": 0}))  # whitelist fixed
    assert redis_sync.get("access_token:blocked") is None
    await asyncio.sleep(0.3)
    assert second.refresher.status()["access_token"]["state"] == "ok"
    status, _ = await call(second.port, "/wechat/token/forcerefresh", headers=SHOP_AUTH, type="access_token")
    assert status == 200 and sandbox.calls[TOKEN_PATH] == 3


@pytest.mark.gen_test(timeout=20)
async def test_a_crowd_joining_a_wait_for_another_instance_makes_no_second_call(make_config, start_server, call, sandbox):
    cfg = make_config(server={"forcerefresh_per_minute": 100000}, refresh={"force_min_interval": 0})
    a, b = await start_server(cfg), await start_server(cfg)
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)
    first = asyncio.ensure_future(call(a.port, "/wechat/token/forcerefresh", type="access_token"))
    await asyncio.sleep(0.2)  # A is mid-fetch when B's crowd arrives
    crowd = await asyncio.gather(*(call(b.port, "/wechat/token/forcerefresh", type="access_token") for _ in range(20)))
    status, body = await first
    assert status == 200 and {s for s, _ in crowd} == {200}
    assert {b_["access_token"] for _, b_ in crowd} == {body["access_token"]}
    assert sandbox.calls[TOKEN_PATH] == 2  # start + one


@pytest.mark.gen_test(timeout=20)
async def test_a_ticket_that_keeps_failing_rotates_the_token_only_once(make_config, start_server, call, sandbox):
    sandbox.inject(TICKET_PATH, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    srv = await start_server(make_config(refresh=dict(FAST, backoff_max=1)))
    status, _ = await call(srv.port, "/wechat/token", type="ticket")
    assert status == 503
    await asyncio.sleep(3.0)  # several backed-off retries of the ticket, which has no value
    assert sandbox.calls[TICKET_PATH] >= 4
    assert sandbox.calls[TOKEN_PATH] == 2  # start + the one recovery, never one per retry


@pytest.mark.gen_test(timeout=30)
async def test_without_redis_only_the_operator_may_force(make_config, start_server, call, sandbox, tmp_path):
    from server.embedded_redis import EmbeddedRedis

    own = EmbeddedRedis(str(tmp_path), persistent=False)
    own.start()
    try:
        srv = await start_server(make_config(clients=[SHOP], redis={"url": own.url, "socket_timeout": 0.5}, refresh={"force_min_interval": 0}))
    finally:
        own.stop()
    status, body = await call(srv.port, "/wechat/token/forcerefresh", headers=SHOP_AUTH, type="access_token")
    assert status == 503 and "needs its lock" in body["errmsg"]
    assert sandbox.calls[TOKEN_PATH] == 1
    status, _ = await call(srv.port, "/wechat/token", headers=SHOP_AUTH, type="access_token")
    assert status == 200  # reads go on from memory
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")  # the operator
    assert status == 200 and sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=20)
async def test_instances_do_not_each_ask_again_for_the_same_stable_token(make_config, start_server, sandbox, sandbox_url, redis_sync):
    sandbox.expires_in = 20
    stable = {
        "url": f"{sandbox_url}/cgi-bin/stable_token",
        "method": "POST",
        "json": {"grant_type": "client_credential", "appid": "wx123", "secret": "sandbox-appsecret-0123456789"},
    }
    cfg = make_config(sources={"access_token": stable}, refresh={"interval": 0.2, "ahead": 19.5})
    for _ in range(3):
        await start_server(cfg)
    fetched = redis_sync.hget("access_token:meta", "version")
    await asyncio.sleep(2.0)  # every tick of every instance is inside `ahead`
    assert sandbox.calls["/cgi-bin/stable_token"] == 2  # the fetch, then one confirmation for all
    assert redis_sync.hget("access_token:meta", "version") == fetched  # a confirmation is no new value


@pytest.mark.gen_test(timeout=20)
async def test_a_forced_refresh_whose_answer_is_lost_caps_the_stored_token(make_config, start_server, call, sandbox, redis_sync):
    srv = await start_server(make_config(refresh={"force_min_interval": 0, "timeout": 0.5}))
    stored = redis_sync.get("access_token")
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)  # WeChat issues a token after we gave up
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503
    # Capped to WeChat's 5 minutes for a "previous" token, which is under `ahead`: the
    # backoff retry refreshes it at once instead of serving it for hours.
    assert await wait_until(lambda: redis_sync.get("access_token") != stored, timeout=5)
    assert sandbox.token_status(redis_sync.get("access_token")) == 0
    assert redis_sync.ttl("access_token") > 6900
    assert sandbox.calls[TOKEN_PATH] == 3  # start, the lost one, the retry


@pytest.mark.gen_test
async def test_stop_closes_every_redis_connection(make_config, start_server, call, redis_sync):
    from server.app import stop

    baseline = len(redis_sync.client_list())
    srv = await start_server(make_config())
    await asyncio.gather(*(call(srv.port, "/wechat/token", type=t) for t in ["access_token", "ticket"] * 5))
    assert len(redis_sync.client_list()) > baseline
    await stop(srv, 1.0)
    await asyncio.sleep(0.1)
    assert len(redis_sync.client_list()) == baseline


# --- the third review's findings -----------------------------------------------------------


@pytest.mark.timeout(20)  # a spinning event loop cannot be stopped by the async timeout
@pytest.mark.gen_test(timeout=15)
async def test_a_caller_resumed_as_a_flight_lands_does_not_spin(make_config, start_server, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 1}))
    refresher, name = srv.refresher, "access_token"
    state = refresher.states[name]
    first = state.entry.version
    await asyncio.sleep(1.2)  # past force_min_interval: a forced refresh must fetch

    async def forced_caller():
        # Resumed by the same Redis read that completes the tick's flight, so it runs in the
        # loop pass where that flight is done but not yet cleared from state.flight.
        while state.flight is None or name not in refresher.mirror._reads:
            await asyncio.sleep(0)
        await refresher.mirror.read(name)
        return await refresher.refresh(name, force=True)

    tick = asyncio.ensure_future(refresher._attempt(name))  # what a PeriodicCallback tick runs
    entry = await forced_caller()
    await tick
    assert entry.version > first and sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=20)
async def test_a_lost_answer_on_the_classic_endpoint_caps_the_token_even_when_not_forced(make_config, start_server, sandbox, redis_sync):
    sandbox.expires_in = 700  # ahead 699: due 1 s after each fetch, with ~699 s of life left
    srv = await start_server(make_config(refresh={"interval": 0.2, "ahead": 699, "timeout": 0.5, "backoff_max": 60}))
    assert redis_sync.pttl("access_token") > 690_000
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0, times=1)  # the tick's call: WeChat issues, we never hear
    state = srv.refresher.states["access_token"]
    assert await wait_until(lambda: state.failures == 1, timeout=4, step=0.01)
    # Cut to WeChat's 5 minutes for a "previous" token (the backoff retry comes 0.5-1 s later).
    assert redis_sync.pttl("access_token") <= 300_000


@pytest.mark.gen_test(timeout=20)
async def test_a_confirmation_ends_the_shared_backoff(make_config, start_server, sandbox, sandbox_url, redis_sync):
    stable = {
        "url": f"{sandbox_url}/cgi-bin/stable_token",
        "method": "POST",
        "json": {"grant_type": "client_credential", "appid": "wx123", "secret": "sandbox-appsecret-0123456789"},
    }
    sandbox.expires_in = 20
    srv = await start_server(make_config(sources={"access_token": stable}, refresh={"interval": 0.2, "ahead": 19.5, "backoff_max": 2}))
    sandbox.inject("/cgi-bin/stable_token", "busy", times=2)
    redis_sync.hset("access_token:meta", "same_until", 0)  # due again now
    assert await wait_until(lambda: sandbox.calls["/cgi-bin/stable_token"] == 4, timeout=6)  # 2 busy, then the same value
    assert await wait_until(lambda: redis_sync.get("access_token:failures") is None, timeout=2)
    assert srv.refresher.states["access_token"].failures == 0


# --- the fourth review's findings ----------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_spent_forced_quota_of_a_stable_token_does_not_stop_ordinary_refreshes(make_config, start_server, call, sandbox, sandbox_url, redis_sync):
    sandbox.expires_in = 20
    stable = {
        "url": f"{sandbox_url}/cgi-bin/stable_token",
        "method": "POST",
        "json": {"grant_type": "client_credential", "appid": "wx123", "secret": "sandbox-appsecret-0123456789", "force_refresh": False},
        "force": {"force_refresh": True},
    }
    srv = await start_server(make_config(sources={"access_token": stable}, refresh={"interval": 0.2, "ahead": 1, "force_min_interval": 0}))
    sandbox.inject("/cgi-bin/stable_token", "errcode", errcode=45009, errmsg="reach max api daily quota limit", times=1)
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503 and "forced refreshes are used up" in body["errmsg"]
    calls = sandbox.calls["/cgi-bin/stable_token"]
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503 and sandbox.calls["/cgi-bin/stable_token"] == calls  # no forced call until midnight
    assert redis_sync.get("access_token:blocked") is None
    assert srv.refresher.status()["access_token"]["state"] == "ok"
    status, _ = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200
    # Ordinary refreshes go on: the value falls due (ahead 1 s) and is renewed.
    redis_sync.pexpire("access_token", 1500)  # due in half a second
    assert await wait_until(lambda: sandbox.calls["/cgi-bin/stable_token"] > calls, timeout=5)


@pytest.mark.gen_test(timeout=20)
async def test_a_block_lifted_in_redis_is_lifted_in_every_instance(make_config, start_server, call, sandbox, redis_sync):
    cfg = make_config(refresh=dict(FAST, ahead=1, force_min_interval=0))
    a, b = await start_server(cfg), await start_server(cfg)
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9", times=1)
    status, _ = await call(a.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503
    assert await wait_until(lambda: b.refresher.status()["access_token"]["state"] == "blocked", timeout=3)
    await start_server(cfg)  # a restart elsewhere lifts the block (whitelist fixed), storing nothing new
    assert redis_sync.get("access_token:blocked") is None
    assert await wait_until(lambda: b.refresher.status()["access_token"]["state"] == "ok", timeout=3)
    assert await wait_until(lambda: a.refresher.status()["access_token"]["state"] == "ok", timeout=3)


@pytest.mark.gen_test
async def test_a_value_redis_has_a_newer_version_of_is_neither_put_back_nor_served(make_config, start_server, call, redis_sync):
    srv = await start_server(make_config())
    # Another instance stored a newer version, which has expired (or was rejected): WeChat
    # issued it after ours, so ours is dead too.
    redis_sync.hset("access_token:meta", "version", int(redis_sync.hget("access_token:meta", "version")) + 5)
    redis_sync.delete("access_token")
    # Changed by hand, nothing announced it: seen within refresh.read_max_age (1 s).
    assert await wait_until(lambda: not srv.refresher.states["access_token"].entry, 1.5)
    redis_sync.config_resetstat()
    for _ in range(5):
        status, _ = await call(srv.port, "/wechat/token", type="access_token")
        assert status == 503
    scripts = redis_sync.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert scripts == 0  # no put-back attempt (and re-read) on every request
    assert redis_sync.get("access_token") is None
