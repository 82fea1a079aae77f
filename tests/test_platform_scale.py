"""Authorizers in numbers: a 61023 blocks one authorizer only (and none whose refresh token was
replaced meanwhile); two instances share the work with no authorizer refreshed twice; a
restart with valid tokens in Redis makes no call; a lease too short for a call still refreshes."""

from __future__ import annotations

import asyncio
import collections

import pytest
from helpers_platform import (
    AUTHORIZER_TOKEN_PATH,
    COMPONENT_TOKEN_PATH,
    QUERY_AUTH_PATH,
    authorise,
    platform_sections,
    ready_platform,
    wait_for,
)

from server.app import stop
from server.sandbox.component import DEFAULT_COMPONENT_APPID

pytestmark = pytest.mark.timeout(90)


def appids(n: int) -> list[str]:
    return [f"wxauth{i:012d}" for i in range(n)]


def fast(make_config, sandbox_url, **platform):
    return make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url, **platform))


@pytest.mark.slow
@pytest.mark.gen_test(timeout=80)
async def test_61023_blocks_one_authorizer_only(make_config, start_server, sandbox, sandbox_url, call) -> None:
    sandbox.expires_in = 8
    running = await start_server(fast(make_config, sandbox_url))
    port = running.port
    await ready_platform(sandbox, port)
    many = appids(20)
    await authorise(sandbox, call, port, *many)
    victim = many[7]
    sandbox.component.invalidate_refresh_token(DEFAULT_COMPONENT_APPID, victim)
    await wait_for(lambda: all(sandbox.component.token_calls[a] >= 3 for a in many if a != victim), 30, "two refreshes of the others")
    assert sandbox.component.token_calls[victim] == 1  # its exchange only: the refresh got 61023
    status, page = await call(port, "/wechat/component/status", count="100")
    assert page["scheduled"] == 19 and page["blocked"] == 1
    assert page["blocked_authorizers"] == [{"appid": victim, "errcode": 61023}]
    await asyncio.sleep(8)  # its token's life
    status, body = await call(port, "/wechat/token", type="access_token", appid=victim)
    assert status == 503 and "blocked: errcode 61023" in body["errmsg"]
    for appid in many:
        if appid != victim:
            status, body = await call(port, "/wechat/token", type="access_token", appid=appid)
            assert status == 200 and sandbox.token_status(body["access_token"]) == 0
    # the merchant authorises again: back on the schedule
    await authorise(sandbox, call, port, victim)
    status, body = await call(port, "/wechat/token", type="access_token", appid=victim)
    assert status == 200
    status, page = await call(port, "/wechat/component/status")
    assert page["scheduled"] == 20 and page["blocked"] == 0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=80)
