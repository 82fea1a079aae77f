"""Redis outages under a running token_server.py process.

A redis-server of the test's own on a fixed port, one real server process, the sandbox
in-process as WeChat.  Redis is killed (SIGKILL) and restarted empty, killed and
restarted with its old data, or hung (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis
from helpers_procs import cpu_seconds, proc_config, wait_until

from server.embedded_redis import EmbeddedRedis, free_port
from server.sandbox import TOKEN_PATH


def _own_redis(tmp_path, persistent: bool):
    """A redis-server of the test's own (on a fixed port, so it can be killed and restarted)."""
    server = EmbeddedRedis(str(tmp_path / ("aof-redis" if persistent else "redis")), port=free_port(), persistent=persistent)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    yield from _own_redis(tmp_path, persistent=False)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_redis_killed_then_restarted_empty(token_servers, sandbox, sandbox_url, own_redis, tmp_path):
    sandbox.expires_in = 6  # seconds; ahead 3: a rotation about every 3 s
    cfg = proc_config(own_redis.url, sandbox_url, redis={"socket_timeout": 0.5},
                      refresh={"interval": 0.5, "ahead": 3, "force_min_interval": 0})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    first = r.get("access_token")
    assert first == sandbox.current_token() and sandbox.calls[TOKEN_PATH] == 1
    fetched_first = time.monotonic()

    # --- Redis dies ---------------------------------------------------------------------
    own_redis.process.kill()
    own_redis.process.wait()
    lines_before = len(srv.log().splitlines())
    cpu_before, wall_before = cpu_seconds(srv.pid), time.monotonic()
    served: list[str] = []
    latencies: list[float] = []
    calls_at_rotation = 0

    async def read_once() -> None:
        started = time.monotonic()
        status, body = await srv.get("/wechat/token", type="access_token", timeout=5)
        latencies.append(time.monotonic() - started)
        assert status == 200, f"read during the outage -> {status} {body}"
        token = body["access_token"]
        assert sandbox.token_status(token) == 0, "served a dead token during the outage"
        if not served or served[-1] != token:
            served.append(token)
            if len(served) == 2:
                # From the next rotation on, values live 30 s: the restart below then
                # happens far from any rotation, so any upstream call would be the
                # restore's fault.
                sandbox.expires_in = 30
        status, body = await srv.get("/wechat/token", type="ticket", timeout=5)
        assert status == 200, f"ticket read during the outage -> {status} {body}"

    # Read until the first value has expired and the refresher has fetched twice (two
    # rotations kept in memory only), then read a little longer.
    deadline = time.monotonic() + 15
    while not (time.monotonic() > fetched_first + 6.5 and len(served) >= 3):
        assert time.monotonic() < deadline, f"no second rotation during the outage: {len(served)} values served"
        await read_once()
        await asyncio.sleep(0.1)
    calls_at_rotation = sandbox.calls[TOKEN_PATH]
    await asyncio.sleep(0.3)
    await read_once()

    assert srv.alive(), srv.log_tail()
    assert sandbox.token_status(first) != 0, "the first value should have expired during the outage"
    # One call per rotation in memory, no retry storm against WeChat while Redis is away.
    assert sandbox.calls[TOKEN_PATH] == len(served) == calls_at_rotation
    assert served[-1] == sandbox.current_token()
    # No busy loop: CPU and log volume stay small while Redis refuses connections.
    cpu = (cpu_seconds(srv.pid) - cpu_before) / (time.monotonic() - wall_before)
    assert cpu < 0.1, f"the server used {cpu:.0%} of a CPU while Redis was down (about 2% when idle-waiting)"
    outage_log = [line for line in srv.log().splitlines()[lines_before:] if "token_server.access" not in line]
    assert len(outage_log) < 40, "log flood during the outage:\n" + "\n".join(outage_log[-10:])
    assert max(latencies) < 1.5, f"a read took {max(latencies):.2f}s while Redis was down"

    # --- Redis comes back empty ----------------------------------------------------------
    memory_token, memory_ticket = served[-1], (await srv.get("/wechat/token", type="ticket"))[1]["ticket"]
    calls_before = dict(sandbox.calls)
    own_redis.start()  # empty: it keeps no files
    await wait_until(lambda: r.get("access_token") == memory_token and r.get("ticket") == memory_ticket, 3, "the values to be put back into Redis")
    assert dict(sandbox.calls) == calls_before, "repopulating Redis called upstream"
    ttl = r.pttl("access_token") / 1000
    assert 20 < ttl <= 30
    assert await srv.token() == memory_token
    restored_version = int(r.hget("access_token:meta", "version"))

    # --- writes resume: a forced refresh lands in Redis ----------------------------------
    status, body = await srv.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    rotated = body["access_token"]
    assert rotated != memory_token and rotated == sandbox.current_token()
    assert r.get("access_token") == rotated
    assert sandbox.calls[TOKEN_PATH] == calls_before[TOKEN_PATH] + 1
    assert int(r.hget("access_token:meta", "version")) > restored_version
    assert await srv.token() == rotated
    r.close()
    assert await srv.stop() == 0


