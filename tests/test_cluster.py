"""Redis Cluster (``redis.cluster: true``): a real cluster of 3 masters with a replica each.

The cluster is started by the ``redis_cluster`` fixture (conftest: ``redis-server
--cluster-enabled yes`` on six ports, ``redis-cli --cluster create --cluster-replicas 1``);
the server runs its production pipeline (``start_server``) against it, the sandbox as WeChat.
The sources are access_token and ticket (both in slots of one master) and wx_card_ticket
(slot 16369: another master), so what spans sources spans nodes too.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time

import pytest
import redis
import yaml
from conftest import TEST_SECRET, find_redis_cli
from helpers_procs import sandbox_sources, wait_until
from redis.cluster import RedisCluster
from redis.crc import key_slot
from test_webhooks import HOOK_SECRET, receiver  # noqa: F401 (receiver: a fixture)
from tornado.httpclient import AsyncHTTPClient

from server.app import StartupError, start, stop
from server.config import ConfigError, RedisConfig
from server.config_file import parse_config
from server.ops.events import Subscriber
from server.ratelimit import SharedLimit
from server.redis_client import build_redis
from server.sandbox import TICKET_PATH, TOKEN_PATH
from server.store import Entry, Keys, Store, events_channel

SOURCES = ("access_token", "ticket", "wx_card_ticket")


def sources(sandbox_url):
    out = sandbox_sources(sandbox_url)
    out["wx_card_ticket"] = {"url": f"{sandbox_url}/cgi-bin/ticket/getticket", "args": {"type": "wx_card", "access_token": "<<access_token>>"}}
    return out


def cluster_config(make_config, cluster, sandbox_url, **sections):
    return make_config(**{"redis": {"url": cluster.url, "cluster": True}, "sources": sources(sandbox_url), **sections})


def cluster_client(cluster) -> RedisCluster:
    """A direct reader's cluster client (redis-py's sync RedisCluster)."""
    return RedisCluster.from_url(cluster.url, decode_responses=True)


def _crc_slot(key: str) -> int:
    """The hash slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    return key_slot(key.encode())


def test_every_key_of_a_source_shares_the_slot_of_its_plain_key():
    keys = Keys("", cluster=True)
    assert keys.value("access_token") == "access_token"  # the plain key keeps its name
    assert keys.aux("access_token", "meta") == "{access_token}:meta"
    for prefix in ("", "p:", "shop."):
        k = Keys(prefix, cluster=True)
        for part in ("meta", "lock", "blocked", "backoff", "failures", "lost", "rejected", "slow", "calls:20261201"):
            assert _crc_slot(k.aux("ticket", part)) == _crc_slot(k.value("ticket")), (prefix, part)
    # A prefix with a tag of its own keeps the plain names: they share that tag.
    tagged = Keys("{wechat}:", cluster=True)
    assert tagged.aux("ticket", "meta") == "{wechat}:ticket:meta"
    assert _crc_slot(tagged.aux("ticket", "meta")) == _crc_slot(tagged.value("access_token"))
    # Outside a cluster the layout is the one operators know.
    assert Keys("p:").aux("access_token", "meta") == "p:access_token:meta"


@pytest.mark.parametrize("redis_section,message", [
    ({"cluster": True}, "redis.cluster: needs redis.url"),
    ({"cluster": True, "sentinel": {"hosts": ["h:26379"]}}, "redis.cluster: a Redis Cluster fails over by itself"),
    ({"cluster": True, "url": "unix:///run/redis.sock"}, "redis.url: a Redis Cluster is reached over TCP"),
    ({"cluster": True, "url": "redis://h:7000/2"}, "redis.url: a Redis Cluster has only database 0"),
    ({"cluster": True, "url": "redis://h:7000", "prefix": "a}b:"}, "redis.prefix: on a Redis Cluster a brace starts a hash tag"),
])
def test_cluster_config_mistakes_are_one_line(redis_section, message):
    raw = {"server": {"secret": TEST_SECRET}, "redis": redis_section, "sources": sandbox_sources("http://127.0.0.1:1")}
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(raw), env={}, source="test")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_third_party_platform_is_refused_on_a_cluster():
    from helpers_platform import platform_sections

    raw = {"server": {"secret": TEST_SECRET}, "redis": {"cluster": True, "url": "redis://h:7000"},
           **platform_sections("http://127.0.0.1:1")}
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(raw), env={}, source="test")
    assert str(e.value).startswith("accounts.myplatform: a third-party platform (kind: component) needs a single Redis")


