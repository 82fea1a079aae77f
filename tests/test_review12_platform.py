"""Review 12: reproductions of defects in the third-party platform (server/platform/).

Each test asserts the behaviour the issue and the README promise; each FAILS on the code
under review (commit 1d01173).  Real redis-server, the in-process sandbox, real HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import yaml
from conftest import base_config
from helpers_platform import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, platform_sections, push_event, wait_for
from helpers_procs import merge

from server.app import start, stop
from server.config_file import load_config
from server.ops.reload import ConfigFile
from server.sandbox.common import TICKET_PATH
from server.sandbox.component import DEFAULT_COMPONENT_APPID

pytestmark = pytest.mark.timeout(120)

AUTHORIZER = "wxauthorizer0review"
META = f"{{myplatform.{AUTHORIZER}.access_token}}:meta"
DUE = "{myplatform:authorizers}:due"


async def ready_platform(sandbox, port) -> None:
    assert await push_event(sandbox, port, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 1, 5, "the component token")


async def authorise(sandbox, call, port, appid: str = AUTHORIZER) -> None:
    code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, appid)
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}"}}'.encode())
    assert status == 200 and body["authorizer_appid"] == appid, body


# --- 1. a reload (even of an unchanged file) breaks the component token -----------------------


@pytest.mark.gen_test(timeout=60)
async def test_reload_keeps_the_verify_ticket_in_the_component_token_request(tmp_path, redis_url, sandbox, sandbox_url, call, redis_sync) -> None:
    """``kill -HUP`` / ``POST /admin/reload`` with the SAME file: the component token must go on
    being renewed.  The reload replaces ``myplatform.component_access_token``'s
    ComponentTokenSource by a plain ``Source`` (server/ops/reload.py apply():
    ``sources = {name: Source(src) ...}``), whose request has no ``component_verify_ticket``:
    WeChat answers 61006 to every renewal, and when the token expires every authorizer stops."""
    sandbox.expires_in = 8  # the component token is renewed ~3 s before its end
    path = str(tmp_path / "config.yaml")
    raw = merge(base_config(redis_url, sandbox_url), {"refresh": {"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2},
                                                      **platform_sections(sandbox_url)})
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)

    def read(p: str):
        cfg = load_config(p)
        return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))

    running = await start(read(path), ConfigFile(path, read))
    try:
        await ready_platform(sandbox, running.port)
        status, body = await call(running.port, "/admin/reload", method="POST", body=b"")
        assert status == 200, body
        before = len(sandbox.requests_to(COMPONENT_TOKEN_PATH))
        await wait_for(lambda: len(sandbox.requests_to(COMPONENT_TOKEN_PATH)) > before, 10, "the component token's renewal")
        renewal = sandbox.requests_to(COMPONENT_TOKEN_PATH)[before]
        assert renewal.errcode == 0, f"the renewal after a reload was refused: errcode {renewal.errcode} (61006: no verify ticket in the request)"
    finally:
        await stop(running, 1.0)


# --- 2. the proxy rotates an authorizer's token on every call WeChat answers 40001 ---------------


@pytest.mark.gen_test(timeout=60)
async def test_proxy_does_not_rotate_an_authorizer_token_on_every_rejected_call(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """For an account, a token WeChat rejects right after it was rotated in is noted and never
    rotated again (server/face/proxy.py, Refresher.note_rejected_after_rotation): an SDK that
    retries would otherwise rotate on every retry.  For an authorizer,
    AuthorizerProxyHandler.note_rejected is a no-op and rotate() never asks whether the token was
    already judged: every proxied call that WeChat answers 40001 costs one
    api_authorizer_token call (and retires the token every other holder uses)."""
    cfg = make_config(face=True, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    status, token = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    sandbox.inject("/cgi-bin/getcallbackip", "errcode", errcode=40001, errmsg="invalid credential", times=None)
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    for _ in range(6):  # an SDK retrying
        await call(running.port, "/cgi-bin/getcallbackip", headers={}, access_token=token["access_token"])
    rotations = sandbox.calls[AUTHORIZER_TOKEN_PATH] - before
    assert rotations <= 1, f"{rotations} api_authorizer_token calls for 6 proxied calls WeChat kept answering 40001"


# --- 3. the lazy jsapi ticket: one upstream call per request while WeChat refuses it ----------


@pytest.mark.gen_test(timeout=60)
async def test_a_refused_jsapi_ticket_is_not_fetched_again_for_every_request(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """Platforms.ticket(): no ticket stored -> Worker.fetch_now -> Schedule.claim_one, which takes
    the member whatever its due time (the backoff _ticket() just set is ignored).  So while
    WeChat refuses the ticket (48001: API not authorised, e.g. a mini program; 45009: quota),
    every request for it is one more getticket call: the backoff, and the small ticket quota,
    are lost to whoever polls."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    sandbox.inject(TICKET_PATH, "errcode", errcode=48001, errmsg="api unauthorized", times=None)
    before = sandbox.calls[TICKET_PATH]
    for _ in range(8):
        status, _ = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
        assert status == 503
    calls = sandbox.calls[TICKET_PATH] - before
    assert calls <= 2, f"{calls} getticket calls for 8 requests while WeChat refused the ticket"


