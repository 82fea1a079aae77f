"""Reads served from memory, kept coherent with Redis by the events channel and a bounded
staleness (``refresh.read_max_age``, 1 s by default; server.mirror).

Real redis-server, real processes, real HTTP.  Redis's own command statistics show whether a
read made a round trip; the sandbox counts upstream calls.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers_procs import proc_config
from test_events import Listener

from server.config import RedisConfig
from server.redis_client import build_redis
from server.sandbox import TOKEN_PATH
from server.store import Entry, Store


def redis_reads(redis_sync) -> int:
    """Commands a value read sends (the store's read is one MULTI/EXEC), so far."""
    stats = redis_sync.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("exec", "get"))


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("read_max_age", [1.0, 0.0])
async def test_reads_come_from_memory_without_a_redis_round_trip(make_config, start_server, call, redis_sync, read_max_age):
    srv = await start_server(make_config(refresh={"read_max_age": read_max_age}))
    await call(srv.port, "/wechat/token", type="access_token")
    before = redis_reads(redis_sync)
    for _ in range(300):
        status, _ = await call(srv.port, "/wechat/token", type="access_token")
        assert status == 200
    used = redis_reads(redis_sync) - before
    if read_max_age:
        assert used < 30, f"{used} Redis reads for 300 requests"  # the check every second, not one per read
    else:
        assert used >= 300  # read_max_age: 0 asks Redis every time


@pytest.mark.gen_test(timeout=60)
async def test_no_instance_serves_a_superseded_value_for_longer_than_the_bound(token_servers, sandbox, sandbox_url, redis_url):
    # Rotations come from forced refreshes on each instance in turn (ticks are a minute
    # apart, so they teach the others nothing): only the events tell the other two.
    cfg = proc_config(redis_url, sandbox_url, refresh={"interval": 60, "force_min_interval": 0})
    async with Listener(redis_url) as listener:
        procs = [token_servers(cfg, f"ts{i}").start() for i in range(3)]
        await asyncio.gather(*(p.wait_ready() for p in procs))
        served: list[tuple[float, str]] = []  # (monotonic time the answer arrived, value)
        for i in range(6):
            current = await procs[i % 3].token()
            status, _ = await procs[i % 3].get("/wechat/token/forcerefresh", type="access_token", old=current)
            assert status == 200
            end = time.monotonic() + 1.2
            while time.monotonic() < end:
                values = await asyncio.gather(*(p.token() for p in procs))
                now = time.monotonic()
                served += [(now, v) for v in values]
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)

    # Event i announced the i-th value stored; that value was superseded when event i+1
    # arrived.  The values served are the last ones stored (the first may have been
    # superseded before the polling began).
    events = listener.of("access_token")
    history = list(dict.fromkeys(v for _, v in served))
    assert len(events) == 7 and len(history) in (6, 7)
    offset = len(events) - len(history)
    superseded_at = {value: events[offset + i + 1]["at"] for i, value in enumerate(history[:-1])}
    late = [t - superseded_at[v] for t, v in served if v in superseded_at and t > superseded_at[v]]
    # A superseded value may still be answered by a request already under way, but the
    # bound is read_max_age (1 s) and, with the events, milliseconds: without them each
    # instance would lag up to the check every second (twelve times here).
    assert not late or max(late) < 0.5, f"served a superseded value {max(late):.2f}s after its successor"
    assert sandbox.calls[TOKEN_PATH] == 7


@pytest.mark.gen_test(timeout=30)
async def test_a_rotation_whose_message_was_lost_is_seen_within_read_max_age(make_config, start_server, call, sandbox, redis_url, redis_sync):
    srv = await start_server(make_config())
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    old = body["access_token"]
    # Another instance stores a new value, and its message never arrives (a Redis that
    # dropped it, a subscription that was down for that moment): a channel nobody hears.
    other = Store(build_redis(RedisConfig(url=redis_url)), "")
    other.channel = "a channel nobody subscribes to"
    lease = await other.acquire("access_token", 10)
    new = Entry("a-value-fetched-elsewhere-" + "x" * 40, time.monotonic() + 3000, time.monotonic(), lease.version, "access_token")
    written = time.monotonic()
    assert await other.write("access_token", new)
    await other.release("access_token", lease.token)
    await other.close()
    while True:
        status, body = await call(srv.port, "/wechat/token", type="access_token")
        if body["access_token"] != old:
            break
        assert time.monotonic() - written < 1.5, "the old value was served past read_max_age (1 s)"
        await asyncio.sleep(0.02)
    assert body["access_token"] == new.value
    assert sandbox.calls[TOKEN_PATH] == 1


@pytest.mark.gen_test(timeout=60)
async def test_old_gets_the_new_value_at_once_from_any_instance(token_servers, make_config, start_server, call, sandbox, sandbox_url, redis_url):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    proc = token_servers(proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0}), "other").start()
    await proc.wait_ready()
    for _ in range(5):
        _, body = await call(srv.port, "/wechat/token", type="access_token")
        old = body["access_token"]
        status, body = await proc.get("/wechat/token/forcerefresh", type="access_token", old=old)  # WeChat said 40001
        assert status == 200 and body["access_token"] != old
        new = body["access_token"]
        # at once, on the other instance, before its event may have arrived
        status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", old=old)
        assert status == 200 and body["access_token"] == new
    assert sandbox.calls[TOKEN_PATH] == 1 + 5


@pytest.mark.gen_test(timeout=30)
async def test_a_crowd_of_reads_costs_redis_a_handful_of_commands(make_config, start_server, call, redis_sync):
    srv = await start_server(make_config())
    await call(srv.port, "/wechat/token", type="access_token")
    await asyncio.sleep(1.1)  # the failed-authentication count read for 127.0.0.1 is now stale
    redis_sync.config_resetstat()
    answers = await asyncio.gather(*(call(srv.port, "/wechat/token", type="access_token") for _ in range(100)))
    assert {status for status, _ in answers} == {200}
    stats = redis_sync.info("commandstats")
    # the limit's count, read once for the crowd, and the check every second; not one per request
    setup = ("cmdstat_config", "cmdstat_info", "cmdstat_client", "cmdstat_hello")  # ours, and new connections' handshakes
    commands = sum(v["calls"] for k, v in stats.items() if k not in setup)
    assert commands < 20, stats
