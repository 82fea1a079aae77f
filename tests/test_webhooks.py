"""Webhooks (server.ops.webhooks): one signed POST per event across instances, retried, reloaded.

The receiver is a real Tornado server on the test's loop; the senders are real token_server.py
processes (or the in-process pipeline), the upstream the sandbox, Redis a real redis-server.
Deliveries are checked with the README's own verification snippet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import re
import signal
import time
from typing import Any

import pytest
import tornado.web
import yaml
from conftest import AUTH, serve_app
from helpers_procs import proc_config, sandbox_sources, wait_until

from server.config import ConfigError
from server.config_file import parse_config
from server.ops.reload import apply
from server.redact import config_secrets
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, TOKEN_PATH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_SECRET = "hook-secret-for-the-tests-0123456789"
OTHER_SECRET = "another-hook-secret-9876543210"


def readme_verify() -> Any:
    """``verify(secret, body, signature)`` as the README's Webhooks section writes it."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Webhooks"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README's Webhooks section has no python snippet"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["verify"]


verify = readme_verify()


@dataclasses.dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    def event(self, secret: str = HOOK_SECRET) -> dict[str, Any]:
        event = verify(secret, self.body, self.headers.get("X-Signature", ""))
        assert event is not None, f"bad signature on {self.path}: {self.headers.get('X-Signature')}"
        return event


class Receiver:
    """Every POST it gets; answers ``answers`` in turn (then 200); ``hold`` keeps answers back while clear."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.deliveries: list[Delivery] = []
        self.hold: asyncio.Event | None = None
        self.url = ""

    def accepted(self, path: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if d.status == 200 and (path is None or d.path == path)]


class _Hook(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        r = self.receiver
        status = r.answers.pop(0) if r.answers else 200
        r.deliveries.append(Delivery(self.request.path, dict(self.request.headers), self.request.body, status, time.monotonic()))
        if r.hold is not None:
            await r.hold.wait()
        self.set_status(status)
        self.finish("ok" if status == 200 else "no")


@pytest.fixture
def receiver(io_loop: Any) -> Any:
    r = Receiver()
    server, port = serve_app(tornado.web.Application([(r"/.*", _Hook, {"receiver": r})]))
    r.url = f"http://127.0.0.1:{port}"
    yield r
    if r.hold is not None:
        r.hold.set()
    server.stop()


@pytest.fixture(autouse=True)
def hook_secrets_watched(secret_watch: Any) -> None:
    """The session's log check looks for the hook secrets too."""
    secret_watch.secrets.update({HOOK_SECRET, OTHER_SECRET})


def hooked_sources(sandbox_url: str, hook_url: str, secret: str = "${HOOK_SECRET}", **hook: Any) -> dict[str, Any]:
    """The usual two sources (declared by hand), access_token with one hook."""
    sources = sandbox_sources(sandbox_url)
    sources["access_token"]["notify"] = [{"url": hook_url, "secret": secret, **hook}]
    return sources


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


