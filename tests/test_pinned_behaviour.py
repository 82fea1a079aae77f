"""Behaviours a mutation run showed no test pinned down (issue 7, section 4).

Each test here failed on one deliberate bug (the mutant named in its docstring) and
passes without it.  They observe what a user or operator would: HTTP answers, the
sandbox's call counts and timings, the documented Redis keys, and the commands Redis
received (MONITOR); never the refresher's private state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from helpers_procs import sandbox_sources, wait_until

from server.config import Config
from server.embedded_redis import EmbeddedRedis
from server.sandbox import TOKEN_PATH, Sandbox
from server.sandbox import make_app as make_sandbox_app

SHOP = {"name": "shop", "secret": "shop-client-secret-0123456789", "sources": ["access_token", "ticket"]}
SHOP_AUTH = {"X-Token-Secret": SHOP["secret"]}


@pytest.fixture
def own_redis(tmp_path: Any) -> Any:
    """A redis-server of the test's own, so the test can stop it (the session's must live on)."""
    server = EmbeddedRedis(str(tmp_path / "own-redis"), persistent=False)
    server.start()
    yield server
    server.stop()


# --- Redis down and WeChat failing: an expired value is never served ------------------------


@pytest.mark.gen_test(timeout=30)
async def test_without_redis_an_expired_value_is_a_503_not_expires_in_zero(make_config: Callable[..., Config], start_server: Any, call: Any, sandbox: Sandbox, own_redis: EmbeddedRedis) -> None:
    """Mutant: Mirror.current served memory's value without checking its remaining life."""
    sandbox.expires_in = 3  # seconds
    started = time.monotonic()
    srv = await start_server(make_config(redis={"url": own_redis.url, "socket_timeout": 0.5},
                                         refresh={"interval": 0.2, "ahead": 1, "timeout": 0.5, "backoff_max": 5}))
    sandbox.inject(TOKEN_PATH, "busy", times=None)  # WeChat fails from now on
    own_redis.stop()  # and Redis is gone
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["expires_in"] >= 1  # memory's value, still valid
    await asyncio.sleep(max(0.0, started + 3.0 + 0.8 - time.monotonic()))  # past its expiry
    assert sandbox.token_status(body["access_token"]) != 0  # WeChat no longer accepts it
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 503, f"an expired value was served: {status}, expires_in {body.get('expires_in')}"
    assert body == {"errcode": 503, "errmsg": "no valid value: upstream is failing"}


# --- errcodes from a token endpoint ------------------------------------------------------------


@pytest.mark.parametrize("errcode", [40001, 40014, 42001])
@pytest.mark.gen_test(timeout=15)
async def test_token_errcodes_from_the_token_endpoint_are_fatal(errcode: int, make_config: Callable[..., Config], start_server: Any, call: Any, sandbox: Sandbox, redis_sync: Any) -> None:
    """Mutant: upstream.classify answered STALE_TOKEN for these codes whatever ``uses_token``.

    From /cgi-bin/token itself they mean a wrong AppSecret: one call, then the source is
    blocked (in every instance, through Redis); no retry, no "refresh the token once"."""
    sandbox.inject(TOKEN_PATH, "errcode", errcode=errcode, errmsg="invalid credential, access_token is invalid or not latest", times=None)
    srv = await start_server(make_config(refresh={"interval": 0.2, "ahead": 1, "timeout": 2, "backoff_max": 5}))
    await asyncio.sleep(1.5)  # seven ticks, and the time of any backed-off retry
    assert sandbox.calls[TOKEN_PATH] == 1
    status, body = await call(srv.port, "/status")
    assert status == 200 and body["sources"]["access_token"]["state"] == "blocked"
    blocked = redis_sync.get("access_token:blocked")
    assert blocked is not None and str(errcode) in blocked
    assert redis_sync.get("access_token:backoff") is None  # not a transient failure
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 503


# --- 45011: a minute, not half a second ------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_45011_waits_a_minute_before_the_next_call(make_config: Callable[..., Config], start_server: Any, call: Any, sandbox: Sandbox, redis_sync: Any) -> None:
    """Mutants: 45011 missing from upstream.RETRY_AFTER; state.backoff_floor ignoring ``retry_after``.

    Either way the retry came after 0.5-1 s like any transient failure."""
    sandbox.inject(TOKEN_PATH, "errcode", errcode=45011, errmsg="api minute-quota reach limit", times=None)
    srv = await start_server(make_config(clients=[SHOP], refresh={"interval": 0.2, "ahead": 1, "timeout": 2, "backoff_max": 300}))
    assert sandbox.calls[TOKEN_PATH] == 1
    await asyncio.sleep(3.0)  # fifteen ticks; an ordinary first retry comes within 1 s
    assert sandbox.calls[TOKEN_PATH] == 1
    # Every instance is told to wait the minute (the shared backoff of the README).
    assert redis_sync.pttl("access_token:backoff") >= 50_000
    # A business server's forced refresh makes no call either, and is told when to come back.
    from tornado.httpclient import AsyncHTTPClient

    client = AsyncHTTPClient(force_instance=True)
    try:
        resp = await client.fetch(f"http://127.0.0.1:{srv.port}/wechat/token/forcerefresh?type=access_token",
                                  headers=SHOP_AUTH, raise_error=False)
    finally:
        client.close()
    assert resp.code == 503 and b"backing off" in resp.body
    assert 50 <= int(resp.headers["Retry-After"]) <= 121
    assert sandbox.calls[TOKEN_PATH] == 1