def test_a_prefix_holding_a_whole_hash_tag_is_taken_on_a_cluster():
    raw = {"server": {"secret": TEST_SECRET}, "redis": {"cluster": True, "url": "redis://h:7000", "prefix": "{wechat}:"},
           "sources": sandbox_sources("http://127.0.0.1:1")}
    assert parse_config(yaml.safe_dump(raw), env={}, source="test").redis.prefix == "{wechat}:"


@pytest.mark.gen_test(timeout=60)
async def test_serves_tokens_with_every_key_of_a_source_in_one_slot(cluster, make_config, sandbox_url, start_server, call, sandbox):
    running = await start_server(cluster_config(make_config, cluster, sandbox_url, refresh={"force_min_interval": 0}))
    status, body = await call(running.port, "/wechat/token", type="access_token")
    assert status == 200 and body["access_token"] == sandbox.current_token()
    token = body["access_token"]

    # A direct reader: redis-cli -c on a master that does not hold the slot follows the MOVED.
    other = next(p for p in cluster.masters() if p != cluster.master_of("access_token"))
    out = subprocess.run([find_redis_cli(), "-c", "-p", str(other), "GET", "access_token"], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == token

    # A failed forced refresh writes the backoff keys; a wrong secret counts in a rate limit.
    sandbox.inject(TOKEN_PATH, "busy")
    status, _ = await call(running.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 503
    status, _ = await call(running.port, "/wechat/token", headers={"X-Token-Secret": "x" * 40}, type="access_token")
    assert status in (401, 403)

    everything = cluster.keys()
    by_source = {name: {k: port for k, port in everything.items() if k == name or k.startswith("{" + name + "}:")} for name in SOURCES}
    for name, keys in by_source.items():
        assert {_crc_slot(k) for k in keys} == {_crc_slot(name)}, f"{name}: keys in several slots: {sorted(keys)}"
        assert len(set(keys.values())) == 1, f"{name}: keys on several masters"
        assert {"{%s}:meta" % name, name} <= set(keys), sorted(keys)
        assert any(k.startswith("{%s}:calls:" % name) for k in keys), sorted(keys)
    assert {"{access_token}:backoff", "{access_token}:failures"} <= set(by_source["access_token"])
    assert len({port for keys in by_source.values() for port in keys.values()}) == 2  # the sources span two masters
    rest = set(everything) - {k for keys in by_source.values() for k in keys}
    assert rest and all(k.startswith("wechat-token:limits:") for k in rest), sorted(rest)

    # What spans sources spans nodes: a pipeline split by node, one script per source.
    store = running.store
    held = await store.acquire("wx_card_ticket", 5)
    assert held is not None
    holders = await store.lock_holders(list(SOURCES))
    assert holders == {"access_token": None, "ticket": None, "wx_card_ticket": store.instance}
    await store.release("wx_card_ticket", held.token)
    versions = await store.versions(list(SOURCES))
    assert all(v is not None and v[0] > 0 and v[1] > 6000 for v in versions.values()), versions
    status, body = await call(running.port, "/status")
    assert status == 200
    assert {n: s["calls_today"] for n, s in body["sources"].items()} == {"access_token": 2, "ticket": 1, "wx_card_ticket": 1}


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_two_instances_make_one_upstream_call_per_rotation(cluster, make_config, sandbox_url, start_server, sandbox):
    # Both start while the first token call hangs: the second waits for the first's value.
    sandbox.inject(TOKEN_PATH, "hang", delay=1.0)
    sandbox.expires_in = 5  # with ahead 2.5: a rotation about every 2.5 s
    cfg = cluster_config(
        make_config, cluster, sandbox_url,
        server={"forcerefresh_per_minute": 100000},
        refresh={"interval": 0.25, "ahead": 2.5, "force_min_interval": 0},
    )
    a, b = await asyncio.gather(start_server(cfg), start_server(cfg))
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 2)  # two tickets
    reader = cluster_client(cluster)
    try:
        seen: list[str] = []
        end = time.monotonic() + 6
        while time.monotonic() < end:
            value = reader.get("access_token")
            if value and (not seen or seen[-1] != value):
                seen.append(value)
            await asyncio.sleep(0.05)
        await wait_until(lambda: not reader.exists("{access_token}:lock"), 5, "no fetch in flight")
        if reader.get("access_token") != seen[-1]:
            seen.append(reader.get("access_token"))
        assert len(seen) >= 3, f"expected two rotations in 6 s, saw {len(seen)} values"
        assert sandbox.calls[TOKEN_PATH] == len(seen), f"{sandbox.calls[TOKEN_PATH]} upstream calls for {len(seen)} values"

        # A crowd of forced refreshes naming the value they saw, across both instances: one call.
        current = reader.get("access_token")
        calls = sandbox.calls[TOKEN_PATH]
        sandbox.inject(TOKEN_PATH, "hang", delay=0.5)
        client = AsyncHTTPClient(force_instance=True, max_clients=100)
        try:
            answers = await asyncio.gather(*(
                client.fetch(f"http://127.0.0.1:{(a, b)[i % 2].port}/wechat/token/forcerefresh?type=access_token&old={current}",
                             headers={"X-Token-Secret": TEST_SECRET}, raise_error=False)
                for i in range(60)
            ))
        finally:
            client.close()
        assert {r.code for r in answers} == {200}
        assert sandbox.calls[TOKEN_PATH] == calls + 1, f"60 forced refreshes made {sandbox.calls[TOKEN_PATH] - calls} calls"
        assert reader.get("access_token") == sandbox.current_token() != current
    finally:
        reader.close()


@pytest.mark.gen_test(timeout=90)
async def test_failover_of_the_tokens_master_keeps_reads_and_makes_no_call(fresh_redis_cluster, make_config, sandbox_url, start_server, call, sandbox):
    cluster = fresh_redis_cluster
    master = cluster.master_of("access_token")
    replica = cluster.replica_of(master)
    # The seed URL is the master about to die: it is only needed to start.
    cfg = make_config(redis={"url": cluster.node(master).url, "cluster": True, "socket_timeout": 0.5},
                      sources=sources(sandbox_url), refresh={"interval": 0.25, "force_min_interval": 0})
    running = await start_server(cfg)
    status, body = await call(running.port, "/wechat/token", type="access_token")
    assert status == 200
    token = body["access_token"]
    with cluster.client(master) as m:
        version = int(m.hget("{access_token}:meta", "version"))
    with cluster.client(replica) as r:
        r.execute_command("READONLY")
        await wait_until(lambda: r.get("access_token") == token and r.hget("{access_token}:meta", "version") == str(version), 5,
                         "the value to reach the replica")

    # Load on the store meanwhile, as the refresher, the status page and readers make it: every
    # failure must be a RedisError (what callers fall back on), never another exception.
    names = list(SOURCES)
    unexpected: list[str] = []
    done = False

    store = running.store
    calls = (lambda: store.versions(names), lambda: store.read(names[0]), lambda: store.lock_holders(names))

    async def load(i: int) -> None:
        while not done:
            try:
                await calls[i % 3]()
            except redis.RedisError:
                pass
            except Exception as e:  # noqa: BLE001 (the test collects what escapes)
                unexpected.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.01)

    workers = [asyncio.ensure_future(load(i)) for i in range(30)]
    cluster.node(master).process.kill()  # SIGKILL: no goodbye to the cluster
    cluster.node(master).process.wait()
    killed = time.monotonic()
    reads = 0
    while True:
        status, body = await call(running.port, "/wechat/token", type="access_token")
        assert (status, body.get("access_token")) == (200, token), f"read {reads} during the failover -> {status} {body}"
        reads += 1
        if cluster.master_of("access_token") == replica:
            break
        assert time.monotonic() - killed < 30, "the replica was not promoted within 30 s"
        await asyncio.sleep(0.1)
    took = time.monotonic() - killed
    logging.getLogger(__name__).info("failover: the replica was promoted %.1fs after the kill; %d reads meanwhile, all served", took, reads)
    assert reads > 5, f"the failover took {took:.1f}s: the reads above ran without the master"
    # Reads go on once the server found the new master (reads skip Redis a second after an error).
    for _ in range(20):
        status, body = await call(running.port, "/wechat/token", type="access_token")
        assert (status, body.get("access_token")) == (200, token)
        await asyncio.sleep(0.1)
    done = True
    await asyncio.gather(*workers)
    assert unexpected == []
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 2), "the failover cost an upstream call"

    # The next rotation lands in the new master, its version above the one before.
    status, body = await call(running.port, "/wechat/token/forcerefresh", type="access_token")
    assert status == 200, body
    rotated = body["access_token"]
    assert rotated != token and rotated == sandbox.current_token()
    with cluster.client(replica) as new:
        assert new.get("access_token") == rotated
        assert int(new.hget("{access_token}:meta", "version")) > version
    assert sandbox.calls[TOKEN_PATH] == 2


