"""Several token_server.py processes sharing one Redis: one upstream call per rotation.

Real processes (``python token_server.py -c cfg.yaml --port N``), one real redis-server,
the sandbox served in-process on the test's loop as WeChat; upstream calls are counted
at the sandbox.  Each process's log is checked for secrets by the ``token_servers``
fixture.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers_procs import proc_config, wait_until
from tornado.httpclient import AsyncHTTPClient

from server.sandbox import TICKET_PATH, TOKEN_PATH


async def all_ready(procs):
    await asyncio.gather(*(p.wait_ready() for p in procs))


def no_lock(redis_sync):
    """No process holds a refresh lock, hence none has a fetch in flight."""
    return not redis_sync.exists("access_token:lock", "ticket:lock")


@pytest.mark.gen_test(timeout=60)
async def test_three_processes_start_with_one_fetch_and_restart_with_none(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    # The first fetch hangs 1.5 s, so the other two processes surely run their first
    # pass while the winner holds the lock: each must wait for its value, not call.
    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    cfg = proc_config(redis_url, sandbox_url)
    procs = [token_servers(cfg, f"ts{i}").start() for i in range(3)]
    await all_ready(procs)
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)

    token, ticket = redis_sync.get("access_token"), redis_sync.get("ticket")
    assert token == sandbox.current_token()
    for p in procs:
        assert await p.token() == token
        assert await p.token("ticket") == ticket

    await asyncio.sleep(1.2)  # a few ticks of every process: values are fresh, nothing to fetch
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)

    assert await asyncio.gather(*(p.stop() for p in procs)) == [0, 0, 0]
    for p in procs:
        p.start()
    await all_ready(procs)
    await asyncio.sleep(1.0)
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1), "a restart fetched instead of reusing Redis's values"
    for p in procs:
        assert await p.token() == token
        assert await p.token("ticket") == ticket
    assert sandbox.token_status(token) == 0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_one_upstream_call_per_rotation_across_processes(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    sandbox.expires_in = 6  # seconds; with ahead 3 a rotation about every 3 s
    # Every token call takes 0.8 s, longer than a tick (0.5 s): the other processes find
    # the value due while the winner is still fetching, and must wait for it.
    sandbox.inject(TOKEN_PATH, "hang", times=None, delay=0.8)
    cfg = proc_config(redis_url, sandbox_url, refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000})
    procs = [token_servers(cfg, f"ts{i}").start() for i in range(3)]
    await all_ready(procs)

    seen: dict[str, list[tuple[str, float]]] = {"access_token": [], "ticket": []}

    def watch() -> None:
        for key, values in seen.items():
            v = redis_sync.get(key)
            if v is not None and (not values or values[-1][0] != v):
                values.append((v, time.monotonic()))

    async def all_serve_redis_value() -> bool:
        # Every process serves what Redis holds (retried when a rotation lands mid-check).
        before = redis_sync.get("access_token")
        served = [await p.token() for p in procs]
        if redis_sync.get("access_token") != before:
            return False
        assert served == [before] * 3, "a process serves another value than Redis holds"
        assert sandbox.token_status(before) == 0
        return True

    end = time.monotonic() + 8.5  # a bit more than two rotations
    checks = 0
    while time.monotonic() < end:
        watch()
        if int(time.monotonic() * 2) % 2 == 0 and await all_serve_redis_value():
            checks += 1
        await asyncio.sleep(0.05)
    await wait_until(lambda: no_lock(redis_sync), 5, "no fetch in flight")
    watch()

    tokens, tickets = seen["access_token"], seen["ticket"]
    assert len(tokens) >= 3, f"expected at least two rotations in 8.5 s, saw {len(tokens)} values"
    assert sandbox.calls[TOKEN_PATH] == len(tokens), "upstream /cgi-bin/token calls != rotations seen in Redis"
    assert sandbox.calls[TICKET_PATH] == len(tickets), "upstream ticket calls != ticket rotations seen in Redis"
    assert tokens[-1][0] == sandbox.current_token()
    gaps = [b[1] - a[1] for a, b in zip(tokens, tokens[1:], strict=False)]
    assert min(gaps) > 2.0, f"rotations closer than life - ahead allows: {gaps}"
    assert checks >= 5
    assert await all_serve_redis_value() or await all_serve_redis_value()


async def storm(procs, n, client, **params):
    """``n`` concurrent forced refreshes, alternating over ``procs``: [(status, body)]."""
    return await asyncio.gather(
        *(procs[i % len(procs)].get("/wechat/token/forcerefresh", client=client, timeout=30, type="access_token", **params) for i in range(n))
    )


def storm_config(redis_url, sandbox_url, force_min_interval):
    return proc_config(
        redis_url,
        sandbox_url,
        # server.forcerefresh_per_minute is the per-client rate limit; the storm test
        # measures upstream calls, not that limit, so it is set out of the way here.
        server={"forcerefresh_per_minute": 100000},
        refresh={"force_min_interval": force_min_interval},
    )


@pytest.mark.gen_test(timeout=60)
async def test_storm_without_old_makes_one_call_and_honours_force_min_interval(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    interval = 3.0
    cfg = storm_config(redis_url, sandbox_url, interval)
    procs = [token_servers(cfg, f"ts{i}").start() for i in range(2)]
    await all_ready(procs)
    first = redis_sync.get("access_token")
    assert sandbox.calls[TOKEN_PATH] == 1

    # Within force_min_interval of the fetch a forced refresh returns that fetch's value.
    for p in procs:
        status, body = await p.get("/wechat/token/forcerefresh", type="access_token")
        assert status == 200, body
        assert body["access_token"] == first
    assert sandbox.calls[TOKEN_PATH] == 1, "a forced refresh within refresh.force_min_interval called upstream"

    fetched_at = float(redis_sync.hget("access_token:meta", "fetched_at"))
    await wait_until(lambda: time.time() > fetched_at + interval + 0.1, interval + 2, "force_min_interval to pass")

    client = AsyncHTTPClient(force_instance=True, max_clients=500)
    try:
        started = time.monotonic()
        answers = await storm(procs, 500, client)
        took = time.monotonic() - started
    finally:
        client.close()
    new = redis_sync.get("access_token")
    assert sorted({s for s, _ in answers}) == [200], [a for a in answers if a[0] != 200][:3]
    assert sandbox.calls[TOKEN_PATH] == 2, f"500 forced refreshes made {sandbox.calls[TOKEN_PATH] - 1} upstream calls"
    assert new != first and new == sandbox.current_token()
    assert {b["access_token"] for _, b in answers} == {new}
    # Requests still arriving force_min_interval after the new fetch would rightly fetch again.
    assert took < interval, f"the storm took {took:.1f}s, longer than force_min_interval: the test needs a larger one"


@pytest.mark.gen_test(timeout=60)
async def test_storm_with_old_makes_one_call(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    # force_min_interval 0: only `old` (and the single flight/lock) stands between the crowd
    # and a call per request.
    cfg = storm_config(redis_url, sandbox_url, 0)
    procs = [token_servers(cfg, f"ts{i}").start() for i in range(2)]
    await all_ready(procs)
    first = redis_sync.get("access_token")

    client = AsyncHTTPClient(force_instance=True, max_clients=500)
    try:
        answers = await storm(procs, 500, client, old=first)
        new = redis_sync.get("access_token")
        assert sorted({s for s, _ in answers}) == [200], [a for a in answers if a[0] != 200][:3]
        assert sandbox.calls[TOKEN_PATH] == 2, f"500 forced refreshes with old= made {sandbox.calls[TOKEN_PATH] - 1} upstream calls"
        assert new != first and new == sandbox.current_token()
        assert {b["access_token"] for _, b in answers} == {new}

        # The same crowd again, still reporting the rotated-out value: nothing to fetch.
        answers = await storm(procs, 500, client, old=first)
    finally:
        client.close()
    assert sandbox.calls[TOKEN_PATH] == 2, "forced refreshes with an already rotated-out old called upstream"
    assert {(s, b["access_token"]) for s, b in answers} == {(200, new)}


@pytest.mark.gen_test(timeout=60)
async def test_slow_fetch_whose_lock_expired_cannot_overwrite_a_newer_value(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0, "timeout": 3})
    a, b = token_servers(cfg, "a").start(), token_servers(cfg, "b").start()
    await all_ready([a, b])
    first = redis_sync.get("access_token")
    v1 = int(redis_sync.hget("access_token:meta", "version"))

    # A's forced refresh takes the lock and its upstream call hangs 1.5 s.
    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    slow = asyncio.ensure_future(a.get("/wechat/token/forcerefresh", type="access_token"))
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2 and redis_sync.exists("access_token:lock"), 5, "A's fetch to start")

    # A's lease runs out while it still waits for WeChat: what a holder stalled past its
    # lease (GC, VM pause) sees.  The lease itself (2 * timeout + 5 s, renewed before a second call) outlives any call.
    redis_sync.pexpire("access_token:lock", 1)
    await wait_until(lambda: not redis_sync.exists("access_token:lock"), 2, "the lease to expire")
    status, body = await b.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200
    newer = body["access_token"]
    assert newer != first and redis_sync.get("access_token") == newer
    v2 = int(redis_sync.hget("access_token:meta", "version"))
    assert v2 > v1
    # A third holder takes the lock before A's slow fetch ends: A must not delete it.
    redis_sync.set("access_token:lock", "someone-else", px=20000)

    status, body = await slow
    assert sandbox.calls[TOKEN_PATH] == 3
    assert status == 200
    assert sandbox.current_token() not in (first, newer), "the slow fetch did not complete upstream"
    assert redis_sync.get("access_token") == newer, "the slow, older fetch overwrote the newer value"
    assert int(redis_sync.hget("access_token:meta", "version")) == v2
    assert body["access_token"] == newer, "the fenced-out process answered with the value it failed to store"
    assert sandbox.token_status(newer) == 0
    assert redis_sync.get("access_token:lock") == "someone-else", "a process released a lock it no longer held"
    redis_sync.delete("access_token:lock")
    assert await a.token() == newer and await b.token() == newer