# --- jitter -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_retries_after_failures_are_jittered(make_config: Callable[..., Config], start_server: Any, secret_watch: Any) -> None:
    """Mutant: the refresher waited exactly the backoff floor (no random.uniform(floor, 2*floor)).

    Six independent servers (own prefix, own WeChat each) fail on every call.  Each wait
    must lie in [floor, 2*floor] (0.5-1 s, then 1-2 s with backoff_max 2), spread over it:
    without jitter every wait is the floor plus the loop's latency, and instances that
    failed together retry together.  With jitter, the chance that fewer than 3 of 12 or
    more waits exceed the floor by a quarter of it is below 1e-4."""
    from tests.conftest import serve_app

    boxes: list[Sandbox] = []
    servers = []
    ports: list[int] = []
    for _ in range(6):
        sb = Sandbox()
        secret_watch.sandboxes.append(sb)
        sb.inject(TOKEN_PATH, "busy", times=None)
        http, port = serve_app(make_sandbox_app(sb))
        servers.append(http)
        ports.append(port)
        boxes.append(sb)
    seen: list[list[float]] = [[] for _ in boxes]

    async def note_calls() -> None:
        while True:
            now = time.monotonic()
            for sb, times in zip(boxes, seen, strict=True):
                while len(times) < sb.calls[TOKEN_PATH]:
                    times.append(now)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(note_calls())
    try:
        for i, port in enumerate(ports):
            source = sandbox_sources(f"http://127.0.0.1:{port}")["access_token"]
            # interval 60: no tick during the test, every call is a backoff retry.
            await start_server(make_config(redis={"prefix": f"jitter{i}:"}, sources={"access_token": source},
                                           refresh={"interval": 60, "ahead": 600, "timeout": 2, "backoff_max": 2}))
        await asyncio.sleep(4.5)
    finally:
        watcher.cancel()
        for http in servers:
            http.stop()
    floors = [0.5, 1.0, 1.0, 1.0, 1.0]  # backoff_max 2: 0.5, then 1 (the cap's half)
    waits: list[tuple[float, float]] = []
    for times in seen:
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(gaps) >= 2, f"too few retries: {seen}"
        waits += list(zip(floors, gaps, strict=False))
    for floor, gap in waits:
        assert floor - 0.05 <= gap <= 2 * floor + 0.6, f"a wait of {gap:.2f}s after a floor of {floor}s: {waits}"
    jittered = [gap for floor, gap in waits if gap > floor * 1.25]
    assert len(jittered) >= 3, f"retries in lockstep (no jitter): waits {[(f, round(g, 2)) for f, g in waits]}"


# --- single flight in one process ---------------------------------------------------------------


async def _lock_attempts(redis_url: str, key: str, crowd: Callable[[], Any]) -> int:
    """How many ``SET key ... NX`` Redis received while ``crowd()`` ran (Redis's own MONITOR)."""
    monitor_client = aioredis.Redis.from_url(redis_url)
    marker = f"end-of-crowd-{time.monotonic_ns()}"
    attempts = 0
    try:
        async with monitor_client.monitor() as m:
            await crowd()
            # Everything sent before the marker was monitored before it.
            with redis.Redis.from_url(redis_url) as plain:
                plain.get(marker)
            while True:
                info = await asyncio.wait_for(m.next_command(), 5)
                words = info["command"].split(" ")
                if words[:2] == ["GET", marker]:
                    return attempts
                if words[0].upper() == "SET" and words[1:2] == [key] and "NX" in (w.upper() for w in words):
                    attempts += 1
    finally:
        await monitor_client.aclose()


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_forced_refreshes_take_the_lock_once(make_config: Callable[..., Config], start_server: Any, call: Any, sandbox: Sandbox, redis_url: str) -> None:
    """Mutant: single flight off (each forced refresh its own flight).

    The Redis lock then still keeps the upstream calls to one, so only Redis sees the
    difference: one lock attempt per request instead of one for the crowd."""
    srv = await start_server(make_config(server={"forcerefresh_per_minute": 100000}, refresh={"force_min_interval": 0}))
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)  # the flight stays open while the crowd arrives
    results: list[tuple[int, Any]] = []

    async def crowd() -> None:
        results.extend(await asyncio.gather(*(call(srv.port, "/wechat/token/forcerefresh", type="access_token") for _ in range(20))))

    attempts = await _lock_attempts(redis_url, "access_token:lock", crowd)
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert sandbox.calls[TOKEN_PATH] == 2  # start + one
    assert attempts == 1, f"{attempts} lock attempts for one crowd in one process"


# --- without Redis: refresh at the last moment only --------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_without_redis_a_value_is_refreshed_only_when_about_to_expire(make_config: Callable[..., Config], start_server: Any, call: Any, sandbox: Sandbox, own_redis: EmbeddedRedis) -> None:
    """Mutant: without Redis, refreshing as soon as fewer than ``ahead`` seconds remain.

    Without the lock, two instances each doing so would each rotate the token; so memory
    refreshes only within ``interval + timeout`` (0.7 s here) of the expiry."""
    sandbox.expires_in = 8  # ahead 6: due 2 s after the fetch, expiring 8 s after it
    started = time.monotonic()
    srv = await start_server(make_config(redis={"url": own_redis.url, "socket_timeout": 0.5},
                                         refresh={"interval": 0.2, "ahead": 6, "timeout": 0.5}))
    assert sandbox.calls[TOKEN_PATH] == 1
    _, first = await call(srv.port, "/wechat/token", type="access_token")
    own_redis.stop()
    await asyncio.sleep(max(0.0, started + 5.0 - time.monotonic()))  # due for 3 s, 3 s of life left
    assert sandbox.calls[TOKEN_PATH] == 1, "refreshed early without the lock"
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == first["access_token"]
    # Refreshed in memory before it expires (ticks every 0.2 s in the last 0.7 s).
    assert await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2, 6, "the refresh near expiry")
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] != first["access_token"]
    assert sandbox.token_status(body["access_token"]) == 0
