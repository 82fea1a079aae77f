"""The Redis layout and its Lua scripts, against a real redis-server."""

from __future__ import annotations

import time

import pytest

from server.config import RedisConfig
from server.store import Store, build_redis


@pytest.fixture
def store(redis_url, io_loop):
    s = Store(build_redis(RedisConfig(url=redis_url)), prefix="p:")
    yield s
    io_loop.run_sync(s.close)


@pytest.mark.gen_test
async def test_write_sets_plain_key_with_ttl_and_meta(store, redis_sync):
    now = time.time()
    entry = await store.write("access_token", "TOKEN-1", 100, now, "access_token", read_version=0)
    assert entry is not None and entry.version == 1
    assert redis_sync.get("p:access_token") == "TOKEN-1"  # the bare value, as direct readers want
    assert 98 <= redis_sync.ttl("p:access_token") <= 100
    meta = redis_sync.hgetall("p:access_token:meta")
    assert meta["version"] == "1" and meta["field"] == "access_token"
    assert abs(float(meta["expires_at"]) - (now + 100)) < 0.01
    snap = await store.read("access_token")
    assert snap.entry is not None and snap.entry.value == "TOKEN-1" and 98 < snap.entry.remaining() <= 100


@pytest.mark.gen_test
async def test_fencing_rejects_a_write_based_on_an_old_version(store, redis_sync):
    now = time.time()
    assert await store.write("t", "NEWER", 100, now, "access_token", read_version=0)
    # A slow writer that read version 0 before the write above must not replace it.
    assert await store.write("t", "OLDER", 100, now - 5, "access_token", read_version=0) is None
    assert redis_sync.get("p:t") == "NEWER"
    assert (await store.write("t", "NEXT", 100, now, "access_token", read_version=1)).version == 2


@pytest.mark.gen_test
async def test_restore_puts_back_a_lost_value_but_never_over_a_newer_one(store, redis_sync):
    now = time.time()
    entry = await store.write("t", "V1", 100, now, "access_token", read_version=0)
    redis_sync.flushall()  # Redis restarted empty
    assert await store.restore("t", entry)
    assert redis_sync.get("p:t") == "V1" and redis_sync.hget("p:t:meta", "version") == "1"
    assert 95 < redis_sync.ttl("p:t") <= 100
    assert not await store.restore("t", entry)  # already there
    await store.write("t", "V2", 100, now, "access_token", read_version=1)
    redis_sync.delete("p:t")  # V2 expired; V1 is older still: do not bring it back
    assert not await store.restore("t", entry)
    assert redis_sync.get("p:t") is None


@pytest.mark.gen_test
async def test_lock_is_exclusive_and_only_its_holder_releases_it(store, redis_sync):
    token = await store.acquire("t", lease=5)
    assert token is not None
    assert await store.acquire("t", lease=5) is None
    assert 0 < redis_sync.pttl("p:t:lock") <= 5000
    assert not await store.release("t", "someone-else")
    assert await store.locked("t")
    assert await store.release("t", token)
    assert not await store.locked("t")


@pytest.mark.gen_test
async def test_expired_value_is_absent(store, redis_sync):
    await store.write("t", "SHORT", 0.05, time.time(), "ticket", read_version=0)
    import asyncio

    await asyncio.sleep(0.1)
    snap = await store.read("t")
    assert snap.entry is None and snap.version == 1
    assert redis_sync.get("p:t") is None



@pytest.mark.gen_test
async def test_restore_replaces_older_data_with_a_newer_memory_value(store, redis_sync):
    from server.store import Entry

    now = time.time()
    await store.write("t", "OLD", 100, now - 50, "access_token", read_version=0)  # version 1
    # Fetched while Redis was unreachable, based on version 1: version 2.
    newer = Entry("FETCHED-DURING-OUTAGE", now + 100, now, 2, "access_token")
    assert await store.restore("t", newer)
    assert redis_sync.get("p:t") == "FETCHED-DURING-OUTAGE" and redis_sync.hget("p:t:meta", "version") == "2"
    # Another instance wrote version 2 too, but later: same version, later fetched_at wins.
    later = Entry("LATER", now + 100, now + 1, 2, "access_token")
    assert await store.restore("t", later)
    assert redis_sync.get("p:t") == "LATER" and redis_sync.hget("p:t:meta", "version") == "3"
    assert not await store.restore("t", newer)  # now older than Redis's


@pytest.mark.gen_test
async def test_cap_life_shortens_only_the_named_value(store, redis_sync):
    now = time.time()
    await store.write("t", "V", 7000, now, "access_token", read_version=0)
    assert not await store.cap_life("t", "OTHER", 300)
    assert redis_sync.ttl("p:t") > 6990
    assert await store.cap_life("t", "V", 300)
    assert 295 < redis_sync.ttl("p:t") <= 300
    assert abs(float(redis_sync.hget("p:t:meta", "expires_at")) - (now + 300)) < 2
    assert not await store.cap_life("t", "V", 600)  # never lengthens


@pytest.mark.gen_test
async def test_backoff_is_announced_with_its_failure_count(store, redis_sync):
    await store.set_backoff("t", 2.0, 3)
    snap = await store.read("t")
    assert 1.5 < snap.backoff <= 2.0 and snap.failures == 3
    assert redis_sync.get("p:t:failures") == "3"
    await store.write("t", "V", 100, time.time(), "access_token", read_version=0)
    snap = await store.read("t")
    assert snap.backoff == 0 and snap.failures == 0  # a stored value ends the backoff


@pytest.mark.gen_test
async def test_putting_back_a_newer_value_ends_backoff_and_block(store, redis_sync):
    from server.store import Block, Entry

    now = time.time()
    await store.write("t", "OLD", 100, now - 50, "access_token", read_version=0)
    await store.set_backoff("t", 30, 2)
    await store.set_blocked("t", Block("fatal", 40164, "invalid ip"), None)
    assert await store.restore("t", Entry("NEWER", now + 100, now, 2, "access_token"))
    snap = await store.read("t")
    assert snap.entry.value == "NEWER" and snap.backoff == 0 and snap.failures == 0 and snap.blocked is None