# --- 4. an authorisation racing a refresh: a superseded token kept, the new refresh token lost ----


@pytest.mark.gen_test(timeout=60)
async def test_authorisation_during_a_refresh_keeps_the_token_wechat_issued_last(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    """A scheduled refresh is claimed (version V1 = claim time) and its call is slow; meanwhile the
    merchant's updateauthorized code is exchanged (version V2 > V1, taken before api_query_auth).
    WeChat issues T2 (query_auth) and THEN T3 (the refresh): T3 is the newest, T2 dies after
    the overlap.  The refresh's save is fenced out (V1 < V2), so the server keeps T2 and serves a
    dead token until the next scheduled refresh (~ the whole life), and it drops the refresh
    token WeChat returned with T3: with rotating refresh tokens the stored one is now retired,
    and the next refresh gets 61023: the authorizer is blocked, the merchant must authorise again."""
    sandbox.expires_in = 8
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 4}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    port = running.port
    await ready_platform(sandbox, port)
    await authorise(sandbox, call, port)
    sandbox.component.rotate_refresh_tokens = True
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "hang", delay=1.5)  # the refresh's call reaches WeChat's logic 1.5 s late
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    await wait_for(lambda: sandbox.calls[AUTHORIZER_TOKEN_PATH] > before, 10, "the scheduled refresh's call")
    sandbox.expires_in = 60
    sandbox.overlap = 2
    await authorise(sandbox, call, port)  # updateauthorized: the code the merchant's browser brought
    await wait_for(lambda: sandbox.component.token_calls[AUTHORIZER] >= 3, 5, "the slow refresh answered")
    await asyncio.sleep(3)  # past WeChat's overlap for the token query_auth issued
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    stored_refresh = redis_sync.hget(META, "refresh_token")
    problems = []
    if sandbox.token_status(body["access_token"]) != 0:
        problems.append(f"serves a token WeChat rejects ({sandbox.token_status(body['access_token'])}) "
                        f"for {body['expires_in']} more seconds while the valid one was received and discarded")
    if stored_refresh != sandbox.component.current_refresh_token(AUTHORIZER):
        problems.append("the stored refresh token is one WeChat retired (the next refresh gets 61023)")
    assert not problems, "; ".join(problems)


# --- 5. a 61023 answered after a re-authorisation takes the authorizer off the schedule ---------


@pytest.mark.gen_test(timeout=60)
async def test_reauthorised_authorizer_stays_on_the_schedule_after_a_late_61023(make_config, start_server, sandbox, sandbox_url, call, redis_sync) -> None:
    """A refresh with the old refresh token is in the air; the merchant authorises again (new
    refresh token R2, stored with the new token, member re-added to the schedule); then the old
    call answers 61023.  _BLOCK_LUA rightly refuses to block (R2 is stored), but
    Worker._failed returns None anyway, and Schedule.finish (the claim is still ours) ZREMs the
    member: the authorizer, state ok, is never refreshed again and dies with its token."""
    sandbox.expires_in = 8
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 4}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    port = running.port
    await ready_platform(sandbox, port)
    await authorise(sandbox, call, port)
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "hang", delay=1.5)
    before = sandbox.calls[AUTHORIZER_TOKEN_PATH]
    await wait_for(lambda: sandbox.calls[AUTHORIZER_TOKEN_PATH] > before, 10, "the scheduled refresh's call")
    sandbox.component.invalidate_refresh_token(DEFAULT_COMPONENT_APPID, AUTHORIZER)  # WeChat: a new authorisation
    await authorise(sandbox, call, port)
    assert redis_sync.zscore(DUE, AUTHORIZER) is not None
    await wait_for(lambda: any(r.errcode == 61023 for r in sandbox.requests_to(AUTHORIZER_TOKEN_PATH)), 5, "the late 61023")
    await asyncio.sleep(0.5)
    assert redis_sync.hget(META, "state") == "ok"
    assert redis_sync.zscore(DUE, AUTHORIZER) is not None, "a re-authorised authorizer (state ok) was taken off the schedule: never refreshed again"
    await asyncio.sleep(9)  # the re-authorisation's token lives 8 s
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200, body


