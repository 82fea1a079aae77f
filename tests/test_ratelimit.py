"""The shared rate limits (``limits`` on Redis) behind the brute-force and forced-refresh limits."""

from __future__ import annotations

import asyncio

import pytest

from server.config import RedisConfig
from server.embedded_redis import EmbeddedRedis
from server.ratelimit import CACHE_SECONDS, SharedLimit, retry_after_header
from server.redis_client import build_redis


@pytest.fixture
def clients(redis_url, io_loop):
    """Two Redis clients, as two instances of the server would have."""
    made = [build_redis(RedisConfig(url=redis_url)) for _ in range(2)]
    yield made
    for c in made:
        io_loop.run_sync(lambda c=c: c.aclose(close_connection_pool=True))


@pytest.mark.gen_test
async def test_a_limit_holds_across_instances(clients, redis_sync):
    a, b = (SharedLimit(c, "p:", "forcerefresh", 3) for c in clients)
    assert await a.hit("shop/access_token") == 0.0
    assert await b.hit("shop/access_token") == 0.0
    assert await a.hit("shop/access_token") == 0.0
    wait = await b.hit("shop/access_token")  # the fourth, in the other instance
    assert 0 < wait <= 60
    assert await b.hit("shop/ticket") == 0.0  # another key has its own budget
    # Counted in Redis under the prefix, with the window's TTL.
    keys = redis_sync.keys("p:wechat-token:limits*")
    assert keys and all(0 < redis_sync.ttl(k) <= 60 for k in keys)


@pytest.mark.gen_test
async def test_retry_after_counts_nothing_and_follows_the_window(clients, redis_sync):
    a, b = (SharedLimit(c, "", "auth-failures", 2) for c in clients)
    for _ in range(5):
        assert await a.retry_after("10.0.0.1") == 0.0
    await a.hit("10.0.0.1")
    await a.hit("10.0.0.1")
    assert 59 < await b.retry_after("10.0.0.1") <= 60
    # The window ends (here: its key expires early): within CACHE_SECONDS, every instance lets it in.
    for key in redis_sync.keys("wechat-token:limits*"):
        redis_sync.pexpire(key, 1)
    await asyncio.sleep(CACHE_SECONDS + 0.1)
    assert await b.retry_after("10.0.0.1") == 0.0


@pytest.mark.gen_test(timeout=20)
async def test_without_redis_each_process_counts_alone(tmp_path):
    own = EmbeddedRedis(str(tmp_path), persistent=False)
    own.start()
    client = build_redis(RedisConfig(url=own.url, socket_timeout=0.5))
    limit = SharedLimit(client, "", "forcerefresh", 2)
    own.stop()
    try:
        assert await limit.hit("k") == 0.0
        assert await limit.hit("k") == 0.0
        assert await limit.hit("k") > 0  # still limited, in memory
        assert await limit.retry_after("other") == 0.0
    finally:
        await client.aclose(close_connection_pool=True)


def test_retry_after_header_is_whole_seconds_at_least_one():
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(29.2) == "30"
    assert retry_after_header(60) == "60"
