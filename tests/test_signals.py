"""Signals at awkward moments: SIGHUP while starting or stopping, the supervisor SIGKILLed.

Regression tests for an adversarial review's findings (each failed before its fix).

Real token_server.py processes, real redis-server, the in-process sandbox as WeChat.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from helpers_procs import children_running, pid_running, proc_config, wait_until

from server.sandbox import TOKEN_PATH


def workers_of(proc) -> list[int]:
    return children_running(proc.pid, b"token_server.py")


@pytest.mark.gen_test(timeout=60)
async def test_sighup_while_workers_start_is_a_reload_not_a_death(token_servers, sandbox, sandbox_url, redis_url):
    """`systemctl reload` (ExecReload=kill -HUP $MAINPID) while the workers run their first
    refresh pass: the supervisor passes SIGHUP on to children that reset it to SIG_DFL and have
    not installed their own handler yet (server/workers.py _spawn; server/app.py serve installs
    it only after Service.open): every worker dies of SIGHUP, mid-fetch, and is restarted."""
    sandbox.inject(TOKEN_PATH, "hang", times=1, delay=2.0)  # WeChat slow on the first call
    proc = token_servers(proc_config(redis_url, sandbox_url), "workers")
    proc.extra_args = ["--workers", "2"]
    proc.start()
    await wait_until(lambda: proc.log().count("starting (Python") == 2, 15, "two workers starting")
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] >= 1, 10, "the first upstream call in the air")
    proc.send(signal.SIGHUP)  # the operator's reload
    await asyncio.sleep(1.5)
    log = proc.log()
    assert "died (signal 1)" not in log, "a worker was killed by the operator's SIGHUP:\n" + "\n".join(
        line for line in log.splitlines() if "supervisor" in line)


@pytest.mark.gen_test(timeout=60)
async def test_sighup_during_the_first_pass_does_not_end_a_single_process(token_servers, sandbox, sandbox_url, redis_url):
    """The same without --workers: SIGHUP (ExecReload) during the first refresh pass ends the
    process by signal (default action), although the README says SIGHUP reloads."""
    sandbox.inject(TOKEN_PATH, "hang", times=1, delay=2.0)
    proc = token_servers(proc_config(redis_url, sandbox_url), "single")
    proc.start()
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] >= 1, 15, "the first upstream call in the air")
    proc.send(signal.SIGHUP)
    await asyncio.sleep(1.0)
    assert proc.alive(), f"SIGHUP during startup killed the server (returncode {proc.process.returncode})"


@pytest.mark.gen_test(timeout=60)
async def test_workers_end_with_a_sigkilled_supervisor(token_servers, sandbox, sandbox_url, redis_url):
    """The supervisor SIGKILLed (OOM killer, kill -9, a container runtime killing PID 1 only):
    its workers go on as orphans, holding the port, so the next start says "port already in
    use" (server/workers.py forks with no PR_SET_PDEATHSIG and no parent check; the embedded
    redis-server does have one, server/embedded_redis.py _die_with_parent)."""
    proc = token_servers(proc_config(redis_url, sandbox_url), "workers")
    proc.extra_args = ["--workers", "2"]
    proc.start()
    await proc.wait_ready()
    await wait_until(lambda: len(workers_of(proc)) == 2, 10, "two workers")
    pids = workers_of(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.process.wait(5)
    try:
        await asyncio.sleep(3)
        orphans = [pid for pid in pids if pid_running(pid)]
        restarted = token_servers(proc_config(redis_url, sandbox_url), "restarted", port=proc.port)
        restarted.start()
        code = await restarted.wait_exit(15) if orphans else None
        assert not orphans, (f"{len(orphans)} workers still run after their supervisor was SIGKILLed; "
                             f"a restart on the same port exits {code}: {restarted.log_tail(2)}")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.gen_test(timeout=60)
async def test_sighup_during_the_shutdown_drain_changes_nothing(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    """serve() removes its SIGHUP handler first thing at shutdown (server/app.py serve,
    ``loop.remove_signal_handler(signal.SIGHUP)``), which restores SIG_DFL: a reload
    (ExecReload) during the drain, while a fetch finishes (up to server.shutdown_timeout), kills
    the process by signal: exit -1 instead of 0, the fetch's answer lost, its lock left held."""
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0})
    proc = token_servers(cfg, "draining")
    proc.start()
    await proc.wait_ready()
    sandbox.inject(TOKEN_PATH, "hang", times=1, delay=2.0)
    old = redis_sync.get("access_token")
    request = asyncio.ensure_future(proc.get("/wechat/token/forcerefresh", type="access_token", old=old))
    await wait_until(lambda: sandbox.calls[TOKEN_PATH] == 2, 5, "the forced fetch in the air")
    proc.send(signal.SIGTERM)
    await asyncio.sleep(0.3)
    proc.send(signal.SIGHUP)  # `systemctl reload` racing `systemctl stop`, or a config-management run
    code = await proc.wait_exit(15)
    await request
    assert code == 0, f"exit {code} (SIGHUP during the drain); lock still held: {bool(redis_sync.exists('access_token:lock'))}"
