"""``--workers N``: N processes on one port under a supervisor (server.workers).

Real processes (``token_server.py --workers 2``), a real redis-server (or the embedded one),
the sandbox in process as WeChat; upstream calls counted at the sandbox.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from helpers_procs import child_pids, children_running, proc_config, wait_until
from tornado.httpclient import AsyncHTTPClient

from server.sandbox import TICKET_PATH, TOKEN_PATH


def workers_of(proc) -> list[int]:
    """The supervisor's children that are token servers (not an embedded redis-server)."""
    return children_running(proc.pid, b"token_server.py")


def started(token_servers, cfg, n: int = 2):
    proc = token_servers(cfg, "workers")
    proc.extra_args = ["--workers", str(n)]
    return proc.start()


@pytest.mark.gen_test(timeout=60)
async def test_two_workers_make_one_upstream_call_per_rotation(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0}, server={"forcerefresh_per_minute": 10000})
    proc = started(token_servers, cfg)
    await proc.wait_ready()
    await wait_until(lambda: len(workers_of(proc)) == 2 and proc.log().count("listening on") == 2, 10, "two workers listening")
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)
    # a storm on the shared port (the kernel spreads connections): one value, one call per rotation
    client = AsyncHTTPClient(force_instance=True, max_clients=50)
    try:
        for rotation in range(3):
            old = redis_sync.get("access_token")
            answers = await asyncio.gather(*(proc.get("/wechat/token/forcerefresh", client=client, type="access_token", old=old) for _ in range(40)))
            assert {status for status, _ in answers} == {200}
            assert len({body["access_token"] for _, body in answers}) == 1
            assert sandbox.calls[TOKEN_PATH] == 2 + rotation
    finally:
        client.close()
    assert await proc.stop() == 0
    assert workers_of(proc) == []


@pytest.mark.gen_test(timeout=60)
async def test_a_crashed_worker_is_replaced_and_sigterm_stops_them_all(token_servers, sandbox, sandbox_url, redis_url):
    proc = started(token_servers, proc_config(redis_url, sandbox_url))
    await proc.wait_ready()
    # both listening before one is killed (else the count of "listening on" below means nothing)
    await wait_until(lambda: len(workers_of(proc)) == 2 and proc.log().count("listening on") == 2, 10, "two workers listening")
    first, second = workers_of(proc)
    os.kill(first, signal.SIGKILL)  # the OOM killer, a segfault
    await wait_until(lambda: len(workers_of(proc)) == 2 and first not in workers_of(proc), 10, "a replacement worker")
    assert second in workers_of(proc)
    assert "died (signal 9)" in proc.log()
    try:
        await wait_until(lambda: proc.log().count("listening on") >= 3, 20, "the replacement listening")
    except AssertionError:
        raise AssertionError("no replacement listening:\n" + "\n".join(
            line for line in proc.log().splitlines() if "access" not in line)[-3000:]) from None
    for _ in range(20):
        assert await proc.token() == sandbox.current_token()
    assert sandbox.calls[TOKEN_PATH] == 1  # the replacement reused the value in Redis

    pids = workers_of(proc)
    assert await proc.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert proc.log().count("stopped") >= 2


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reaches_every_worker(token_servers, sandbox, sandbox_url, redis_url):
    proc = started(token_servers, proc_config(redis_url, sandbox_url))
    await proc.wait_ready()
    await wait_until(lambda: proc.log().count("listening on") == 2, 10, "two workers listening")
    proc.send(signal.SIGHUP)
    await wait_until(lambda: proc.log().count("reload done") == 2, 10, "both workers reloaded")
    assert sandbox.calls[TOKEN_PATH] == 1
    assert await proc.stop() == 0


@pytest.mark.gen_test(timeout=60)
async def test_workers_share_one_embedded_redis(token_servers, sandbox, sandbox_url, tmp_path):
    cfg = proc_config(None, sandbox_url, redis={"data_dir": str(tmp_path / "data")})
    proc = started(token_servers, cfg)
    await proc.wait_ready()
    await wait_until(lambda: proc.log().count("listening on") == 2, 10, "two workers listening")
    redis_servers = [pid for pid in child_pids(proc.pid) if pid not in workers_of(proc)]
    assert len(redis_servers) == 1
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 1)
    assert await proc.stop() == 0


def test_workers_out_of_range_is_one_line(tmp_path):
    import subprocess
    import sys

    from helpers_procs import REPO

    out = subprocess.run([sys.executable, os.path.join(REPO, "token_server.py"), "--demo", "--workers", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip() == "config error: --workers: 0 is not between 1 and 64 (about one per core)"
