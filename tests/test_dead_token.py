"""Never serve a dead token: the situations an adversarial review found (issue 7, items 1-5, 7, 8).

Each test ends by asking the sandbox whether what the server serves is alive
(``Sandbox.token_status``: 0 = WeChat accepts it).  Redis is a redis-server of the test's
own (killed, restarted empty, or restarted from an old dump); clocks are stepped with
libfaketime in a server process of its own (its monotonic clock untouched).
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import time

import pytest
import redis
from helpers_procs import proc_config, wait_until

from server.embedded_redis import EmbeddedRedis, free_port
from server.sandbox import CALLBACK_IP_PATH, TOKEN_PATH

#: Debian's faketime package, wherever its architecture puts it
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), "")


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server on a fixed port with no persistence except an explicit SAVE: killed and
    started again it comes back empty, or with the data of the last SAVE (a rollback)."""
    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port(), persistent=False)
    server.start()
    yield server
    server.stop()


def kill(server: EmbeddedRedis) -> None:
    assert server.process is not None
    server.process.kill()
    server.process.wait()


def faked_clock(offset_file) -> dict[str, str]:
    """Environment for a process whose wall clock is shifted by the seconds in ``offset_file``
    (re-read on every call, so a test can step it), its monotonic clock left alone."""
    if not LIBFAKETIME or not os.path.exists(LIBFAKETIME):
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "NO_FAKE_STAT": "1",
    }


# --- item 1: Redis restarted empty, then another instance starts -----------------------------


@pytest.mark.gen_test(timeout=60)
async def test_an_emptied_redis_keeps_the_value_wechat_issued_last(token_servers, sandbox, sandbox_url, own_redis):
    # Instance A has rotated a few times (its value's version is 3 in the old Redis).  Redis
    # restarts empty and B starts: B fetches T_B, the newest token at WeChat, which kills
    # A's (overlap 1 s here).  A must not put its older value back over B's.
    sandbox.overlap = 1.0
    cfg = proc_config(own_redis.url, sandbox_url, redis={"socket_timeout": 0.5}, refresh={"force_min_interval": 0})
    a = token_servers(cfg, "a").start()
    await a.wait_ready()
    for _ in range(2):
        status, body = await a.get("/wechat/token/forcerefresh", type="access_token")
        assert status == 200, body
    held_by_a = await a.token()

    # A is paused (a long GC pause, a partition) while Redis restarts empty and B starts,
    # so that B fetches before A can put its value back.
    a.send(signal.SIGSTOP)
    try:
        kill(own_redis)
        own_redis.start()  # empty
        b = token_servers(cfg, "b").start()
        await b.wait_ready()
    finally:
        a.send(signal.SIGCONT)
    newest = sandbox.current_token()
    assert newest != held_by_a
    await wait_until(lambda: sandbox.token_status(held_by_a) != 0, 3, "WeChat to retire A's value")

    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    await asyncio.sleep(1.5)  # A's ticks and reads meet Redis again
    for srv in (a, b, a):
        served = await srv.token()
        assert served == newest, f"{srv.name} serves a value WeChat retired (put back over the newest)"
    assert r.get("access_token") == newest, "direct readers get a value WeChat retired"
    r.close()


# --- item 2: Redis comes back with older data while a fetch is in the air ---------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_fetch_in_the_air_survives_a_rollback_of_redis(start_server, make_config, call, sandbox, own_redis):
    sandbox.overlap = 1.0
    cfg = make_config(redis={"url": own_redis.url, "socket_timeout": 0.5}, refresh={"force_min_interval": 0, "timeout": 5})
    srv = await start_server(cfg)
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    r.save()  # the dump Redis will come back with: T0
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    t1 = body["access_token"]

    # The next fetch hangs 1.5 s at WeChat; meanwhile Redis restarts from the old dump.
    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    forced = asyncio.ensure_future(call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=t1))
    await asyncio.sleep(0.5)
    kill(own_redis)
    own_redis.start()
    assert r.get("access_token") not in (None, t1)  # T0, from the dump
    status, body = await forced
    assert status == 200, body
    t2 = body["access_token"]
    assert t2 == sandbox.current_token() and sandbox.token_status(t2) == 0, "the forced refresh answered a value WeChat retired"
    await wait_until(lambda: sandbox.token_status(t1) != 0, 3, "WeChat to retire T1")
    for _ in range(5):
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        assert status == 200 and sandbox.token_status(body["access_token"]) == 0, "a read got a value WeChat retired"
    assert r.get("access_token") == t2, "Redis kept the rolled-back value"
    assert sandbox.calls[TOKEN_PATH] == 3
    r.close()