# --- several instances ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_one_signed_post_per_rotation_across_three_instances(token_servers, sandbox, sandbox_url, redis_url, redis_sync, receiver):
    sandbox.expires_in = 5  # with ahead 3: a rotation about every 2 s
    cfg = proc_config(redis_url, sandbox_url, refresh={"interval": 0.3, "ahead": 3, "max_ttl": 7000},
                      sources=hooked_sources(sandbox_url, receiver.url + "/hook?channel=ops"))
    procs = [token_servers(cfg, f"ts{i}") for i in range(3)]
    for p in procs:
        p.extra_env["HOOK_SECRET"] = HOOK_SECRET
        p.start()
    await asyncio.gather(*(p.wait_ready() for p in procs))
    await asyncio.sleep(5.5)
    sandbox.expires_in = 7200  # the next value lives long: rotations stop
    await wait_until(lambda: int(redis_sync.ttl("access_token")) > 10, 5, "a long-lived value")
    await wait_until(lambda: not redis_sync.exists("access_token:lock"), 5, "no fetch in flight")
    calls = sandbox.calls[TOKEN_PATH]
    await wait_until(lambda: len(receiver.deliveries) >= calls, 5, f"{calls} deliveries")
    await asyncio.sleep(0.5)  # a duplicate, if any, would arrive by now

    events = [d.event() for d in receiver.deliveries]  # every one signed with the hook's secret
    assert calls >= 3, "expected several rotations"
    # exactly one POST per upstream call, whichever of the three processes fetched or sent it
    assert len(events) == calls, [e["id"] for e in events]
    assert len({e["id"] for e in events}) == len(events)
    assert all(e["event"] == "rotated" and e["source"] == "access_token" for e in events)  # the ticket has no hook
    assert [e["version"] for e in sorted(events, key=lambda e: e["version"])][-1] == int(redis_sync.hget("access_token:meta", "version"))
    for d, e in zip(receiver.deliveries, events, strict=True):
        assert d.path == "/hook" and d.headers["Content-Type"] == "application/json"
        assert d.headers["X-Webhook-Id"] == e["id"] and d.headers["X-Webhook-Attempt"] == "1"
        assert "value" not in e  # include_value is off by default
        assert not any(v in d.body.decode() for v in sandbox.issued_values())
    # the claim names its sender
    claims = redis_sync.keys("wechat-token:webhook:*")
    assert len(claims) == calls
    assert all(re.fullmatch(r".+:\d+", redis_sync.get(k)) for k in claims)
    for p in procs:
        assert HOOK_SECRET not in p.log() and "channel=ops" not in p.log()


@pytest.mark.gen_test(timeout=60)
async def test_a_receiver_failing_twice_gets_the_event_once_from_one_instance(token_servers, sandbox, sandbox_url, redis_url, receiver):
    receiver.answers = [500, 500]
    cfg = proc_config(redis_url, sandbox_url, sources=hooked_sources(sandbox_url, receiver.url + "/hook"))
    procs = [token_servers(cfg, f"ts{i}") for i in range(3)]
    for p in procs:
        p.extra_env["HOOK_SECRET"] = HOOK_SECRET
        p.start()
    await asyncio.gather(*(p.wait_ready() for p in procs))
    await wait_until(lambda: receiver.accepted(), 10, "the delivery accepted")
    await asyncio.sleep(1.5)  # nothing more comes

    assert sandbox.calls[TOKEN_PATH] == 1
    assert [d.status for d in receiver.deliveries] == [500, 500, 200]
    assert [d.headers["X-Webhook-Attempt"] for d in receiver.deliveries] == ["1", "2", "3"]
    assert len({d.headers["X-Webhook-Id"] for d in receiver.deliveries}) == 1
    assert len({d.body for d in receiver.deliveries}) == 1  # the same signed body each time
    receiver.deliveries[-1].event()
    # backoff: 1 s, then 2 s
    gaps = [b.at - a.at for a, b in itertools.pairwise(receiver.deliveries)]
    assert 0.9 < gaps[0] < 3.0 and 1.9 < gaps[1] < 5.0, gaps  # loose upper bounds: 2 shared cores
    # one instance did it all, and says so in /metrics and its log
    pages = [(await p.get("/metrics"))[1] for p in procs]
    assert sum(metric(t, "wechat_token_webhook_delivered_total") for t in pages) == 1
    assert sum(metric(t, "wechat_token_webhook_retries_total") for t in pages) == 2
    assert sum(metric(t, "wechat_token_webhook_failed_total") for t in pages) == 0
    (i,) = [i for i, t in enumerate(pages) if metric(t, "wechat_token_webhook_delivered_total") == 1]
    assert metric(pages[i], "wechat_token_webhook_retries_total") == 2
    log = procs[i].log()
    assert re.search(r"webhook http://127\.0\.0\.1:\d+/hook: rotated event \w+ of access_token, attempt 1 failed \(HTTP 500\); next in 1s", log)
    assert "delivered (attempt 3)" in log
    assert all(HOOK_SECRET not in p.log() for p in procs)  # (the fixture checks the request secret and every token)


