"""Graceful shutdown of a token_server.py process during a slow forced refresh.

The server runs its embedded Redis (no redis.url), so the test also checks that this
child goes away with it; the lock is checked afterwards by reopening the embedded
Redis's append-only file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest
import redis
from helpers_procs import children_running, get_json, pid_running, pids_with_cwd, proc_config, wait_until

from server.embedded_redis import EmbeddedRedis, free_port
from server.sandbox import TOKEN_PATH


def redis_children(pid: int) -> list[int]:
    return children_running(pid, b"redis-server")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.gen_test(timeout=60)
async def test_signal_during_slow_forced_refresh(sig, token_servers, sandbox, sandbox_url, tmp_path):
    data_dir = tmp_path / "data"
    redis_port = free_port()
    # timeout 3: the lock's lease is 3 * 3 + 5 = 14 s, so a lock left behind would still
    # be in Redis when the test looks.
    cfg = proc_config(None, sandbox_url, redis={"data_dir": str(data_dir), "port": redis_port},
                      refresh={"force_min_interval": 0, "timeout": 3})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    (embedded_pid,) = redis_children(srv.pid)
    r = redis.Redis(port=redis_port, decode_responses=True)
    first = r.get("access_token")
    assert first == sandbox.current_token()

    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    inflight = asyncio.ensure_future(srv.get("/wechat/token/forcerefresh", type="access_token"))
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2 and r.exists("access_token:lock"), 5, "the slow fetch to start")
    r.close()

    srv.send(sig)

    async def refused() -> bool:
        status, _ = await get_json(f"{srv.base}/healthz", timeout=0.5)
        return status == 599

    await wait_until(refused, 1.0, "the server to stop accepting connections")
    assert not inflight.done(), "the in-flight request ended before the slow fetch could finish"

    status, body = await inflight
    assert status == 200, f"the in-flight forced refresh got {status} {body}"
    rotated = body["access_token"]
    assert rotated != first and rotated == sandbox.current_token()
    assert await srv.wait_exit(10) == 0, srv.log_tail()
    await wait_until(lambda: not pid_running(embedded_pid), 2, "the embedded redis-server to stop")

    # What the embedded Redis held when it stopped: the new value, and no lock left behind.
    reopened = EmbeddedRedis(str(data_dir), port=free_port(), persistent=True)
    reopened.start()
    try:
        check = redis.Redis(port=reopened.port, decode_responses=True)
        assert check.get("access_token") == rotated
        assert not check.exists("access_token:lock"), "the shutdown left the refresh lock in Redis"
        check.close()
    finally:
        reopened.stop()


@pytest.mark.gen_test(timeout=30)
async def test_failed_start_stops_the_embedded_redis(token_servers, sandbox_url, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = proc_config(None, sandbox_url, redis={"data_dir": str(data_dir)})
    srv = token_servers(cfg, "ts", port=busy.getsockname()[1]).start()
    try:
        assert await srv.wait_exit(15) == 1, srv.log_tail()
        assert f"port {srv.port} is already in use" in srv.log()
        await asyncio.sleep(0.3)
        left = pids_with_cwd(str(data_dir))
        for pid in left:  # started by this test (through the server): do not let them outlive it
            os.kill(pid, signal.SIGKILL)
        assert not left, "the embedded redis-server outlived a server that failed to start"
    finally:
        busy.close()