@pytest.fixture
def persistent_redis(tmp_path):
    yield from _own_redis(tmp_path, persistent=True)


@pytest.mark.gen_test(timeout=60)
async def test_redis_back_with_old_data_does_not_replace_a_newer_fetch(token_servers, sandbox, sandbox_url, persistent_redis):
    # Redis comes back with the data it had (append-only file, or a partition healing)
    # after the server fetched a new value in memory.  WeChat killed the old value when it
    # issued the new one (overlap shortened to 1 s here, 5 minutes in production): the
    # server must keep serving the new value and write it back, not adopt the old one.
    sandbox.overlap = 1.0
    cfg = proc_config(persistent_redis.url, sandbox_url, redis={"socket_timeout": 0.5}, refresh={"force_min_interval": 0})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    r = redis.Redis.from_url(persistent_redis.url, decode_responses=True)
    first = r.get("access_token")
    await asyncio.sleep(1.1)  # past the append-only file's once-a-second fsync

    persistent_redis.process.kill()
    persistent_redis.process.wait()
    status, body = await srv.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    fresh = body["access_token"]
    assert fresh != first and fresh == sandbox.current_token()
    assert await srv.token() == fresh

    persistent_redis.start()
    assert r.get("access_token") == first  # Redis is back with its old value
    await wait_until(lambda: sandbox.token_status(first) != 0, 3, "WeChat to retire the old value")
    await asyncio.sleep(1.5)  # a few ticks of the refresher with Redis back
    served = await srv.token()
    assert sandbox.token_status(served) == 0, "the server went back to the value WeChat retired"
    assert served == fresh
    assert r.get("access_token") == fresh, "Redis still holds the retired value for direct readers"
    assert sandbox.calls[TOKEN_PATH] == 2
    r.close()


@pytest.mark.gen_test(timeout=60)
async def test_redis_hung_reads_answer_from_memory_without_waiting(token_servers, sandbox, sandbox_url, own_redis):
    # A Redis that stops answering (SIGSTOP: a partition that drops packets, a stuck
    # host) rather than refusing connections.  The store's contract is "fail fast so an
    # outage turns into a fallback to memory instead of hung requests": with
    # socket_timeout 1 s no read may wait much longer than that.
    cfg = proc_config(own_redis.url, sandbox_url, redis={"socket_timeout": 1}, refresh={"force_min_interval": 0})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    first = await srv.token()
    latencies: list[float] = []

    async def reader(end: float) -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            status, body = await srv.get("/wechat/token", type="access_token", timeout=15)
            latencies.append(time.monotonic() - started)
            assert (status, body.get("access_token")) == (200, first), f"read with Redis hung -> {status} {body}"
            await asyncio.sleep(0.05)

    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        end = time.monotonic() + 6
        await asyncio.gather(*(reader(end) for _ in range(4)))
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    slow = sorted(latencies)[-5:]
    assert max(latencies) < 1.5, f"{sum(1 for x in latencies if x > 1.5)} of {len(latencies)} reads waited on the hung Redis; slowest {[round(x, 1) for x in slow]} s"
    assert sandbox.calls[TOKEN_PATH] == 1

    # Redis answers again: a forced refresh is stored there.
    await asyncio.sleep(1.2)
    status, body = await srv.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    await wait_until(lambda: r.get("access_token") == body["access_token"], 3, "the forced refresh to reach Redis")
    r.close()