# --- 6. a ticket WeChat refuses for good is asked for again every second, forever ----------------


@pytest.mark.gen_test(timeout=60)
async def test_a_refused_jsapi_ticket_backs_off(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """Worker._ticket() answers every failure with ``self._backoff(1, e)``: the failure count is
    always 1, so the delay never grows (0.5 to 1 s), and 48001 ("API not authorised": do not
    retry, shared/WECHAT_API.md) or 45009 (quota) are retried like -1.  One request for the
    ticket of an authorizer that has no JS-SDK (a mini program) puts it on the schedule, and
    from then on every instance's worker calls getticket about once a second, forever: ~86,000
    calls a day per such authorizer, nobody asking."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    sandbox.inject(TICKET_PATH, "errcode", errcode=48001, errmsg="api unauthorized", times=None)
    status, _ = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    assert status == 503
    before = sandbox.calls[TICKET_PATH]
    await asyncio.sleep(10)  # nobody asks meanwhile
    calls = sandbox.calls[TICKET_PATH] - before
    # an exponential backoff (0.5, 1, 2, 4 s ...) makes at most 5 in 10 s; "do not retry" none
    assert calls <= 5, f"{calls} getticket calls in 10 s for a ticket WeChat refuses with 48001, nobody asking"


# --- 7. api_authorizer_token answering 40001: the component token rotated again and again -------


@pytest.mark.gen_test(timeout=60)
async def test_40001_from_api_authorizer_token_does_not_rotate_the_component_token_again_and_again(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """Worker._failed(): a STALE_TOKEN answer forces a component-token refresh with
    ``old=component.value, min_interval=False`` and retries 2-4 s later.  If WeChat keeps
    answering 40001 (it rejects the component token just rotated in too), each retry proves the
    NEW value "dead" and rotates it again: api_component_token (a small daily quota) is called
    about once per failing authorizer refresh, and every rotation retires the token other
    holders use.  The core notes a value rejected right after its rotation and does not rotate
    it again (Refresher.note_rejected_after_rotation); the platform does not use it."""
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)  # a component token for 7000 s: no renewal of its own in this test
    sandbox.expires_in = 8  # the authorizers' tokens: refreshed within seconds
    for i in range(5):
        await authorise(sandbox, call, running.port, f"wxauth40001{i:06d}")
    sandbox.expires_in = 7200
    before = sandbox.calls[COMPONENT_TOKEN_PATH]
    sandbox.inject(AUTHORIZER_TOKEN_PATH, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    await asyncio.sleep(15)
    rotations = sandbox.calls[COMPONENT_TOKEN_PATH] - before
    assert rotations <= 2, f"the component token was rotated {rotations} times in 15 s by authorizer refreshes answered 40001"


# --- 8. Redis unreachable: accounts are served from memory, authorizers not at all ----------------


@pytest.fixture
def own_redis(tmp_path):
    from server.embedded_redis import EmbeddedRedis, free_port

    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port(), persistent=False)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_authorizer_tokens_are_served_while_redis_is_unreachable(own_redis, make_config, start_server, sandbox, sandbox_url, call) -> None:
    """The issue: an authorizer's token is "served like any account's token"; the README
    (*Failures*): with Redis unreachable the server "serves values from memory while valid".
    An account's token is; an authorizer's is read from Redis on every request
    (Platforms.token -> AuthorizerStore.token, no memory), and the RedisError is not even
    mapped to a 503: a Redis restart or a Sentinel failover fails every authorizer read."""
    cfg = make_config(redis={"url": own_redis.url, "socket_timeout": 0.5}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    status, _ = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    own_redis.process.kill()
    own_redis.process.wait()
    await asyncio.sleep(0.2)
    account = await call(running.port, "/wechat/token", type="access_token")
    authorizer = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert account[0] == 200, account  # the core: from memory
    assert authorizer[0] == 200, f"authorizer token while Redis is unreachable: {authorizer}"


# --- 9. one account authorising two platforms: only one of them can ever be served ----------------


@pytest.mark.gen_test(timeout=60)
async def test_an_authorizer_of_two_platforms_is_served_for_each(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """An official account may authorise several third-party platforms (one for its shop, one
    for its CRM).  With both platforms configured here, /wechat/token?appid=A picks ONE platform
    (Platforms.locate: the first with a state for A, then cached per process), and
    ``account=`` is handed to the core (PlatformTokenHandler.get), so neither the operator nor a
    client allowed only the second platform can ever get the second platform's token for A."""
    import base64
    import hashlib

    from server.sandbox.component import ComponentApp
    from server.sandbox.component_handlers import push

    second_appid, second_secret, second_token = "wxcomponent0second", "second-component-secret-0123456789", "secondMsgToken0123"
    second_key = base64.b64encode(hashlib.sha256(b"second platform key").digest()).decode()[:43]
    sandbox.component.apps[second_appid] = ComponentApp(second_secret, second_token, second_key)
    client_secret = "second-client-secret-0123456789abcdef"
    sections = platform_sections(sandbox_url)
    sections["accounts"]["second"] = {"kind": "component", "appid": second_appid, "secret": second_secret,
                                      "msg_token": second_token, "aes_key": second_key, "api_base": sandbox_url}
    sections["clients"] = [{"name": "crm", "secret": client_secret, "accounts": ["second"]}]
    running = await start_server(make_config(**sections))
    port = running.port
    await ready_platform(sandbox, port)
    assert await push(sandbox.component, f"http://127.0.0.1:{port}/wechat/component/events", second_appid, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 2, 5, "the second component token")
    # A authorises the second platform, then the first
    code = sandbox.component.authorize(second_appid, AUTHORIZER)
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}", "account": "second"}}'.encode())
    assert status == 200 and body["authorizer_appid"] == AUTHORIZER, body
    code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, AUTHORIZER)
    status, body = await call(port, "/wechat/component/authorizers", method="POST", body=f'{{"authorization_code": "{code}", "account": "myplatform"}}'.encode())
    assert status == 200 and body["authorizer_appid"] == AUTHORIZER, body
    seconds = sandbox.component.current_token(AUTHORIZER, component=second_appid)
    problems = []
    status, body = await call(port, "/wechat/token", type="access_token", appid=AUTHORIZER, account="second")
    if status != 200 or body.get("access_token") != seconds:
        problems.append(f"operator asking for the second platform's token of A: {status} {body.get('errmsg', '')}")
    status, body = await call(port, "/wechat/token", headers={"X-Token-Secret": client_secret}, type="access_token", appid=AUTHORIZER)
    if status != 200 or body.get("access_token") != seconds:
        problems.append(f"the second platform's client asking for A: {status} {body.get('errmsg', 'the FIRST platform token')}")
    assert not problems, "; ".join(problems)


