"""The Redis layout and its Lua scripts, against a real redis-server."""

from __future__ import annotations

import time

import pytest

from server.config import RedisConfig
from server.redis_client import build_redis
from server.store import Block, Entry, Store


@pytest.fixture
def store(redis_url, io_loop):
    s = Store(build_redis(RedisConfig(url=redis_url)), prefix="p:")
    yield s
    io_loop.run_sync(s.close)


def entry(value: str, version: int, life: float = 100, age: float = 0.0, field: str = "access_token") -> Entry:
    now = time.monotonic()
    return Entry(value, now - age + life, now - age, version, field)


def redis_now(redis_sync) -> float:
    seconds, micros = redis_sync.time()
    return seconds + micros / 1e6


@pytest.mark.gen_test
async def test_write_sets_plain_key_with_ttl_and_meta_on_redis_clock(store, redis_sync):
    lease = await store.acquire("access_token", lease=5)
    assert lease is not None
    # The version is Redis's TIME in microseconds when the lock was taken.
    assert abs(lease.version / 1e6 - redis_now(redis_sync)) < 2
    assert await store.write("access_token", entry("TOKEN-1", lease.version, life=100, age=2))
    assert redis_sync.get("p:access_token") == "TOKEN-1"
    assert 97 <= redis_sync.ttl("p:access_token") <= 98  # life minus the 2 s since the fetch
    meta = redis_sync.hgetall("p:access_token:meta")
    assert int(meta["version"]) == lease.version and meta["field"] == "access_token"
    now = redis_now(redis_sync)
    assert abs(float(meta["fetched_at"]) - (now - 2)) < 0.5 and abs(float(meta["expires_at"]) - (now + 98)) < 0.5
    snap = await store.read("access_token")
    assert snap.entry is not None and snap.entry.value == "TOKEN-1" and snap.version == lease.version
    assert 97 < snap.entry.remaining() <= 98 and 1.9 < snap.entry.age() < 2.5


@pytest.mark.gen_test
async def test_versions_only_grow_and_a_write_is_fenced_by_them(store, redis_sync):
    first = await store.acquire("t", lease=5)
    assert first is not None and await store.acquire("t", lease=5) is None  # the lock is held
    await store.release("t", first.token)
    second = await store.acquire("t", lease=5)
    assert second is not None and second.version > first.version  # claimed: even before any write
    assert await store.write("t", entry("NEWER", second.version))
    # The older fetch (its lock expired while it ran) lands later: fenced out.
    assert not await store.write("t", entry("OLDER", first.version))
    assert redis_sync.get("p:t") == "NEWER"
    await store.release("t", second.token)
    # A caller that knows a higher version (it held it before Redis lost its data) gets a higher one.
    known = second.version + 10_000_000_000
    third = await store.acquire("t", lease=5, known=known)
    assert third is not None and third.version == known + 1


@pytest.mark.gen_test
async def test_versions_survive_redis_losing_its_data(store, redis_sync):
    # Redis restarts empty: a fetch after the loss still gets a version above one before it.
    before = await store.acquire("t", lease=5)
    assert before is not None and await store.write("t", entry("BEFORE", before.version))
    redis_sync.flushall()
    after = await store.acquire("t", lease=5)
    assert after is not None and after.version > before.version
    assert await store.write("t", entry("AFTER", after.version))
    # The instance that held BEFORE tries to put it back: the newer value stays.
    assert not await store.write("t", entry("BEFORE", before.version), restore=True)
    assert redis_sync.get("p:t") == "AFTER"