# --- item 3: SIGTERM cancels a fetch ---------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_fetch_cancelled_by_sigterm_is_a_lost_answer(token_servers, sandbox, sandbox_url, redis_url):
    # refresh.timeout 20 s, shutdown_timeout 1 s: the shutdown cancels a call WeChat answers
    # later, with a token nobody receives (it retires the stored one: overlap 1 s here).
    sandbox.overlap = 1.0
    cfg = proc_config(redis_url, sandbox_url, server={"shutdown_timeout": 1}, refresh={"timeout": 20, "force_min_interval": 0})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    stored = await srv.token()
    sandbox.inject(TOKEN_PATH, "hang", delay=2.5)
    forced = asyncio.ensure_future(srv.get("/wechat/token/forcerefresh", type="access_token", old=stored))
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2, 5, "the forced call to reach WeChat")
    srv.send(signal.SIGTERM)
    assert await srv.wait_exit() == 0
    await forced
    await wait_until(lambda: sandbox.token_status(stored) != 0, 5, "WeChat to issue the lost token")

    srv.start()
    await srv.wait_ready()
    for _ in range(5):
        token = await srv.token()
        assert sandbox.token_status(token) == 0, "after the restart the server serves the token the lost answer retired"


# --- item 4: WeChat slower than refresh.timeout on the classic endpoint ----------------------


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_a_slow_wechat_does_not_leave_a_dead_token_served(start_server, make_config, call, sandbox):
    # Every token call takes 2.5 s at WeChat, which issues the token anyway; our timeout is
    # 1 s.  Each lost answer retires the token before it.  The server must converge on a
    # live token while WeChat stays slow, and stop serving the stored one once WeChat
    # rejects it.
    cfg = make_config(refresh={"interval": 0.5, "timeout": 1, "backoff_max": 2, "force_min_interval": 0})
    srv = await start_server(cfg)
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    first = body["access_token"]
    sandbox.inject(TOKEN_PATH, "hang", times=None, delay=2.5)
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=first)
    assert status == 503  # the first answer is lost

    dead_at: list[float] = []
    live_since: float | None = None
    started = time.monotonic()
    while time.monotonic() - started < 25:
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        now = time.monotonic() - started
        if status == 200 and sandbox.token_status(body["access_token"]) != 0:
            dead_at.append(now)
            live_since = None
        elif status == 200:
            live_since = now if live_since is None else live_since
        else:
            live_since = None
        await asyncio.sleep(0.1)
    assert live_since is not None and live_since < 20, f"never converged on a live token (dead reads at {dead_at[-3:]})"
    # Dead reads only in the window between a lost answer and WeChat's verdict on the
    # stored token (getcallbackip): a few seconds, not the whole slow phase.
    assert not dead_at or dead_at[-1] - dead_at[0] < 6, f"dead token served over {dead_at[-1] - dead_at[0]:.1f}s"
    assert sandbox.calls[CALLBACK_IP_PATH] >= 1, "the stored token was never checked with WeChat"
    assert sandbox.calls[TOKEN_PATH] <= 6, f"{sandbox.calls[TOKEN_PATH]} token calls to converge"
    # WeChat is still slow: the next rotation waits as long as the last answered call needed,
    # at once, instead of losing answers again.
    calls = sandbox.calls[TOKEN_PATH]
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=body["access_token"])
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0
    assert sandbox.calls[TOKEN_PATH] == calls + 1


