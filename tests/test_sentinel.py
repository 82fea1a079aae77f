"""Redis Sentinel: the server follows a failover of its Redis primary.

A real primary, a replica and one sentinel (``redis-server --sentinel``), a real
token_server.py configured with ``redis.sentinel``; the primary is killed, the sentinel
promotes the replica, and the server keeps serving and then writes to the new primary.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from helpers_procs import SentinelProc, proc_config, wait_until

from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from server.sandbox import TOKEN_PATH


@pytest.fixture
def redis_pair_with_sentinel(tmp_path):
    """(primary, replica, sentinel), the replica in sync and known to the sentinel."""
    started = []
    try:
        primary = EmbeddedRedis(str(tmp_path / "primary"), persistent=False)
        primary.start()
        started.append(primary)
        replica = EmbeddedRedis(str(tmp_path / "replica"), persistent=False,
                                extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        replica.start()
        started.append(replica)
        sentinel = SentinelProc(str(tmp_path / "sentinel"), primary.port, down_after_ms=1000, failover_timeout_ms=3000)
        try:
            sentinel.start()
        except RuntimeError as e:
            if "sentinel" in str(e).lower() and "unknown" in str(e).lower():
                pytest.skip(f"this redis-server has no sentinel mode: {e}")
            raise
        started.append(sentinel)
    except EmbeddedRedisError as e:
        for s in reversed(started):
            s.stop()
        pytest.skip(f"no redis-server: {e}")
    rep = redis.Redis(port=replica.port, decode_responses=True)
    deadline = time.monotonic() + 10
    while rep.info("replication").get("master_link_status") != "up" or int(sentinel.client().sentinel_master("mymaster")["num-slaves"]) < 1:
        assert time.monotonic() < deadline, "replica not in sync or unknown to the sentinel after 10s"
        time.sleep(0.05)
    rep.close()
    yield primary, replica, sentinel
    for s in reversed(started):
        s.stop()


@pytest.mark.gen_test(timeout=60)
async def test_failover_keeps_serving_and_writes_go_to_the_new_primary(token_servers, sandbox, sandbox_url, redis_pair_with_sentinel):
    primary, replica, sentinel = redis_pair_with_sentinel
    cfg = proc_config(
        None,
        sandbox_url,
        redis={"sentinel": {"hosts": [f"127.0.0.1:{sentinel.port}"], "service_name": "mymaster"}, "socket_timeout": 0.5},
        refresh={"force_min_interval": 0},
    )
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    old = redis.Redis(port=primary.port, decode_responses=True)
    new = redis.Redis(port=replica.port, decode_responses=True)
    first = old.get("access_token")
    first_version = int(old.hget("access_token:meta", "version"))
    assert first == sandbox.current_token() and await srv.token() == first
    await wait_until(lambda: new.get("access_token") == first, 5, "the value to reach the replica")

    primary.process.kill()
    primary.process.wait()
    reads = 0
    deadline = time.monotonic() + 20
    while sentinel.master_port() != replica.port:
        assert time.monotonic() < deadline, "the sentinel did not promote the replica within 20s"
        status, body = await srv.get("/wechat/token", type="access_token", timeout=5)
        assert (status, body.get("access_token")) == (200, first), f"read during the failover -> {status} {body}"
        reads += 1
        await asyncio.sleep(0.1)
    assert reads > 5  # the failover took a while: the reads above really ran without a primary
    await wait_until(lambda: new.info("replication")["role"] == "master", 10, "the replica to become primary")
    assert srv.alive(), srv.log_tail()
    assert await srv.token() == first
    # Straight after the failover (reads may still be skipping Redis after its errors): a
    # refresh asks Redis for the lock itself, and lands in the new primary.
    status, body = await srv.get("/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    rotated = body["access_token"]
    assert rotated != first and rotated == sandbox.current_token()
    await wait_until(lambda: new.get("access_token") == rotated, 3, "the forced refresh to land in the new primary")
    assert int(new.hget("access_token:meta", "version")) > first_version
    assert sandbox.calls[TOKEN_PATH] == 2
    assert await srv.token() == rotated
    old.close()
    new.close()
    assert await srv.stop() == 0