# --- one instance: the body, accounts, reload, shutdown ---------------------------------------


def account(sandbox_url: str, **extra: Any) -> dict[str, Any]:
    return {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "api_base": sandbox_url, **extra}


@pytest.mark.gen_test(timeout=30)
async def test_an_accounts_hooks_get_every_event_of_its_sources_and_the_value_only_when_asked(
        make_config, start_server, call, sandbox, sandbox_url, redis_sync, receiver):
    hooks = [
        {"url": receiver.url + "/plain", "secret": HOOK_SECRET},
        {"url": receiver.url + "/with-value", "secret": OTHER_SECRET, "include_value": True},
    ]
    cfg = make_config(sources={}, accounts={"main": account(sandbox_url, tickets=["jsapi"], notify=hooks)},
                      refresh={"force_min_interval": 0})
    running = await start_server(cfg)
    await wait_until(lambda: len(receiver.accepted()) == 4, 5, "token and ticket, to both hooks")

    plain = [d.event(HOOK_SECRET) for d in receiver.accepted("/plain")]
    valued = [d.event(OTHER_SECRET) for d in receiver.accepted("/with-value")]
    assert sorted(e["source"] for e in plain) == ["access_token", "ticket"]
    assert all(e["account"] == "main" and "value" not in e for e in plain)
    assert {e["source"]: e["value"] for e in valued} == {"access_token": redis_sync.get("access_token"), "ticket": redis_sync.get("ticket")}
    # each hook verifies with its own secret only
    assert verify(HOOK_SECRET, receiver.accepted("/with-value")[0].body, receiver.accepted("/with-value")[0].headers["X-Signature"]) is None

    # a block is told too, and never with a value
    sandbox.inject(TOKEN_PATH, "errcode", errcode=40125, times=None)
    token = redis_sync.get("access_token")
    status, _ = await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=token)
    assert status == 503
    await wait_until(lambda: len(receiver.accepted()) == 6, 5, "the blocked event to both hooks")
    blocked = [d.event(OTHER_SECRET) for d in receiver.accepted("/with-value")][-1]
    assert blocked["event"] == "blocked" and "value" not in blocked


@pytest.mark.gen_test(timeout=30)
async def test_hooks_follow_a_reload(make_config, start_server, call, sandbox, sandbox_url, redis_sync, receiver):
    cfg = make_config(refresh={"force_min_interval": 0})
    running = await start_server(cfg)
    await asyncio.sleep(0.3)
    assert receiver.deliveries == []  # no hooks yet

    hooked = make_config(sources=hooked_sources(sandbox_url, receiver.url + "/a", HOOK_SECRET), refresh={"force_min_interval": 0})
    changes = await apply(running.service, hooked)
    assert changes["changed"] == [] and changes["added"] == []  # hooks are no part of a source's request
    status, _ = await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=redis_sync.get("access_token"))
    assert status == 200
    await wait_until(lambda: receiver.accepted("/a"), 5, "the first delivery after the reload")
    assert receiver.accepted("/a")[0].event()["version"] == int(redis_sync.hget("access_token:meta", "version"))

    await apply(running.service, cfg)  # hooks removed
    status, _ = await call(running.port, "/wechat/token/forcerefresh", headers=AUTH, type="access_token", old=redis_sync.get("access_token"))
    assert status == 200
    await asyncio.sleep(0.5)
    assert len(receiver.deliveries) == 1
    assert sandbox.calls[TOKEN_PATH] == 3