@pytest.mark.gen_test(timeout=60)
async def test_a_plain_layout_is_adopted_with_its_version_and_no_call(cluster, redis_url, redis_sync, make_config, sandbox_url, io_loop, call, sandbox):
    # A single Redis's layout, written by a real server without redis.cluster ...
    plain = await start(_free_port(make_config(sources=sources(sandbox_url))))
    await stop(plain, 1.0)
    token, ticket = redis_sync.get("access_token"), redis_sync.get("ticket")
    version = int(redis_sync.hget("access_token:meta", "version"))
    assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 2)
    # ... copied into the cluster by a migration tool (DUMP / RESTORE keeps names and TTLs).
    target = cluster_client(cluster)
    copier = redis.Redis.from_url(redis_url)
    try:
        for key in redis_sync.scan_iter():
            target.restore(key, max(0, copier.pttl(key)), copier.dump(key), replace=True)
        assert target.get("access_token") == token and not target.exists("{access_token}:meta")

        running = await start(_free_port(cluster_config(make_config, cluster, sandbox_url, refresh={"force_min_interval": 0})))
        try:
            status, body = await call(running.port, "/wechat/token", type="access_token")
            assert (status, body["access_token"]) == (200, token)
            status, body = await call(running.port, "/wechat/token", type="ticket")
            assert (status, body["ticket"]) == (200, ticket)
            assert (sandbox.calls[TOKEN_PATH], sandbox.calls[TICKET_PATH]) == (1, 2), "adopting the layout called upstream"
            assert int(target.hget("{access_token}:meta", "version")) == version
            assert target.hget("{ticket}:meta", "field") == "ticket"
            # The order of versions carries on: the next value's is above the adopted one.
            status, body = await call(running.port, "/wechat/token/forcerefresh", type="access_token")
            assert status == 200 and body["access_token"] != token
            assert int(target.hget("{access_token}:meta", "version")) > version
            assert sandbox.calls[TOKEN_PATH] == 2
        finally:
            await stop(running, 1.0)
    finally:
        target.close()
        copier.close()