# --- 10. platform.lease <= refresh.timeout + 1 is accepted, and then nothing is ever refreshed ----


@pytest.mark.gen_test(timeout=60)
async def test_a_short_lease_is_refused_or_still_refreshes(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """Worker._token() skips the call when ``now + refresh.timeout > claim time + lease - 1`` and
    reschedules the member at once (``return 0.0``).  check_platform() only asks lease > 0, so
    ``platform.lease: 10`` with the default ``refresh.timeout: 10`` (here lease 3, timeout 2) starts
    fine and then never refreshes any authorizer: each is claimed, skipped and put back, every
    tick, until its token dies.  Either --check refuses it or the refresh still happens."""
    from server.config import ConfigError

    sandbox.expires_in = 8
    try:
        cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url, lease=3))
    except ConfigError:
        return  # refused with a line saying so: fine
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    await asyncio.sleep(9)  # past the token's life
    status, body = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert sandbox.component.token_calls[AUTHORIZER] >= 2, f"never refreshed; the token endpoint says {status} {body}"


# --- 11. embedded (server.embed): the platform runs, but its event URL is never mounted -------------


@pytest.mark.gen_test(timeout=60)
async def test_an_embedded_platform_gets_its_event_url(make_config, sandbox, sandbox_url) -> None:
    """TokenService.start() with a kind: component account builds and starts the platform's
    worker (Service.open), but TokenService.handlers() mounts only Service.routes(): no
    /wechat/component/events, no /wechat/component/authorizers, no authorizer appid on
    /wechat/token.  An embedding on its own never receives a verify ticket (its /readyz waits
    forever) and cannot serve an authorizer; nothing in --check or the README says so."""
    from conftest import serve_app

    from server.embed import TokenService
    from server.sandbox.component_handlers import push

    tokens = await TokenService.start(make_config(**platform_sections(sandbox_url)))
    server = None
    try:
        app = tornado_app(tokens.handlers("/t"))
        server, port = serve_app(app)
        status, body = await push(sandbox.component, f"http://127.0.0.1:{port}/t/wechat/component/events", DEFAULT_COMPONENT_APPID, "component_verify_ticket")
        assert (status, body) == (200, "success"), f"the embedded platform's event URL: {status}"
    finally:
        if server is not None:
            server.stop()
        await tokens.stop(1.0)


