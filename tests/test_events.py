"""Rotation events on ``<prefix>wechat-token:events``: one message per stored change across
instances, never the value (server.store publishes, server.ops.events subscribes).

Real processes and a real redis-server; the subscriber in these tests is a plain redis-py
client, as a direct Redis reader in any language would be.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis
from conftest import AUTH
from helpers_procs import proc_config, wait_until

from server.ops.events import Subscriber, parse_event
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, TICKET_PATH, TOKEN_PATH
from server.store import Block


class Listener:
    """A redis-py subscriber on the test's loop: every message, decoded."""

    def __init__(self, redis_url: str, channel: str = "wechat-token:events") -> None:
        self.client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.sub = Subscriber(self.client, channel)
        self.events: list[dict] = []

        async def keep(event) -> None:
            self.events.append({**event.as_dict(), "at": time.monotonic()})

        self.sub.listen(keep)

    async def __aenter__(self) -> Listener:
        await self.sub.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.sub.stop()
        await self.client.aclose()

    def of(self, source: str, event: str = "rotated") -> list[dict]:
        return [e for e in self.events if e["source"] == source and e["event"] == event]


@pytest.mark.gen_test(timeout=60)
async def test_one_message_per_rotation_across_three_instances(token_servers, sandbox, sandbox_url, redis_url, redis_sync):
    sandbox.expires_in = 5  # with ahead 3: a rotation about every 2 s
    cfg = proc_config(redis_url, sandbox_url, refresh={"interval": 0.3, "ahead": 3, "max_ttl": 7000})
    async with Listener(redis_url) as listener:
        procs = [token_servers(cfg, f"ts{i}").start() for i in range(3)]
        await asyncio.gather(*(p.wait_ready() for p in procs))
        await asyncio.sleep(5.5)
        await wait_until(lambda: not redis_sync.exists("access_token:lock", "ticket:lock"), 5, "no fetch in flight")
        await asyncio.sleep(0.2)  # the last message's way from Redis to us

    tokens, tickets = listener.of("access_token"), listener.of("ticket")
    assert len(tokens) >= 3, f"expected several rotations, saw {listener.events}"
    # exactly one message per upstream call, whichever of the three processes made it
    assert len(tokens) == sandbox.calls[TOKEN_PATH]
    assert len(tickets) == sandbox.calls[TICKET_PATH]
    versions = [e["version"] for e in tokens]
    assert versions == sorted(set(versions)), "versions must be unique and in order"
    assert len({e["id"] for e in listener.events}) == len(listener.events)
    # the last message names what Redis holds now, on Redis's clock
    meta = redis_sync.hgetall("access_token:meta")
    assert tokens[-1]["version"] == int(meta["version"])
    assert abs(tokens[-1]["expires_at"] - float(meta["expires_at"])) < 0.01
    assert tokens[-1]["expires_at"] > time.time()  # this host's clock is Redis's here
    assert tokens[-1]["account"] is None  # a source declared by hand
    # never the value
    issued = sandbox.issued_values()
    for e in listener.events:
        assert not any(v in json.dumps(e) for v in issued)


@pytest.mark.gen_test(timeout=30)
async def test_blocked_unblocked_and_dropped_are_announced(make_config, start_server, call, sandbox, sandbox_url, redis_url, redis_sync):
    main = {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "api_base": sandbox_url}
    cfg = make_config(sources={}, accounts={"main": main}, refresh={"force_min_interval": 0})
    async with Listener(redis_url) as listener:
        running = await start_server(cfg)
        await wait_until(lambda: len(listener.of("access_token")) == 1, 5, "the first value announced")
        assert listener.of("access_token")[0]["account"] == "main"

        # WeChat refuses the secret: every instance is told to stop calling
        sandbox.inject(TOKEN_PATH, "errcode", errcode=40125, times=None)
        token = redis_sync.get("access_token")
        status, _ = await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=token)
        assert status == 503
        await wait_until(lambda: listener.of("access_token", "blocked"), 5, "a blocked event")
        # a second refusal is the same block: not announced again
        await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=token)
        await asyncio.sleep(0.2)
        assert len(listener.of("access_token", "blocked")) == 1

        # fixed: the operator's forced refresh stores a value, which lifts the block (announced
        # by the same script as the rotation)
        sandbox.clear_faults()
        status, _ = await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=token)
        assert status == 200
        await wait_until(lambda: listener.of("access_token", "unblocked") and len(listener.of("access_token")) == 2, 5, "unblocked + rotated")
        assert [e["event"] for e in listener.events if e["source"] == "access_token"][-2:] == ["unblocked", "rotated"]

        # a restart's first pass lifts a block too, and says so
        await running.store.set_blocked("access_token", Block("fatal", 40164, "invalid ip"), None)
        await running.refresher.refresh_due(first=True)
        await wait_until(lambda: len(listener.of("access_token", "unblocked")) == 2, 5, "the second unblocked")
        assert len(listener.of("access_token", "blocked")) == 2

        # a value WeChat rejected and that was dropped is announced, with the raised version
        value = redis_sync.get("access_token")
        assert await running.store.drop("access_token", value)
        await wait_until(lambda: listener.of("access_token", "dropped"), 5, "a dropped event")
        dropped = listener.of("access_token", "dropped")[0]
        assert dropped["version"] == int(redis_sync.hget("access_token:meta", "version"))
        assert dropped["expires_at"] is None


@pytest.mark.gen_test(timeout=30)
async def test_a_put_back_of_the_same_value_is_not_a_rotation(make_config, start_server, sandbox, redis_url, redis_sync):
    cfg = make_config()
    async with Listener(redis_url) as listener:
        await start_server(cfg)
        await wait_until(lambda: len(listener.of("access_token")) == 1, 5, "the first value")
        redis_sync.delete("access_token")  # the key alone is lost; the mirror puts it back
        await wait_until(lambda: redis_sync.get("access_token") is not None, 5, "the value put back")
        await asyncio.sleep(0.2)
        assert len(listener.of("access_token")) == 1
        assert sandbox.calls[TOKEN_PATH] == 1


def test_parse_event_refuses_what_is_not_an_event():
    good = {"event": "rotated", "source": "s", "account": None, "id": "x", "version": 3, "expires_at": 1.5}
    assert parse_event(json.dumps(good)).version == 3
    for bad in (
        "not json", "[]", json.dumps({**good, "event": "other"}), json.dumps({**good, "version": "3"}),
        json.dumps({**good, "version": True}), json.dumps({**good, "account": 5}), json.dumps({**good, "expires_at": "soon"}),
        json.dumps({k: v for k, v in good.items() if k != "source"}),
    ):
        assert parse_event(bad) is None, bad


@pytest.mark.gen_test(timeout=30)
async def test_the_subscriber_comes_back_after_redis_drops_it(redis_url, redis_sync):
    async with Listener(redis_url) as listener:
        resubscribed = []

        async def again() -> None:
            resubscribed.append(1)

        listener.sub.listen(lambda e: asyncio.sleep(0), again)
        redis_sync.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_until(lambda: resubscribed, 5, "resubscribed")
        redis_sync.publish("wechat-token:events", json.dumps(
            {"event": "rotated", "source": "s", "account": None, "id": "x", "version": 3, "expires_at": 1.5}))
        await wait_until(lambda: listener.events, 5, "a message after the reconnect")