async def test_two_instances_share_the_work(make_config, start_server, sandbox, sandbox_url, call) -> None:
    sandbox.expires_in = 6
    cfg = fast(make_config, sandbox_url, batch=5, concurrency=4)
    a = await start_server(cfg)
    b = await start_server(cfg)
    await ready_platform(sandbox, a.port)
    many = appids(40)
    await authorise(sandbox, call, a.port, *many)
    sandbox.component.token_log.clear()
    started = sandbox.clock()
    await asyncio.sleep(14)
    log = [(t, appid) for t, appid in sandbox.component.token_log if t > started]
    per = collections.defaultdict(list)
    for t, appid in log:
        per[appid].append(t)
    assert set(per) == set(many), "every authorizer was refreshed"
    gaps = [b - a for times in per.values() for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > 1.5, f"an authorizer was refreshed twice for one rotation ({min(gaps):.2f}s apart)"
    rotations = [r.platforms.by_name["myplatform"].worker.rotations for r in (a, b)]
    assert all(n > 0 for n in rotations), f"both instances refreshed: {rotations}"
    assert sum(rotations) == len(log), "every call stored its token"
    for appid in many[:5]:
        for r in (a, b):
            status, body = await call(r.port, "/wechat/token", type="access_token", appid=appid)
            assert status == 200 and sandbox.token_status(body["access_token"]) == 0


@pytest.mark.gen_test(timeout=80)
async def test_restart_with_valid_tokens_makes_no_call(make_config, start_server, sandbox, sandbox_url, call, io_loop) -> None:
    cfg = make_config(**platform_sections(sandbox_url))
    first = await start_server(cfg)
    await ready_platform(sandbox, first.port)
    many = appids(30)
    await authorise(sandbox, call, first.port, *many)
    await stop(first, 1.0)
    before = dict(sandbox.calls)
    second = await start_server(cfg)
    await asyncio.sleep(2)
    assert sandbox.calls[AUTHORIZER_TOKEN_PATH] == before.get(AUTHORIZER_TOKEN_PATH, 0)
    assert sandbox.calls[COMPONENT_TOKEN_PATH] == before[COMPONENT_TOKEN_PATH]
    assert sandbox.calls[QUERY_AUTH_PATH] == before[QUERY_AUTH_PATH]
    status, ready = await call(second.port, "/readyz", headers={})
    assert status == 200, ready
    status, body = await call(second.port, "/wechat/token", type="access_token", appid=many[3])
    assert status == 200 and body["access_token"] == sandbox.component.current_token(many[3])


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_lost_answer_cuts_the_stored_token_to_the_overlap(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    sandbox.expires_in = 30
    sandbox.overlap = 4
    cfg = make_config(refresh={"interval": 0.5, "ahead": 26, "max_ttl": 7000, "timeout": 1, "overlap": 4}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    appid = appids(1)[0]
    # its first refresh is due in 11 to 15 s (30 s of life; ahead at most half of it, less jitter)
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "hang", delay=1.5)  # answers after refresh.timeout: the answer is lost
    await authorise(sandbox, call, running.port, appid)
    key = f"myplatform.{appid}.access_token"
    await wait_for(lambda: sandbox.component.token_calls[appid] >= 2, 25, "the refresh whose answer is lost")
    # the client gave up after 1 s and cut the stored token; the retry comes 1 to 2 s after that
    await wait_for(lambda: 0 < redis_sync.pttl(key) <= 4000, 1, "the stored token cut to the overlap")
    await wait_for(lambda: sandbox.component.token_calls[appid] >= 3, 10, "the retry")
    status, body = await call(running.port, "/wechat/token", type="access_token", appid=appid)
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_the_platform_refused_pauses_every_authorizer(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """61004 (this server's IP is not on the platform's whitelist) is the platform's fault:
    one call, then a pause of refresh.backoff_max, not one backoff per authorizer."""
    sandbox.expires_in = 6
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2, "backoff_max": 4}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    many = appids(10)
    await authorise(sandbox, call, running.port, *many)
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "errcode", errcode=61004, errmsg="access clientip is not registered", times=None)
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    await asyncio.sleep(5)  # every authorizer falls due meanwhile
    refused = sandbox.calls[AUTHORIZER_TOKEN_PATH] - before
    # at most the claims already in the air when the first answer came (each authorizer backing
    # off on its own would have made about 30)
    assert 1 <= refused <= 10, f"{refused} calls while the platform was refused"
    sandbox.clear_faults()
    await wait_for(lambda: all(sandbox.component.token_calls[a] >= 2 for a in many), 20, "refreshes after the pause")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_late_61023_for_a_replaced_refresh_token_keeps_the_authorizer_scheduled(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    """A refresh with the old refresh token is in the air; the merchant authorises again (new
    refresh token, new token, rescheduled); then the old call answers 61023.  Nothing is
    blocked (the refresh token it judged is gone), and the authorizer stays on the schedule at
    the due time the authorisation set (Schedule.finish keeps a reschedule made meanwhile)."""
    authorizer = "wxauthorizer0late61023"
    meta, due = f"{{myplatform.{authorizer}.access_token}}:meta", "{myplatform:authorizers}:due"
    sandbox.expires_in = 8
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 4}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    port = running.port
    await ready_platform(sandbox, port)
    await authorise(sandbox, call, port, authorizer)
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "hang", delay=1.5)
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    await wait_for(lambda: sandbox.calls[AUTHORIZER_TOKEN_PATH] > before, 10, "the scheduled refresh's call")
    sandbox.component.invalidate_refresh_token(DEFAULT_COMPONENT_APPID, authorizer)  # WeChat: a new authorisation
    await authorise(sandbox, call, port, authorizer)
    assert redis_sync.zscore(due, authorizer) is not None
    await wait_for(lambda: any(r.errcode == 61023 for r in sandbox.requests_to(AUTHORIZER_TOKEN_PATH)), 5, "the late 61023")
    await asyncio.sleep(0.5)
    assert redis_sync.hget(meta, "state") == "ok"
    assert redis_sync.zscore(due, authorizer) is not None, "a re-authorised authorizer (state ok) was taken off the schedule"
    await asyncio.sleep(9)  # the re-authorisation's token lives 8 s
    status, body = await call(port, "/wechat/token", type="access_token", appid=authorizer)
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0, body


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_lease_shorter_than_a_call_is_lengthened_and_refreshes(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """``platform.lease: 3`` with ``refresh.timeout: 2`` leaves no time for a call in a claim
    (Worker._run skips a call that could outlive its claim): claims last refresh.timeout + 3 s
    instead (a warning says so), and authorizers are refreshed."""
    sandbox.expires_in = 8
    running = await start_server(fast(make_config, sandbox_url, lease=3))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, "wxauthorizer0shortlease")
    await asyncio.sleep(9)  # past the token's life
    status, body = await call(running.port, "/wechat/token", type="access_token", appid="wxauthorizer0shortlease")
    assert sandbox.component.token_calls["wxauthorizer0shortlease"] >= 2, f"never refreshed; the token endpoint says {status} {body}"
    assert status == 200 and sandbox.token_status(body["access_token"]) == 0
