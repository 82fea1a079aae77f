"""The client for business servers (wechat_token_client) against the real server, a real
redis-server, the sandbox as WeChat and the real wechatpy; and its distribution, built and
installed in a clean venv without Tornado.

The client is synchronous: every call runs in a thread, so the server on the test's loop keeps
serving.  Requests that reached the server are counted from its access log (one line per
request: ``200 GET /wechat/token ...``); calls that reached WeChat from the sandbox's counters.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from server.app import stop
from tests import helpers_face
from tests.conftest import TEST_SECRET
from tests.helpers_face import MAIN_ID, SHOP_ID, face_config, token_fetches
from wechat_token_client import TokenClient, TokenServerError

sandbox = helpers_face.sandbox  # the fixture: WeChat with several accounts (main: default, shop: classic token)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_PATH = "/wechat/token"
FORCE_PATH = "/wechat/token/forcerefresh"
ROTATIONS = "/cgi-bin/token"  # shop's classic token: each call is a rotation
IPS = "/cgi-bin/getcallbackip"


def server_requests(watch: Any, path: str, since: int = 0) -> int:
    """Requests of ``path`` the server answered since record ``since`` (its access log)."""
    line = re.compile(rf"^\d{{3}} GET {re.escape(path)} ")
    return sum(1 for record in watch.records[since:] if line.match(record))


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


def crowd(n: int, fn: Callable[[], Any]) -> list[Any]:
    """``fn()`` in ``n`` threads released at the same moment; their answers (or exceptions)."""
    barrier = threading.Barrier(n)

    def one() -> Any:
        barrier.wait()
        try:
            return fn()
        except Exception as e:  # returned, so the test sees every thread's outcome
            return e

    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(one) for _ in range(n)]]


def client_for(srv: Any, **kwargs: Any) -> TokenClient:
    return TokenClient(f"http://127.0.0.1:{srv.port}", secret=TEST_SECRET, **kwargs)


@pytest.fixture
def quiet_urllib3():
    """urllib3 (under wechatpy's requests) logs every URL at DEBUG, the access_token in its
    query included: keep whole tokens out of this process's log (see README, SDKs)."""
    logger = logging.getLogger("urllib3")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


# --- get: the cache and the single flight -----------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_get_serves_the_servers_value_and_caches_it(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv)
    since, fetched = len(secret_watch.records), token_fetches(sandbox)
    token = await in_thread(client.get, "access_token", "shop")
    assert token == sandbox.current_token(SHOP_ID)
    assert await in_thread(client.get_token, "access_token", account="shop") is not None
    assert await in_thread(client.get, "ticket", "shop") and await in_thread(client.get, "access_token", appid=SHOP_ID) == token
    # The default account (main, a stable token) when no account is named.
    assert await in_thread(client.get) == sandbox.current_stable_token(MAIN_ID)
    for _ in range(5):
        assert await in_thread(client.get, "access_token", "shop") == token
    # One request per key (shop's token, shop's ticket, shop's token by appid, main's token).
    assert server_requests(secret_watch, TOKEN_PATH, since) == 4
    assert token_fetches(sandbox) == fetched  # reads never reach WeChat
    remaining = (await in_thread(client.get_token, "access_token", "shop")).remaining()
    assert 6900 < remaining <= 7000  # the server's refresh.max_ttl caps the life at 7000 s


@pytest.mark.gen_test(timeout=30)
async def test_threads_asking_at_once_make_one_request(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv)
    since = len(secret_watch.records)
    answers = await in_thread(crowd, 24, lambda: client.get("access_token", "shop"))
    assert answers == [sandbox.current_token(SHOP_ID)] * 24
    assert server_requests(secret_watch, TOKEN_PATH, since) == 1
    # Two keys at once: one request each.
    since = len(secret_watch.records)
    answers = await in_thread(crowd, 24, lambda: client.get("ticket", "shop") + client.get("access_token", "main"))
    assert len(set(answers)) == 1
    assert server_requests(secret_watch, TOKEN_PATH, since) == 2


@pytest.mark.gen_test(timeout=30)
async def test_max_age_bounds_the_cache(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv, max_age=1.0)
    since = len(secret_watch.records)
    first = await in_thread(client.get, "access_token", "shop")
    assert await in_thread(client.get, "access_token", "shop") == first
    assert server_requests(secret_watch, TOKEN_PATH, since) == 1
    await asyncio.sleep(1.1)
    # Older than max_age: asked again (the server still has the same value).
    assert await in_thread(client.get, "access_token", "shop") == first
    assert server_requests(secret_watch, TOKEN_PATH, since) == 2
    # A value the server replaced reaches the client within max_age.
    rotated = await in_thread(client_for(srv).refresh_after_rejection, first, account="shop")
    assert rotated != first and await in_thread(client.get, "access_token", "shop") == first
    await asyncio.sleep(1.1)
    assert await in_thread(client.get, "access_token", "shop") == rotated


@pytest.mark.gen_test(timeout=30)
async def test_a_value_is_asked_for_again_shortly_before_it_expires(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv, max_age=60)
    since = len(secret_watch.records)
    token = await in_thread(client.get_token, "access_token", "shop")
    # Pretend the value is about to expire: "early" leaves it 1 s in the cache.
    client.early = token.remaining() - 1.0
    await in_thread(client.get, "access_token", "shop")
    assert server_requests(secret_watch, TOKEN_PATH, since) == 1
    await asyncio.sleep(1.1)
    await in_thread(client.get, "access_token", "shop")
    assert server_requests(secret_watch, TOKEN_PATH, since) == 2


@pytest.mark.gen_test(timeout=30)
async def test_an_unreachable_server_leaves_cached_values_in_use_until_they_near_expiry(make_config, sandbox_url, start_server, sandbox, caplog):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv, max_age=0, timeout=2)
    token = await in_thread(client.get_token, "access_token", "shop")
    await stop(srv, 1.0)
    with caplog.at_level(logging.WARNING, logger="wechat_token_client"):
        assert await in_thread(client.get, "access_token", "shop") == token.value
    assert any("unreachable" in r.getMessage() and "using the cached value" in r.getMessage() for r in caplog.records)
    client.early = token.remaining() + 1  # the value now counts as about to expire: not handed out
    with pytest.raises(TokenServerError) as raised:
        await in_thread(client.get, "access_token", "shop")
    assert raised.value.status is None and "unreachable" in str(raised.value)
    with pytest.raises(TokenServerError):
        await in_thread(client_for(srv).get, "access_token", "shop")