@pytest.mark.gen_test
async def test_restore_puts_back_a_lost_or_newer_value(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    v1 = entry("V1", lease.version)
    assert await store.write("t", v1)
    assert not await store.write("t", v1, restore=True)  # already there
    redis_sync.delete("p:t")  # evicted, or deleted by hand: the same version comes back
    assert await store.write("t", v1, restore=True)
    assert redis_sync.get("p:t") == "V1"
    assert not await store.write("t", v1)  # a fresh write of the same version is no newer value
    # Redis rolled back to older data: memory's newer value goes back over it.
    assert await store.write("t", entry("NEWER", lease.version + 5), restore=True)
    assert redis_sync.get("p:t") == "NEWER"
    assert int(redis_sync.hget("p:t:meta", "version")) == lease.version + 5


@pytest.mark.gen_test
async def test_an_expired_value_keeps_its_version(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    assert await store.write("t", entry("SHORT", lease.version, life=0.05, field="ticket"))
    time.sleep(0.1)
    assert redis_sync.get("p:t") is None
    snap = await store.read("t")
    assert snap.entry is None and snap.version == lease.version


@pytest.mark.gen_test
async def test_lock_is_compare_and_delete(store):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    assert not await store.release("t", "someone-else")
    assert await store.locked("t")
    assert await store.release("t", lease.token)
    assert not await store.locked("t")


@pytest.mark.gen_test
async def test_cap_life_shortens_only_the_stored_value(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    await store.write("t", entry("V", lease.version, life=7000))
    assert not await store.cap_life("t", "OTHER", 300)
    assert redis_sync.ttl("p:t") > 6000
    assert await store.cap_life("t", "V", 300)
    assert 295 <= redis_sync.ttl("p:t") <= 300
    assert abs(float(redis_sync.hget("p:t:meta", "expires_at")) - (redis_now(redis_sync) + 300)) < 2
    assert not await store.cap_life("t", "V", 600)  # never lengthens


@pytest.mark.gen_test
async def test_drop_removes_a_rejected_value_and_supersedes_it(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    await store.write("t", entry("REJECTED", lease.version))
    assert not await store.drop("t", "OTHER")
    assert await store.drop("t", "REJECTED")
    snap = await store.read("t")
    assert snap.entry is None and snap.version > lease.version  # no instance puts it back
    assert not await store.write("t", entry("REJECTED", lease.version), restore=True)


@pytest.mark.gen_test
async def test_backoff_failures_and_lost_answers_are_shared_and_end_with_a_write(store):
    await store.set_backoff("t", 2.0, 3, lost=True)
    await store.set_backoff("t", 2.0, 4, lost=True)
    snap = await store.read("t")
    assert 1.5 < snap.backoff <= 2.0 and snap.failures == 4 and snap.lost == 2
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    await store.write("t", entry("V", lease.version))
    snap = await store.read("t")
    assert (snap.backoff, snap.failures, snap.lost) == (0.0, 0, 0)


@pytest.mark.gen_test
async def test_a_put_back_newer_value_ends_backoff_and_block(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    await store.write("t", entry("OLD", lease.version))
    await store.set_backoff("t", 30, 2)
    await store.set_blocked("t", Block("fatal", 40164, "invalid ip"), None)
    assert await store.write("t", entry("NEWER", lease.version + 1), restore=True)
    snap = await store.read("t")
    assert snap.entry is not None and snap.entry.value == "NEWER"
    assert snap.backoff == 0 and snap.failures == 0 and snap.blocked is None


@pytest.mark.gen_test
async def test_a_quota_block_carries_its_remaining_time(store):
    await store.set_blocked("t", Block("quota", 45009, "quota"), 120)
    snap = await store.read("t")
    assert snap.blocked == Block("quota", 45009, "quota") and 119 < snap.blocked_for <= 120
    await store.set_blocked("t", Block("fatal", 40013, "invalid appid"), None)
    assert (await store.read("t")).blocked_for == float("inf")


@pytest.mark.gen_test
async def test_same_until_is_kept_on_redis_clock(store, redis_sync):
    lease = await store.acquire("t", lease=5)
    assert lease is not None
    await store.write("t", entry("V", lease.version))
    assert not await store.mark_same("t", "OTHER", 50)
    assert await store.mark_same("t", "V", 50)
    assert abs(float(redis_sync.hget("p:t:meta", "same_until")) - (redis_now(redis_sync) + 50)) < 1
    snap = await store.read("t")
    assert snap.entry is not None and 49 < snap.entry.same_until - time.monotonic() <= 50


@pytest.mark.gen_test
async def test_versions_reports_missing_values_in_one_round_trip(store, redis_sync):
    lease = await store.acquire("a", lease=5)
    assert lease is not None
    await store.write("a", entry("A", lease.version))
    found = await store.versions(["a", "b"])
    assert found["b"] is None and found["a"] is not None
    version, life = found["a"]
    assert version == lease.version and 99 < life <= 100