@pytest.mark.gen_test(timeout=30)
async def test_a_delivery_unfinished_at_shutdown_is_dropped_and_stays_claimed(make_config, start_server, sandbox_url, redis_sync, receiver, secret_watch):
    from server.app import stop

    receiver.hold = asyncio.Event()  # the receiver never answers
    cfg = make_config(sources={}, accounts={"main": account(sandbox_url, notify=[{"url": receiver.url + "/slow?k=v", "secret": HOOK_SECRET}])})
    running = await start_server(cfg)
    await wait_until(lambda: receiver.deliveries, 5, "the POST under way")
    since = len(secret_watch.records)
    started = time.monotonic()
    await stop(running, 1.0)
    assert time.monotonic() - started < 4  # a bounded wait, not the 10 s request timeout
    dropped = [line for line in secret_watch.records[since:] if "dropped at shutdown" in line]
    assert len(dropped) == 1 and "/slow:" in dropped[0] and "k=v" not in dropped[0], dropped
    page = running.refresher.metrics.render().decode()
    assert 'wechat_token_webhook_failed_total{reason="shutdown",source="access_token"} 1.0' in page
    assert len(redis_sync.keys("wechat-token:webhook:*")) == 1  # the claim stays: no other instance sends it


@pytest.mark.gen_test(timeout=30)
async def test_a_superseded_value_is_sent_as_null_and_a_full_process_claims_nothing(make_config, sandbox_url, redis_url, redis_sync, receiver):
    import redis.asyncio as aioredis

    from server.metrics import Metrics
    from server.ops.events import Event
    from server.ops.webhooks import Webhooks

    hook = {"url": receiver.url + "/v", "secret": HOOK_SECRET, "include_value": True}
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    hooks = Webhooks(client, "", "test:1", Metrics(), max_pending=1)
    hooks.configure(make_config(sources=hooked_sources(sandbox_url, hook.pop("url"), **hook)))
    redis_sync.set("access_token", "the-stored-value-v5")
    redis_sync.hset("access_token:meta", "version", "5")
    try:
        await hooks.on_event(Event("rotated", "access_token", None, "old4", 4, 1.0))
        await wait_until(lambda: receiver.accepted(), 5, "the older event")
        await hooks.on_event(Event("rotated", "access_token", None, "new5", 5, 2.0))
        await wait_until(lambda: len(receiver.accepted()) == 2, 5, "the newer event")
        assert [(d.event()["id"], d.event()["value"]) for d in receiver.accepted()] == [("old4", None), ("new5", "the-stored-value-v5")]
        await hooks.on_event(Event("rotated", "ticket", None, "t1", 6, 2.0))  # a source without hooks
        # one delivery under way fills this process: the next event is left to the other instances
        receiver.hold = asyncio.Event()
        await hooks.on_event(Event("blocked", "access_token", None, "b6", 5, None))
        await hooks.on_event(Event("unblocked", "access_token", None, "u7", 5, None))
        await wait_until(lambda: len(receiver.deliveries) == 3, 5, "the held delivery")
        assert redis_sync.exists("wechat-token:webhook:b6:" + hooks.hooks["access_token"][0].id)
        assert redis_sync.keys("wechat-token:webhook:u7:*") == []  # not claimed
        assert 'wechat_token_webhook_failed_total{reason="overflow",source="access_token"} 1.0' in hooks.metrics.render().decode()
        receiver.hold.set()
    finally:
        await hooks.stop(1.0)
        await client.aclose()
    assert len(receiver.deliveries) == 3


# --- config ---------------------------------------------------------------------------------

BASE = {
    "server": {"secret": "a-long-random-request-secret-42"},
    "sources": {"access_token": {"url": "https://api.weixin.qq.com/cgi-bin/token", "args": {"appid": "wx0a1b2c3d4e5f6a7b", "secret": "s" * 32}}},
}