def _free_port(cfg):
    import dataclasses

    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))


@pytest.mark.gen_test(timeout=30)
async def test_startup_refuses_a_cluster_node_without_cluster_and_a_plain_redis_with_it(cluster, redis_url, make_config):
    with pytest.raises(StartupError, match="is a node of a Redis Cluster; set redis.cluster: true"):
        await start(_free_port(make_config(redis={"url": cluster.url})))
    with pytest.raises(StartupError, match="Cluster mode is not enabled"):
        await start(_free_port(make_config(redis={"url": redis_url, "cluster": True})))


@pytest.mark.gen_test(timeout=30)
async def test_a_rate_limit_holds_across_instances_on_a_cluster(cluster):
    clients = [build_redis(RedisConfig(url=cluster.url, cluster=True)) for _ in range(2)]
    try:
        a, b = (SharedLimit(c, "p:", "forcerefresh", 3) for c in clients)
        for limit in (a, b, a):
            assert await limit.hit("shop/access_token") == 0.0
        assert 0 < await b.hit("shop/access_token") <= 60  # the fourth, in the other instance
        assert await b.hit("shop/ticket") == 0.0
        assert any(k.startswith("p:wechat-token:limits:") for k in cluster.keys())
    finally:
        for c in clients:
            await c.aclose(close_connection_pool=True)


