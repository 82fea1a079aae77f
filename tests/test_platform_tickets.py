"""An authorizer's JS-SDK ticket when WeChat refuses it: its fetches back off by kind, requests
for it wait for the backoff instead of calling getticket each, and a getticket that says the
authorizer's token is dead (40001) replaces that token once and retries once."""

from __future__ import annotations

import asyncio

import pytest
from helpers_platform import authorise, platform_sections, ready_platform, wait_for

from server.sandbox.common import TICKET_PATH
from server.sandbox.component import DEFAULT_COMPONENT_APPID

pytestmark = pytest.mark.timeout(120)

AUTHORIZER = "wxauthorizer0ticket"


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_ticket_wechat_refuses_for_good_is_not_fetched_again_soon(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """48001 ("API not authorised", a mini program has no JS-SDK) is fatal: the ticket's next try
    waits ``refresh.backoff_max``, not a second; nobody asking meanwhile costs no call.
    (Before: every failure counted as the first, 0.5 to 1 s, about 86,000 calls a day.)"""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    sandbox.inject(TICKET_PATH, "errcode", errcode=48001, errmsg="api unauthorized", times=None)
    status, _ = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 503
    before = sandbox.calls[TICKET_PATH]
    await asyncio.sleep(10)  # nobody asks meanwhile
    calls = sandbox.calls[TICKET_PATH] - before
    # an exponential backoff (0.5, 1, 2, 4 s ...) makes at most 5 in 10 s; "do not retry" none
    assert calls <= 5, f"{calls} getticket calls in 10 s for a ticket WeChat refuses with 48001, nobody asking"


@pytest.mark.gen_test(timeout=60)
async def test_a_ticket_failing_for_a_while_backs_off_exponentially(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    """-1 (system busy) is transient: retried, each wait about twice the one before (0.5-1 s,
    1-2 s, 2-4 s ...: at most 3 retries in 6 s; a constant second would make 6 or more)."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    sandbox.inject(TICKET_PATH, "errcode", errcode=-1, errmsg="system error", times=None)
    before = sandbox.calls[TICKET_PATH]
    status, _ = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 503
    await asyncio.sleep(6)
    calls = sandbox.calls[TICKET_PATH] - before
    assert 2 <= calls <= 4, f"{calls} getticket calls in 6 s while WeChat answered -1"
    failures = int(redis_sync.hget(f"{{myplatform.{AUTHORIZER}.access_token}}:meta", "ticket_failures"))
    assert calls - 1 <= failures <= calls  # counted in Redis (the last call's answer may be in the air)
    sandbox.clear_faults()
    await wait_for(lambda: redis_sync.get(f"myplatform.{AUTHORIZER}.ticket"), 10, "the ticket once WeChat answers")
    assert redis_sync.hget(f"{{myplatform.{AUTHORIZER}.access_token}}:meta", "ticket_failures") is None


@pytest.mark.gen_test(timeout=60)
async def test_requests_for_a_refused_ticket_are_answered_from_its_last_failure(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """A request for a ticket claims it only when it is due (Schedule.claim_one ``due_only``):
    while its fetch backs off, a request gets 503 with WeChat's last answer and makes no
    getticket call (the ticket quota is small)."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    sandbox.inject(TICKET_PATH, "errcode", errcode=48001, errmsg="api unauthorized", times=None)
    before = sandbox.calls[TICKET_PATH]
    for _ in range(8):
        status, body = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
        assert status == 503
        assert "48001" in body["errmsg"], body
    calls = sandbox.calls[TICKET_PATH] - before
    assert calls <= 2, f"{calls} getticket calls for 8 requests while WeChat refused the ticket"


@pytest.mark.gen_test(timeout=60)
async def test_getticket_40001_replaces_the_authorizer_token_once_and_retries(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """shared/WECHAT_API.md: 40001 from a ticket call means the access_token used is invalid:
    refresh that token once, only if it is still the current one, then retry once.  The
    request gets its ticket, and the server serves the new token, not the dead one."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    # WeChat issues a successor nobody here received (a lost answer elsewhere), no overlap left:
    sandbox.ledger.rotate("authorizer", AUTHORIZER, overlap=0, agentid=DEFAULT_COMPONENT_APPID)
    tickets_before = sandbox.calls[TICKET_PATH]
    status, ticket = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 200, ticket
    assert sandbox.calls[TICKET_PATH] - tickets_before == 2  # the refused call and its one retry
    status, body = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    assert sandbox.token_status(body["access_token"]) == 0, "the server still serves the token getticket said was dead"


@pytest.mark.gen_test(timeout=60)
async def test_getticket_rejecting_every_token_costs_one_rotation_and_no_loop(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """When getticket answers 40001 to the replaced token too, the token is not what is wrong:
    one replacement, one retry, then the ticket backs off; the next request calls nothing."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port, AUTHORIZER)
    sandbox.inject(TICKET_PATH, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    tickets, tokens = sandbox.calls[TICKET_PATH], sandbox.component.token_calls[AUTHORIZER]
    for _ in range(3):
        status, body = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
        assert status == 503 and "40001" in body["errmsg"], body
    assert sandbox.calls[TICKET_PATH] - tickets == 2
    assert sandbox.component.token_calls[AUTHORIZER] - tokens == 1