def with_hooks(*hooks: dict[str, Any], where: str = "source") -> str:
    raw = json.loads(json.dumps(BASE))
    if where == "source":
        raw["sources"]["access_token"]["notify"] = list(hooks)
    else:
        raw["sources"] = {}
        raw["accounts"] = {"main": {"appid": "wx0a1b2c3d4e5f6a7b", "secret": "s" * 32, "notify": list(hooks)}}
    return yaml.safe_dump(raw)


GOOD = {"url": "https://hooks.example.com/t", "secret": HOOK_SECRET}


REFUSED = [
    (with_hooks({**GOOD, "url": "ftp://hooks.example.com/t"}), "sources.access_token.notify[0].url: must be an http:// or https:// URL"),
    (with_hooks({**GOOD, "url": "hooks.example.com/t"}), "sources.access_token.notify[0].url: must be an http:// or https:// URL"),
    (with_hooks({**GOOD, "url": "https://u:p@hooks.example.com/t"}), "sources.access_token.notify[0].url: no user:password@"),
    (with_hooks({"url": GOOD["url"]}), "sources.access_token.notify[0].secret: missing; HMAC-SHA256 key"),
    (with_hooks({**GOOD, "secret": "change-me"}), "sources.access_token.notify[0].secret: is a placeholder"),
    (with_hooks({**GOOD, "secret": ""}), "sources.access_token.notify[0].secret: empty; set a random secret of at least 16 characters, e.g. ${HOOK_SECRET}"),
    (with_hooks({**GOOD, "secret": "short-but-random"[:12]}), "sources.access_token.notify[0].secret: shorter than 16"),
    (with_hooks({**GOOD, "secret": "a-long-random-request-secret-42"}), "sources.access_token.notify[0].secret: same as server.secret"),
    (with_hooks(GOOD, dict(GOOD)), "sources.access_token.notify[1].url: listed twice"),
    (with_hooks({**GOOD, "url": "http://hooks.example.com/t", "include_value": True}), "sources.access_token.notify[0].include_value: would send the token in clear"),
    (with_hooks({**GOOD, "include": True}), "sources.access_token.notify[0].include: unknown key"),
    (with_hooks({**GOOD, "include_value": "yes"}), "sources.access_token.notify[0].include_value: must be true or false"),
    (with_hooks({**GOOD, "url": "ftp://x"}, where="account"), "accounts.main.notify[0].url: must be an http:// or https:// URL"),
    (with_hooks({**GOOD, "secret": "password"}, where="account"), "accounts.main.notify[0].secret: is a placeholder"),
]


@pytest.mark.parametrize("text, expected", REFUSED, ids=[f"{i}-{e.split(': ')[1][:20]}" for i, (_, e) in enumerate(REFUSED)])
def test_bad_hooks_are_refused_with_one_line_naming_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, env={}, source="test")
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)
    assert HOOK_SECRET not in str(e.value)


def test_good_hooks_pass_and_their_secrets_are_masked() -> None:
    local = {"url": "http://127.0.0.1:9000/t", "secret": OTHER_SECRET, "include_value": True}  # http: this host only
    cfg = parse_config(with_hooks(GOOD, local), env={}, source="test")
    assert [h.include_value for h in cfg.sources["access_token"].notify] == [False, True]
    assert {HOOK_SECRET, OTHER_SECRET} <= set(config_secrets(cfg))
    assert HOOK_SECRET not in repr(cfg)
    cfg = parse_config(with_hooks(GOOD, where="account"), env={}, source="test")
    assert HOOK_SECRET in config_secrets(cfg) and HOOK_SECRET not in repr(cfg)