@pytest.mark.gen_test(timeout=30)
async def test_publish_in_a_script_reaches_subscribers_on_every_node(cluster):
    """What the rotation events need: a PUBLISH inside a script on the slot's master reaches a
    plain SUBSCRIBE on any node (Redis Cluster broadcasts PUBLISH over its bus), and so does our
    client's cluster pubsub, even as the client's first command."""
    client = build_redis(RedisConfig(url=cluster.url, cluster=True))
    subscribers = []
    try:
        for node in cluster.running():
            sub = cluster.client(node.port).pubsub()
            sub.subscribe("wechat-token:events")
            assert sub.get_message(timeout=2)["type"] == "subscribe"
            subscribers.append(sub)
        mine = client.pubsub()  # before any command: it reads the slot map itself (redis-py's: KeyError)
        await mine.subscribe("wechat-token:events")
        script = client.register_script("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('PUBLISH', ARGV[2], ARGV[1])")
        local = await script(keys=["access_token"], args=["v1", "wechat-token:events"])
        assert local in (1, 2)  # PUBLISH counts the publishing node's subscribers only (7 in all)
        for sub in subscribers:
            message = sub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None and message["data"] == "v1"
        deadline = time.monotonic() + 2
        message = None
        while message is None and time.monotonic() < deadline:
            message = await mine.get_message(ignore_subscribe_messages=True, timeout=0.5)
        assert message is not None and message["data"] == "v1"
        await mine.aclose()
    finally:
        for sub in subscribers:
            sub.close()
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_fresh_client_serves_a_burst_of_first_commands(cluster):
    """A server (re)started under load: its clients' first commands come all at once.  (redis-py
    8.1 alone routes commands sent before it read the slot map to arbitrary nodes, and then
    closes connections in use: some of them failed with AttributeError.)"""
    client = build_redis(RedisConfig(url=cluster.url, cluster=True))
    limit = SharedLimit(client, "", "auth-failures", 1000)
    try:
        answers = await asyncio.gather(*(limit._shared.get_window_stats(limit.item, "auth-failures", f"ip{i % 5}") for i in range(40)),
                                       return_exceptions=True)
        assert [a for a in answers if isinstance(a, BaseException)] == []
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_rotation_events_reach_a_subscriber_after_the_channels_master_fails(fresh_redis_cluster):
    """The events subscriber (server.ops.events) on our cluster client: a value stored by the
    write script is announced (PUBLISH inside the script, on the value's master) to the
    subscriber (on the channel's master), before and after that master fails over."""
    cluster = fresh_redis_cluster
    channel = events_channel("")
    client = build_redis(RedisConfig(url=cluster.url, cluster=True, socket_timeout=0.5))
    store = Store(client, "")
    await store.ping()
    subscriber = Subscriber(client, channel)
    seen: list[dict] = []

    async def keep(event) -> None:
        seen.append(event.as_dict())

    subscriber.listen(keep)
    version = 1

    async def rotate() -> int:
        nonlocal version
        version += 1
        now = time.monotonic()
        assert await store.write("access_token", Entry(f"value-{version}", now + 100, now, version, "access_token"))
        return version

    try:
        await subscriber.start()
        assert subscriber.subscribed.is_set()
        v = await rotate()
        await wait_until(lambda: any(e["version"] == v for e in seen), 5, "the first event")

        master = cluster.master_of(channel)
        replica = cluster.replica_of(master)
        cluster.node(master).process.kill()
        cluster.node(master).process.wait()
        killed = time.monotonic()
        await wait_until(lambda: cluster.master_of(channel) == replica, 30, "the channel's replica to be promoted")
        await wait_until(lambda: subscriber.subscribed.is_set(), 20, "the subscriber to subscribe again")
        logging.getLogger(__name__).info("events: subscribed again %.1fs after the channel's master was killed", time.monotonic() - killed)
        v = await rotate()
        await wait_until(lambda: any(e["version"] == v for e in seen), 5, "an event after the failover")
    finally:
        await subscriber.stop()
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_webhook_with_the_value_reads_it_from_the_cluster(cluster, make_config, sandbox_url, start_server, receiver):  # noqa: F811
    """Webhooks (server.ops.webhooks) read the value and its version together: in one slot."""
    hooked = sources(sandbox_url)
    hooked["access_token"]["notify"] = [{"url": receiver.url + "/with-value", "secret": HOOK_SECRET, "include_value": True}]
    await start_server(make_config(redis={"url": cluster.url, "cluster": True}, sources=hooked))
    await wait_until(lambda: receiver.accepted(), 5, "the first value's event")
    event = receiver.accepted()[0].event(HOOK_SECRET)
    reader = cluster_client(cluster)
    try:
        assert event["event"] == "rotated" and event["source"] == "access_token"
        assert event["value"] == reader.get("access_token") and event["value"]
        assert any(k.startswith("wechat-token:webhook:") for k in cluster.keys())  # the claim: one key, any slot
    finally:
        reader.close()


def test_key_names_are_spelled_by_store_keys_only():
    """A key name spelled by hand (``key + ":meta"``) is the plain layout's, wrong on a cluster
    (twice so far: webhooks read no value and then dropped every event).  A tripwire: no module
    but server/store.py writes an auxiliary key's suffix (and server/platform/keys.py, the
    platform's one naming place, whose keys are tagged on every Redis)."""
    import pathlib
    import re

    parts = "meta|lock|blocked|backoff|failures|lost|rejected|slow|calls"
    spelled = re.compile(rf"""(\+\s*["']:({parts})\b)|(["']:({parts})["':])|(\}}:({parts})[:"'])""")
    root = pathlib.Path(__file__).resolve().parent.parent / "server"
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}"
             for path in root.rglob("*.py") if path.name != "store.py" and path.relative_to(root).as_posix() != "platform/keys.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if spelled.search(line) and not line.lstrip().startswith("#") and "``" not in line]  # not docs
    assert found == [], "spell auxiliary keys with server.store.Keys.aux:\n" + "\n".join(found)