# --- item 5: old = the current value rotates, even within force_min_interval ----------------


@pytest.mark.gen_test(timeout=30)
async def test_old_equal_to_current_rotates_once_within_the_minimum_interval(start_server, make_config, call, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 600}))
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    rejected = body["access_token"]
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=rejected)
    assert status == 200 and body["access_token"] != rejected, "a value the caller proved dead was returned again"
    fresh = body["access_token"]
    # The crowd that follows with the same rejected value is answered from the new one.
    answers = await asyncio.gather(*(call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=rejected) for _ in range(20)))
    assert {b["access_token"] for s, b in answers} == {fresh}
    # Without old, force_min_interval still holds.
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert body["access_token"] == fresh
    assert sandbox.calls[TOKEN_PATH] == 2


# --- item 7: durations on a monotonic clock, shared times on Redis's ------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_clock_stepped_back_does_not_stall_the_retry(token_servers, sandbox, sandbox_url, redis_url, tmp_path):
    offset = tmp_path / "clock"
    offset.write_text("+0\n")
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0, "backoff_max": 2})
    srv = token_servers(cfg, "skewed")
    srv.extra_env = faked_clock(offset)
    srv.start()
    await srv.wait_ready()
    first = await srv.token()
    sandbox.inject(TOKEN_PATH, "busy")
    status, _ = await srv.get("/wechat/token/forcerefresh", type="access_token", old=first)
    assert status == 503  # busy: backing off for 0.5-1 s
    offset.write_text("-60\n")  # the host's clock steps back a minute
    await asyncio.sleep(2.5)  # past any backoff after one failure (backoff_max 2)
    status, body = await srv.get("/wechat/token/forcerefresh", type="access_token", old=first)
    assert status == 200, f"still backing off a minute after a 1 s backoff: {body}"
    assert body["access_token"] == sandbox.current_token() != first
    assert sandbox.calls[TOKEN_PATH] == 3


@pytest.mark.gen_test(timeout=60)
async def test_force_min_interval_is_measured_on_the_shared_clock(token_servers, sandbox, sandbox_url, redis_url, tmp_path):
    # B's clock runs 120 s behind A's.  A fetched; 3 s later (force_min_interval 2 s) a
    # forced refresh through B must fetch, not answer A's value as "just fetched".
    offset = tmp_path / "clock"
    offset.write_text("-120\n")
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 2})
    a = token_servers(cfg, "a").start()
    await a.wait_ready()
    b = token_servers(cfg, "b")
    b.extra_env = faked_clock(offset)
    b.start()
    await b.wait_ready()
    assert sandbox.calls[TOKEN_PATH] == 1
    await asyncio.sleep(3)
    status, body = await b.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    assert sandbox.calls[TOKEN_PATH] == 2, "B took A's 3 s old value for one fetched just now"
    assert body["access_token"] == sandbox.current_token()


# --- item 8: every value held in memory goes back into an emptied Redis ---------------------


@pytest.mark.gen_test(timeout=30)
async def test_an_emptied_redis_gets_every_value_back_without_a_request(start_server, make_config, sandbox, own_redis):
    cfg = make_config(redis={"url": own_redis.url, "socket_timeout": 0.5})
    await start_server(cfg)
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    token, ticket = r.get("access_token"), r.get("ticket")
    assert token and ticket
    calls = dict(sandbox.calls)
    kill(own_redis)
    own_redis.start()
    # No request reaches the server: direct readers alone depend on the put-back.
    await wait_until(lambda: r.get("access_token") == token and r.get("ticket") == ticket, 4, "both values back in Redis")
    assert dict(sandbox.calls) == calls
    r.close()