def test_after_a_failure_the_cached_value_is_used_for_a_pause_not_asked_for_on_every_call(redis_url, redis_sync):
    # Redis mode without a server (which would put a deleted key back): the key written by hand.
    def reads() -> int:
        return int(redis_sync.info("commandstats").get("cmdstat_pttl", {}).get("calls", 0))

    redis_sync.set("access_token", "hand-written-value", px=60_000)
    client = TokenClient(redis=redis_url, max_age=1.0)
    assert client.get() == "hand-written-value"
    time.sleep(1.1)
    redis_sync.delete("access_token")
    redis_sync.config_resetstat()
    for _ in range(5):
        assert client.get() == "hand-written-value"
    assert reads() == 1  # one failed read, then the pause (max_age here: shorter than 5 s)
    time.sleep(1.1)
    redis_sync.set("access_token", "hand-written-again", px=60_000)
    assert client.get() == "hand-written-again" and reads() == 2


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_errors_carry_the_servers_json_and_never_the_secret(make_config, sandbox_url, start_server, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    wrong = "wrong-secret-0123456789abcdefghij"
    cases = [
        (TokenClient(f"http://127.0.0.1:{srv.port}", secret=wrong), {}, 403, "wrong secret"),
        (client_for(srv), {"type": "no_such_type"}, 404, "unknown type"),
        (client_for(srv), {"account": "nobody"}, 404, "unknown account"),
    ]
    for client, args, status, reason in cases:
        with pytest.raises(TokenServerError) as raised:
            await in_thread(client.get, **args)
        e = raised.value
        assert (e.status, e.error) == (status, {"errcode": status, "errmsg": reason}), repr(e)
        assert str(e).startswith(f"token server answered {status}")
        for text in (str(e), repr(e), repr(client)):
            assert TEST_SECRET not in text and wrong not in text
    # A 429 says when to come back.
    cfg = face_config(make_config, sandbox_url, server={"forcerefresh_per_minute": 1})
    limited = client_for(await start_server(cfg))
    token = await in_thread(limited.get, "access_token", "shop")
    await in_thread(limited.refresh_after_rejection, token, account="shop")
    limited.invalidate("access_token", "shop")
    with pytest.raises(TokenServerError) as raised:
        await in_thread(limited.refresh_after_rejection, await in_thread(limited.get, "access_token", "shop"), account="shop")
    assert raised.value.status == 429 and raised.value.retry_after is not None and raised.value.retry_after > 0


def test_constructor_refuses_what_cannot_work():
    with pytest.raises(ValueError):
        TokenClient()
    with pytest.raises(ValueError):
        TokenClient("http://127.0.0.1:1")  # no secret
    with pytest.raises(ValueError):
        TokenClient("127.0.0.1:12123", secret=TEST_SECRET)
    with pytest.raises(ValueError):
        TokenClient(redis="redis://127.0.0.1:1").get("access_token", appid="wx1")
    shown = repr(TokenClient(redis="redis://:pa55word-0123456789@127.0.0.1:1/0", url="http://h", secret=TEST_SECRET))
    assert "pa55word" not in shown and TEST_SECRET not in shown and "***" in shown


# --- refresh_after_rejection ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_refresh_after_rejection_rotates_the_current_value_once_for_a_crowd(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv)
    rejected = await in_thread(client.get, "access_token", "shop")
    rotations, since = sandbox.issued[ROTATIONS], len(secret_watch.records)
    answers = await in_thread(crowd, 16, lambda: client.refresh_after_rejection(rejected, account="shop"))
    new = sandbox.current_token(SHOP_ID)
    assert answers == [new] * 16 and new != rejected
    assert sandbox.issued[ROTATIONS] == rotations + 1
    assert server_requests(secret_watch, FORCE_PATH, since) == 1
    # The cache holds the new value: no request for it, and the rejected one again costs nothing.
    since = len(secret_watch.records)
    assert await in_thread(client.get, "access_token", "shop") == new
    assert await in_thread(client.refresh_after_rejection, rejected, account="shop") == new
    assert server_requests(secret_watch, TOKEN_PATH, since) == server_requests(secret_watch, FORCE_PATH, since) == 0
    assert sandbox.issued[ROTATIONS] == rotations + 1


@pytest.mark.gen_test(timeout=30)
async def test_refresh_after_rejection_of_a_stale_value_returns_the_current_one_without_a_rotation(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    stale = await in_thread(client_for(srv).get, "access_token", "shop")
    current = await in_thread(client_for(srv).refresh_after_rejection, stale, account="shop")
    rotations, since = sandbox.issued[ROTATIONS], len(secret_watch.records)
    # Another business server (a fresh client: nothing cached) still holds the stale value.
    assert await in_thread(client_for(srv).refresh_after_rejection, stale, account="shop") == current
    assert server_requests(secret_watch, FORCE_PATH, since) == 1  # asked, with old=
    assert sandbox.issued[ROTATIONS] == rotations  # and the server's old= rule made no call


@pytest.mark.gen_test(timeout=30)
async def test_reads_and_refreshes_of_one_key_at_once_make_one_request(make_config, sandbox_url, start_server, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    stale = await in_thread(client_for(srv).get, "access_token", "shop")
    current = await in_thread(client_for(srv).refresh_after_rejection, stale, account="shop")
    client, since = client_for(srv), len(secret_watch.records)
    asks = iter([lambda: client.get("access_token", "shop"), lambda: client.refresh_after_rejection(stale, account="shop")] * 8)
    lock = threading.Lock()

    def ask() -> str:
        with lock:
            one = next(asks)
        return one()

    assert await in_thread(crowd, 16, ask) == [current] * 16
    # Whichever went first, the other found its answer in the cache.
    assert server_requests(secret_watch, TOKEN_PATH, since) + server_requests(secret_watch, FORCE_PATH, since) == 1


# --- Redis mode ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_redis_mode_reads_the_plain_key_with_its_ttl(make_config, sandbox_url, start_server, sandbox, secret_watch, redis_url, redis_sync):
    srv = await start_server(face_config(make_config, sandbox_url, redis={"prefix": "wx:"}))
    since = len(secret_watch.records)
    client = TokenClient(redis=redis_url, prefix="wx:", max_age=1.0)
    assert client.mode == "redis"
    token = await in_thread(client.get_token, "access_token", "shop")
    assert token.value == redis_sync.get("wx:shop.access_token") == sandbox.current_token(SHOP_ID)
    assert abs(token.remaining() - redis_sync.pttl("wx:shop.access_token") / 1000) < 1
    assert await in_thread(client.get) == redis_sync.get("wx:access_token")  # the default account's plain key
    # What the key holds is what the client returns (written by hand here), within max_age.
    redis_sync.set("wx:shop.ticket", "hand-written-value", px=60_000)
    assert await in_thread(client.get, "ticket", "shop") == "hand-written-value"
    redis_sync.set("wx:shop.ticket", "hand-written-again", px=60_000)
    assert await in_thread(client.get, "ticket", "shop") == "hand-written-value"
    await asyncio.sleep(1.1)
    assert await in_thread(client.get, "ticket", "shop") == "hand-written-again"
    assert server_requests(secret_watch, TOKEN_PATH, since) == 0  # Redis mode never asks over HTTP
    with pytest.raises(TokenServerError) as raised:
        await in_thread(client.get, "access_token", "nobody")
    assert "wx:nobody.access_token" in str(raised.value)
    # Reads from Redis, forced refresh over HTTP (only the server may rotate).
    both = TokenClient(f"http://127.0.0.1:{srv.port}", secret=TEST_SECRET, redis=redis_url, prefix="wx:")
    assert await in_thread(both.get, "ticket", "shop") == "hand-written-again"
    assert server_requests(secret_watch, TOKEN_PATH, since) == 0
    rotations = sandbox.issued[ROTATIONS]
    new = await in_thread(both.refresh_after_rejection, token.value, account="shop")
    assert new == sandbox.current_token(SHOP_ID) != token.value and sandbox.issued[ROTATIONS] == rotations + 1
    # Redis alone cannot rotate: it says so instead of handing the rejected value back.
    with pytest.raises(TokenServerError, match="only the server can replace it"):
        await in_thread(TokenClient(redis=redis_url, prefix="wx:").refresh_after_rejection, new, account="shop")
    assert sandbox.issued[ROTATIONS] == rotations + 1


# --- wechatpy -------------------------------------------------------------------------------------


def wechatpy_client(tokens: TokenClient, sandbox_url: str, **kwargs: Any) -> Any:
    """Our WeChatClient with the session on ``tokens``, talking to the sandbox as WeChat."""
    from wechat_token_client.wechatpy import TokenServerSession, WeChatClient

    client = WeChatClient(SHOP_ID, None, session=TokenServerSession(tokens, account="shop"), **kwargs)
    to_wechat(client, sandbox_url)
    return client


def to_wechat(client: Any, sandbox_url: str) -> None:
    """Send wechatpy's requests for api.weixin.qq.com to the sandbox (WeChat in these tests)."""
    import requests.adapters

    class ToSandbox(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            request.url = sandbox_url + request.url[len("https://api.weixin.qq.com"):]
            return super().send(request, **kwargs)

    client._http.mount("https://api.weixin.qq.com/", ToSandbox())


@pytest.mark.gen_test(timeout=60)
async def test_wechatpy_takes_its_token_and_tickets_from_the_server(make_config, sandbox_url, start_server, sandbox, quiet_urllib3, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = wechatpy_client(client_for(srv), sandbox_url)
    fetched, tickets, since = token_fetches(sandbox), sandbox.calls["/cgi-bin/ticket/getticket"], len(secret_watch.records)
    assert await in_thread(client.misc.get_wechat_ips)
    assert await in_thread(client.message.send_text, "o1", "hi") == {"errcode": 0, "errmsg": "ok"}
    sent = sandbox.requests_to(IPS)[-1]
    assert (sent.token_owner, sent.token_status, sent.access_token) == (SHOP_ID, 0, sandbox.current_token(SHOP_ID))
    ticket = await in_thread(client.jsapi.get_jsapi_ticket)
    assert ticket == await in_thread(client_for(srv).get, "ticket", "shop")
    assert token_fetches(sandbox) == fetched and sandbox.calls["/cgi-bin/ticket/getticket"] == tickets  # 0 fetches by wechatpy
    assert server_requests(secret_watch, TOKEN_PATH, since) == 3  # token and ticket (the session), the ticket (the check)
    assert client.expires_at is None  # wechatpy never fetched, so it never looks at its own clock


@pytest.mark.gen_test(timeout=60)
async def test_wechatpy_a_crowd_rejected_with_40001_costs_one_rotation(make_config, sandbox_url, start_server, sandbox, quiet_urllib3, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = wechatpy_client(client_for(srv), sandbox_url)
    assert await in_thread(client.misc.get_wechat_ips)
    # Someone fetches shop's token behind the server's back, twice: the held one dies at WeChat.
    for _ in range(2):
        sandbox.api_token("client_credential", SHOP_ID, helpers_face.SHOP_SECRET, "127.0.0.1")
    rotations, fetched, since = sandbox.issued[ROTATIONS], token_fetches(sandbox), len(secret_watch.records)
    answers = await in_thread(crowd, 12, client.misc.get_wechat_ips)
    assert all(isinstance(a, list) and a for a in answers), answers[:3]
    assert sandbox.issued[ROTATIONS] == rotations + 1 and token_fetches(sandbox) == fetched + 1  # the server's one call
    assert server_requests(secret_watch, FORCE_PATH, since) == 1
    assert sandbox.requests_to(IPS)[-1].access_token == sandbox.current_token(SHOP_ID)


@pytest.mark.gen_test(timeout=60)
async def test_wechatpy_a_retry_rejected_again_is_raised_not_looped(make_config, sandbox_url, start_server, sandbox, quiet_urllib3):
    from wechatpy.exceptions import WeChatClientException

    srv = await start_server(face_config(make_config, sandbox_url))
    client = wechatpy_client(client_for(srv), sandbox_url)
    assert await in_thread(client.misc.get_wechat_ips)
    rotations, calls = sandbox.issued[ROTATIONS], len(sandbox.requests_to(IPS))
    # Once: one rotation, the retry works, wechatpy's caller never notices.
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential")
    assert await in_thread(client.misc.get_wechat_ips)
    assert sandbox.issued[ROTATIONS] == rotations + 1 and len(sandbox.requests_to(IPS)) == calls + 2
    # Rejected for good: one rotation and one retry, then WeChat's 40001 is raised (wechatpy
    # alone would fetch and retry without end).
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    with pytest.raises(WeChatClientException) as raised:
        await in_thread(client.misc.get_wechat_ips)
    assert raised.value.errcode == 40001
    assert sandbox.issued[ROTATIONS] == rotations + 2 and len(sandbox.requests_to(IPS)) == calls + 4
    sandbox.clear_faults()
    assert await in_thread(client.misc.get_wechat_ips)
    assert sandbox.issued[ROTATIONS] == rotations + 2


@pytest.mark.gen_test(timeout=60)
async def test_wechatpys_own_client_would_fetch_on_40001_hence_the_subclass(make_config, sandbox_url, start_server, sandbox, quiet_urllib3, caplog):
    """Pins the wechatpy behaviour the subclass exists for, and the auto_retry=False recipe."""
    import wechatpy
    from wechatpy.exceptions import WeChatClientException

    from wechat_token_client.wechatpy import TokenServerSession

    srv = await start_server(face_config(make_config, sandbox_url))
    tokens = client_for(srv)
    # wechatpy's own client, auto_retry=False: a 40001 is raised; the session gives the value to retry with.
    plain = wechatpy.WeChatClient(SHOP_ID, None, session=TokenServerSession(tokens, account="shop"), auto_retry=False)
    to_wechat(plain, sandbox_url)
    held = await in_thread(tokens.get, "access_token", "shop")
    fetched = token_fetches(sandbox)
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential")
    with pytest.raises(WeChatClientException):
        await in_thread(plain.misc.get_wechat_ips)
    assert token_fetches(sandbox) == fetched
    assert await in_thread(plain.session.refresh_after_rejection, held) == sandbox.current_token(SHOP_ID)
    assert await in_thread(plain.misc.get_wechat_ips) and token_fetches(sandbox) == fetched + 1
    # wechatpy's own client with its retry: a 40001 makes it fetch from WeChat itself.
    retrying = wechatpy.WeChatClient(SHOP_ID, helpers_face.SHOP_SECRET, session=TokenServerSession(tokens, account="shop"))
    to_wechat(retrying, sandbox_url)
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential")
    with caplog.at_level(logging.WARNING, logger="wechat_token_client"):
        await in_thread(retrying.misc.get_wechat_ips)
    assert token_fetches(sandbox) == fetched + 2 and sandbox.requests_to(ROTATIONS)  # wechatpy's own fetch
    assert any("fetched itself" in r.getMessage() for r in caplog.records)


def test_a_session_serves_one_appid():
    from wechat_token_client.wechatpy import TokenServerSession

    session = TokenServerSession(TokenClient("http://127.0.0.1:1", secret=TEST_SECRET, timeout=0.5), account="shop")
    session.set("other_key", {"x": 1}, ttl=60)
    assert session.get("other_key") == {"x": 1} and session.get("missing", 7) == 7
    with pytest.raises(TokenServerError):
        session.get(f"{SHOP_ID}_access_token")  # nothing listens: an error, never None (wechatpy would fetch)
    with pytest.raises(ValueError, match="one session per WeChatClient"):
        session.get(f"{MAIN_ID}_access_token")
    # The subclass takes no token but the server's, and no session but this one.
    from wechat_token_client.wechatpy import WeChatClient

    with pytest.raises(ValueError):
        WeChatClient(SHOP_ID, None, access_token="a-token-from-elsewhere", session=session)
    with pytest.raises(TypeError):
        WeChatClient(SHOP_ID, None)


# --- the distribution ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.gen_test(timeout=300)
async def test_the_distribution_holds_the_client_alone_and_works_without_tornado(make_config, sandbox_url, start_server, sandbox, tmp_path):
    """Builds the wheel from the checkout's pyproject.toml (pip fetches the build backend,
    flit_core, from the package index), installs it in a venv of its own and uses it there."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), src)
    shutil.copytree(os.path.join(ROOT, "wechat_token_client"), src / "wechat_token_client", ignore=shutil.ignore_patterns("__pycache__"))

    def run(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    dist = tmp_path / "dist"
    await in_thread(run, sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src))
    (wheel,) = dist.glob("wechat_token_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"wechat_token_client", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "wechat_token_client/py.typed" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert len(requires) == 1 and requires[0].startswith("Requires-Dist: redis") and 'extra == "redis"' in requires[0]

    venv = tmp_path / "venv"
    await in_thread(run, sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = str(venv / "bin" / "python")
    await in_thread(run, sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index", "--no-deps", str(wheel))
    srv = await start_server(face_config(make_config, sandbox_url))
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('tornado') is None, 'tornado is installed in the venv'\n"
        "import wechat_token_client\n"
        "assert 'tornado' not in sys.modules and 'redis' not in sys.modules\n"
        "print(wechat_token_client.__file__)\n"
        f"print(wechat_token_client.TokenClient('http://127.0.0.1:{srv.port}', secret=sys.argv[1]).get('access_token', 'shop'))\n"
    )
    where, token = (await in_thread(run, python, "-I", "-c", script, TEST_SECRET)).split()
    assert where.startswith(str(venv)) and token == sandbox.current_token(SHOP_ID)