def test_the_examples_commented_hook_passes_check() -> None:
    lines = open(os.path.join(ROOT, "config.example.yaml"), encoding="utf-8").read().splitlines()
    start = lines.index("#     notify:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    main = "    appid: wx0a1b2c3d4e5f6a7b\n    secret: ${MAIN_APPSECRET}\n"
    text = "server: {secret: a-long-random-request-secret-42}\naccounts:\n  main:\n" + main + "\n".join(block) + "\n"
    cfg = parse_config(text, env={"MAIN_APPSECRET": "s" * 32, "HOOK_SECRET": HOOK_SECRET}, source="example")
    assert [h.url for h in cfg.accounts["main"].notify] == ["https://hooks.example.com/wechat-token"]


# --- an adversarial review's findings (each failed before its fix) ---------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_message_that_is_not_utf8_does_not_end_the_subscription(token_servers, sandbox, sandbox_url, redis_url, redis_sync, receiver):
    """Anyone who may PUBLISH on Redis (any direct reader with the password) sends one message
    that is not UTF-8: redis-py (decode_responses=True) raises UnicodeDecodeError from
    get_message, which Subscriber._run does not catch (only RedisError, OSError): the
    subscription task dies for good, ``subscribed`` stays set (the mirror keeps believing
    events are live), no webhook is ever sent again, and Subscriber.stop() re-raises the
    error at shutdown, so SIGTERM ends in a traceback and exit 1 (server/ops/events.py _run,
    stop)."""
    cfg = proc_config(redis_url, sandbox_url, refresh={"force_min_interval": 0}, sources=hooked_sources(sandbox_url, receiver.url + "/hook"))
    proc = token_servers(cfg, "hooked")
    proc.extra_env["HOOK_SECRET"] = HOOK_SECRET
    proc.start()
    await proc.wait_ready()
    await wait_until(lambda: len(receiver.accepted()) == 1, 10, "the first value's delivery")

    redis_sync.publish("wechat-token:events", b"\xff not an event")  # "nothing here trusts the shape"
    await asyncio.sleep(0.5)

    old = redis_sync.get("access_token")
    status, _ = await proc.get("/wechat/token/forcerefresh", type="access_token", old=old)
    assert status == 200
    problems = []
    try:
        await wait_until(lambda: len(receiver.accepted()) == 2, 5, "the rotation's delivery")
    except AssertionError as e:
        problems.append(f"no webhook for the rotation after the bad message ({e})")
    code = await proc.stop(signal.SIGTERM)
    if code != 0:
        problems.append(f"SIGTERM exit code {code}; log tail:\n{proc.log_tail(6)}")
    assert not problems, "\n".join(problems)


@pytest.mark.gen_test(timeout=60)
async def test_a_forged_event_is_not_sent_to_the_hooks(token_servers, sandbox, sandbox_url, redis_url, redis_sync, receiver):
    """Anyone who may PUBLISH on Redis makes every hook receive, signed with the hook's own
    secret, an event no stored change made: here a "rotated" with a version far above any real
    one.  A receiver that follows the README ("ignore a rotated whose version is not above the
    last one seen") then ignores every real rotation for good.  The webhooks trust the message
    as published (server/ops/webhooks.py on_event; server/ops/events.py parse_event checks the
    shape only), never Redis's ``NAME:meta`` version."""
    import json

    cfg = proc_config(redis_url, sandbox_url, sources=hooked_sources(sandbox_url, receiver.url + "/hook"))
    proc = token_servers(cfg, "hooked")
    proc.extra_env["HOOK_SECRET"] = HOOK_SECRET
    proc.start()
    await proc.wait_ready()
    await wait_until(lambda: len(receiver.accepted()) == 1, 10, "the first value's delivery")
    stored = int(redis_sync.hget("access_token:meta", "version"))
    forged = {"event": "rotated", "source": "access_token", "account": None, "id": "f" * 24,
              "version": 10**17, "expires_at": 9999999999.0}
    redis_sync.publish("wechat-token:events", json.dumps(forged))
    await asyncio.sleep(1.0)
    relayed = [d.event() for d in receiver.accepted()[1:]]  # signature checked with the README's verify()
    assert not relayed, f"a forged event was signed and delivered: {relayed} (Redis holds version {stored})"