# --- found by review: the drop, and a life that came back longer -----------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_fetch_after_a_dropped_token_lands(start_server, make_config, call, sandbox):
    # Two lost answers: the third attempt checks the stored token, drops it (WeChat rejects
    # it), and its own fetch must then be stored, not fenced out by the drop.
    cfg = make_config(refresh={"interval": 0.5, "timeout": 1, "backoff_max": 2, "force_min_interval": 0})
    srv = await start_server(cfg)
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    first = body["access_token"]
    sandbox.inject(TOKEN_PATH, "hang", times=2, delay=2.5)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=first)
    assert status == 503
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 4, 20, "the call after the check")
    await asyncio.sleep(1.0)
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == sandbox.current_token(), f"{status} {body}"
    assert sandbox.calls[CALLBACK_IP_PATH] >= 1
    assert sandbox.calls[TOKEN_PATH] == 4, "the fetch after the drop was discarded and made again"


@pytest.mark.gen_test(timeout=60)
async def test_a_rolled_back_redis_does_not_give_a_capped_token_its_life_back(start_server, make_config, call, sandbox, own_redis):
    cfg = make_config(redis={"url": own_redis.url, "socket_timeout": 0.5}, refresh={"timeout": 1, "backoff_max": 60, "force_min_interval": 0})
    srv = await start_server(cfg)
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    stored = r.get("access_token")
    r.save()  # the dump holds the stored token with its whole life
    sandbox.inject(TOKEN_PATH, "hang", delay=2.5)
    sandbox.inject(TOKEN_PATH, "busy", times=None)  # then WeChat is busy: the capped token stays stored
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=stored)
    assert status == 503  # the answer is lost: the stored token may now be WeChat's previous one
    assert r.pttl("access_token") <= 300_000
    kill(own_redis)
    own_redis.start()  # from the dump: the same version, with its old life
    assert r.pttl("access_token") > 300_000
    await wait_until(lambda: 0 < r.pttl("access_token") <= 300_000, 4, "the life to be cut back in Redis")
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == stored and body["expires_in"] <= 300
    sandbox.clear_faults()
    r.close()


# --- found by review: a value the endpoint did not rotate keeps (or gets back) its life ----------


@pytest.mark.gen_test(timeout=30)
async def test_a_lost_forced_stable_call_that_issued_nothing_never_leaves_a_503(start_server, make_config, call, sandbox, sandbox_url):
    # A forced stable_token call answered 502 (WeChat issued nothing): the stored token's
    # life is cut to the overlap, as a lost answer must.  The next ordinary call gets the
    # same token with its real life from WeChat: the life comes back, no read gets 503.
    from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, STABLE_TOKEN_PATH

    account = {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "api_base": sandbox_url}
    cfg = make_config(sources={}, accounts={"main": account},
                      refresh={"interval": 0.2, "ahead": 1, "overlap": 2, "force_min_interval": 0, "backoff_max": 1})
    srv = await start_server(cfg)
    stored = (await call(srv.port, "/wechat/token", type="access_token"))[1]["access_token"]
    sandbox.inject(STABLE_TOKEN_PATH, "http_error", status=502)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503
    started = time.monotonic()
    while time.monotonic() - started < 4:
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        assert status == 200, f"a read got {status} while WeChat still accepts the token"
        assert body["access_token"] == stored and sandbox.token_status(stored) == 0
        await asyncio.sleep(0.1)
    assert body["expires_in"] > 1000, "the life cut after the lost answer never came back"


@pytest.mark.gen_test(timeout=30)
async def test_a_lost_answer_from_wecom_gettoken_does_not_cut_the_token(start_server, make_config, call, sandbox, sandbox_url):
    # WeCom's gettoken answers the token it holds: a lost answer retires nothing.
    from server.sandbox import CORP_TOKEN_PATH, DEFAULT_AGENTID, DEFAULT_CORPID, DEFAULT_CORPSECRET

    account = {"kind": "wecom", "corpid": DEFAULT_CORPID, "corpsecret": DEFAULT_CORPSECRET, "agentid": int(DEFAULT_AGENTID), "api_base": sandbox_url}
    srv = await start_server(make_config(sources={}, accounts={"corp": account}, refresh={"timeout": 0.5, "force_min_interval": 0}))
    sandbox.inject(CORP_TOKEN_PATH, "hang", delay=1.0)
    status, _ = await call(srv.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["expires_in"] > 1000