def tornado_app(rules):
    import tornado.web

    return tornado.web.Application(rules)


# --- 12. the operator's status page knows nothing of authorizers -----------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_status_page_shows_a_blocked_authorizer(make_config, start_server, sandbox, sandbox_url, call, io_loop) -> None:
    """The issue asks authorizers on "the status page (paged or summarised)".  The page's data
    (/wechat/status/data, server/web/status_view.page_data) is built from the refresher's
    sources only: an authorizer blocked by 61023 (the merchant must authorise again, the one
    thing the operator must act on) appears nowhere on it; only the JSON endpoint
    /wechat/component/status says so."""
    from test_status_page import Browserish

    sandbox.expires_in = 8
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    sandbox.component.invalidate_refresh_token(DEFAULT_COMPONENT_APPID, AUTHORIZER)
    await wait_for(lambda: any(r.errcode == 61023 for r in sandbox.requests_to(AUTHORIZER_TOKEN_PATH)), 10, "the 61023")
    status, page = await call(running.port, "/wechat/component/status")
    assert page["blocked"] == 1  # the JSON endpoint knows
    browser = Browserish(running.port)
    await browser.login()
    status, data = await browser.data()
    assert status == 200
    import json

    assert AUTHORIZER in json.dumps(data), "the status page does not show the blocked authorizer (nor any authorizer count)"


# --- 13. getticket answering 40001: the dead authorizer token is kept (and getticket retried) -------


@pytest.mark.gen_test(timeout=60)
async def test_40001_from_getticket_replaces_the_dead_authorizer_token(make_config, start_server, sandbox, sandbox_url, call) -> None:
    """shared/WECHAT_API.md: 40001 from a ticket call means the access_token used is invalid:
    "refresh that token once, but only if it is still the current one, then retry once".
    Worker._ticket() answers STALE_TOKEN with ``return RETRY_SOON`` ("its token is being
    rotated: the next one will do") and never refreshes it: the server keeps serving an
    authorizer token WeChat has just told it is dead, for the rest of its stored life, and asks
    getticket again with it every 2 to 4 s."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    await ready_platform(sandbox, running.port)
    await authorise(sandbox, call, running.port)
    # WeChat issues a successor nobody here received (a lost answer elsewhere), no overlap left:
    sandbox.ledger.rotate("authorizer", AUTHORIZER, overlap=0, agentid=DEFAULT_COMPONENT_APPID)
    status, _ = await call(running.port, "/wechat/token", type="ticket", appid=AUTHORIZER)
    first = status
    await asyncio.sleep(5)
    status, body = await call(running.port, "/wechat/token", type="access_token", appid=AUTHORIZER)
    assert status == 200
    alive = sandbox.token_status(body["access_token"])
    assert alive == 0, (f"5 s after getticket answered 40001 (ticket request: {first}), the server still serves the dead token "
                        f"({alive}) for {body['expires_in']} s more; getticket calls so far: {sandbox.calls[TICKET_PATH]}")


# --- 14. /status calls a component token that has never existed "ok" ------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_status_does_not_call_a_waiting_component_token_ok(make_config, start_server, sandbox_url, call) -> None:
    """Before the first verify ticket, /readyz rightly says 503 "waiting", but /status (and so the
    status page) shows ``myplatform.component_access_token`` as ``"state": "ok"`` with
    ``expires_in`` 0: the refresher's state for a DependencyUnavailable ("waiting") is never set
    to anything else (Refresher._fly keeps only last_error)."""
    running = await start_server(make_config(**platform_sections(sandbox_url)))
    status, body = await call(running.port, "/status")
    state = body["sources"]["myplatform.component_access_token"]
    assert state["state"] != "ok", f"/status before any verify ticket: {state}"
