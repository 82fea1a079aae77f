"""The face's API proxy: calls forwarded to the account's api_base with the current token,
only for tokens issued here; one compare-and-refresh for a stale token, whatever the crowd;
hostile paths refused.  And the wechatpy recipe of the README, run with the real wechatpy."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from tornado.tcpclient import TCPClient

from tests import helpers_face
from tests.helpers_face import (
    MAIN_ID,
    MAIN_SECRET,
    SHOP_ID,
    SHOP_SECRET,
    face_config,
    token_fetches,
)

sandbox = helpers_face.sandbox  # the fixture: WeChat with several accounts
NO_AUTH: dict[str, str] = {}
IPS = "/cgi-bin/getcallbackip"
SEND = "/cgi-bin/message/custom/send"


async def token_of(call, port, appid, secret):
    status, body = await call(port, "/cgi-bin/token", headers=NO_AUTH, grant_type="client_credential", appid=appid, secret=secret)
    return body["access_token"]


@pytest.mark.gen_test
async def test_business_calls_go_through_with_the_cached_token(make_config, sandbox_url, start_server, call, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    fetched = token_fetches(sandbox)
    token = await token_of(call, srv.port, SHOP_ID, SHOP_SECRET)
    status, body = await call(srv.port, IPS, headers=NO_AUTH, access_token=token)
    assert status == 200 and body["ip_list"]
    message = json.dumps({"touser": "o1", "msgtype": "text", "text": {"content": "hi"}}).encode()
    status, body = await call(srv.port, SEND, headers={"Content-Type": "application/json", "X-Token-Secret": "never-forwarded"},
                              method="POST", body=message, access_token=token)
    assert (status, body) == (200, {"errcode": 0, "errmsg": "ok"})
    # WeChat's own error answers come back unchanged too.
    assert (await call(srv.port, SEND, headers=NO_AUTH, method="POST", body=b"{}", access_token=token))[1]["errcode"] == 40003
    assert token_fetches(sandbox) == fetched  # the SDK side cost no token fetch
    sent = sandbox.requests_to(SEND)[0]
    assert (sent.token_owner, sent.token_status, sent.body_size, sent.content_type) == (SHOP_ID, 0, len(message), "application/json")
    # The access log names the account and the path (and never the token: the session's leak check).
    assert any("POST /cgi-bin/message/custom/send" in line and "client=account:shop" in line for line in secret_watch.records)


@pytest.mark.gen_test
async def test_two_accounts_no_cross_talk(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    main_t, shop_t = await token_of(call, srv.port, MAIN_ID, MAIN_SECRET), await token_of(call, srv.port, SHOP_ID, SHOP_SECRET)
    assert main_t != shop_t
    for token in (main_t, shop_t, main_t, shop_t):
        assert "ip_list" in (await call(srv.port, IPS, headers=NO_AUTH, access_token=token))[1]
    owners = [r.token_owner for r in sandbox.requests_to(IPS)]
    assert owners == [MAIN_ID, SHOP_ID, MAIN_ID, SHOP_ID]


@pytest.mark.gen_test
async def test_a_multipart_upload_of_5_mb(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    token = await token_of(call, srv.port, MAIN_ID, MAIN_SECRET)
    media = os.urandom(5 * 1024 * 1024)
    boundary = "----face-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"media\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + media + f"\r\n--{boundary}--\r\n".encode()
    status, answer = await call(srv.port, "/cgi-bin/media/upload", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                method="POST", body=body, access_token=token, type="image")
    assert status == 200 and answer["size"] == len(media) and answer["type"] == "image", answer
    assert sandbox.requests_to("/cgi-bin/media/upload")[0].body_size == len(body)


@pytest.mark.gen_test
async def test_tokens_not_issued_here_never_reach_wechat(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    before = len(sandbox.requests)
    issued_elsewhere = sandbox.api_token("client_credential", SHOP_ID, SHOP_SECRET, "127.0.0.1")["access_token"]
    for params in ({"access_token": issued_elsewhere}, {"access_token": "x" * 600}, {"access_token": "\u00e9"}):
        assert (await call(srv.port, IPS, headers=NO_AUTH, **params))[1] == {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or not latest"}
    assert (await call(srv.port, IPS, headers=NO_AUTH))[1]["errcode"] == 41001
    assert (await call(srv.port, IPS, headers=NO_AUTH, query="access_token=a&access_token=b"))[1]["errcode"] == 40097
    # Not even our own request secret opens the proxy.
    assert (await call(srv.port, IPS))[1]["errcode"] == 41001
    assert len(sandbox.requests) == before


@pytest.mark.gen_test
async def test_appid_and_secret_calls_only_for_a_configured_pair(make_config, sandbox_url, start_server, call, sandbox, secret_watch):
    srv = await start_server(face_config(make_config, sandbox_url))
    before = len(sandbox.requests)
    login = {"grant_type": "authorization_code", "code": "c1"}
    status, body = await call(srv.port, "/sns/oauth2/access_token", headers=NO_AUTH, appid=MAIN_ID, secret=MAIN_SECRET, **login)
    assert status == 200 and body["openid"].startswith("o") and body["access_token"]
    for appid, secret in ((MAIN_ID, SHOP_SECRET), ("wx-nobody", MAIN_SECRET)):
        status, body = await call(srv.port, "/sns/oauth2/access_token", headers=NO_AUTH, appid=appid, secret=secret, **login)
        assert body["errcode"] in (40125, 40013)
    assert len(sandbox.requests) == before + 1


HOSTILE = [
    "/cgi-bin/../_sim",
    "/cgi-bin/../sandbox/reset",
    "/cgi-bin/%2e%2e/sandbox/stats",
    "/cgi-bin%2Fgetcallbackip",
    "/cgi-bin%2fgetcallbackip",
    "/cgi-bin/getcallbackip%00",
    "//evil.example/cgi-bin/getcallbackip",
    "/cgi-bin//getcallbackip",
    "/cgi-bin/./getcallbackip",
    "/cgi-bin/getcallbackip/..",
    "/cgi-bin\\getcallbackip",
    "/@evil.example/cgi-bin/getcallbackip",
    "/cgi-bin/getcallbackip;x",
]


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await TCPClient().connect("127.0.0.1", port)
    try:
        stream.write(request)
        return await asyncio.wait_for(stream.read_until_close(), 10)
    finally:
        stream.close()


@pytest.mark.gen_test
async def test_hostile_paths_never_leave_api_base(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    token = await token_of(call, srv.port, MAIN_ID, MAIN_SECRET)
    before = len(sandbox.requests)
    for path in HOSTILE:
        request = f"GET {path}?access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        answer = await raw_request(srv.port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"errcode": 40097, "errmsg": "invalid url path"}, (path, answer[:300])
    # An absolute URL in the request line names another host: refused the same way.
    for target in ("http://evil.example/cgi-bin/getcallbackip", f"{sandbox_url}/cgi-bin/getcallbackip"):
        answer = await raw_request(srv.port, f"GET {target}?access_token={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["errcode"] == 40097
    assert len(sandbox.requests) == before


@pytest.mark.gen_test
async def test_a_body_over_the_limit_gets_wechats_answer(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    token = await token_of(call, srv.port, MAIN_ID, MAIN_SECRET)
    before = len(sandbox.requests)
    head = (f"POST /cgi-bin/media/upload?access_token={token}&type=image HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {30 * 1024 * 1024}\r\n\r\n").encode()
    answer = await raw_request(srv.port, head + b"x" * 1000)
    assert json.loads(answer.partition(b"\r\n\r\n")[2].split(b"\r\n")[0] if b"Transfer-Encoding" in answer else answer.partition(b"\r\n\r\n")[2]) == {
        "errcode": 45001, "errmsg": "media size out of limit"}
    assert len(sandbox.requests) == before


@pytest.mark.gen_test
async def test_a_40001_storm_over_two_instances_costs_one_rotation(make_config, sandbox_url, start_server, call, sandbox):
    cfg = face_config(make_config, sandbox_url)
    a, b = await start_server(cfg), await start_server(cfg)
    held = await token_of(call, a.port, SHOP_ID, SHOP_SECRET)
    assert held == await token_of(call, b.port, SHOP_ID, SHOP_SECRET)
    # Someone fetches the shop's token behind our back, twice: the stored one dies at WeChat.
    for _ in range(2):
        sandbox.api_token("client_credential", SHOP_ID, SHOP_SECRET, "127.0.0.1")
    rotations = sandbox.issued["/cgi-bin/token"]
    answers = await asyncio.gather(*(call((a, b)[i % 2].port, IPS, headers=NO_AUTH, access_token=held) for i in range(50)))
    assert all(status == 200 and "ip_list" in body for status, body in answers), answers[:3]
    assert sandbox.issued["/cgi-bin/token"] == rotations + 1
    # The SDK still holds the rotated-out token (its previous): served, and no new rotation.
    for srv in (a, b):
        assert "ip_list" in (await call(srv.port, IPS, headers=NO_AUTH, access_token=held))[1]
    assert sandbox.issued["/cgi-bin/token"] == rotations + 1
    new = await token_of(call, a.port, SHOP_ID, SHOP_SECRET)
    assert new != held and new == sandbox.current_token(SHOP_ID)


@pytest.mark.gen_test
async def test_wechat_rejecting_the_new_token_too_rotates_no_more(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    token = await token_of(call, srv.port, SHOP_ID, SHOP_SECRET)
    rotations = sandbox.issued["/cgi-bin/token"]
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential", times=4)
    # The first call: 40001, one rotation, 40001 again on the retry.  An SDK that retries on its
    # own (wechatpy: without a limit) gets 40001 back each time, and nothing rotates again.
    for _ in range(3):
        token = await token_of(call, srv.port, SHOP_ID, SHOP_SECRET)
        assert (await call(srv.port, IPS, headers=NO_AUTH, access_token=token))[1]["errcode"] == 40001
    assert sandbox.issued["/cgi-bin/token"] == rotations + 1
    assert "ip_list" in (await call(srv.port, IPS, headers=NO_AUTH, access_token=token))[1]


@pytest.mark.gen_test
async def test_wechat_rejecting_the_new_token_too_rotates_no_more_over_two_instances(make_config, sandbox_url, start_server, call, sandbox):
    cfg = face_config(make_config, sandbox_url)
    a, b = await start_server(cfg), await start_server(cfg)
    rotations = sandbox.issued["/cgi-bin/token"]
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential", times=None)
    # An SDK retrying on its own, load-balanced over both instances: one rotation in all.
    for i in range(12):
        srv = (a, b)[i % 2]
        token = await token_of(call, srv.port, SHOP_ID, SHOP_SECRET)
        assert (await call(srv.port, IPS, headers=NO_AUTH, access_token=token))[1]["errcode"] == 40001
    assert sandbox.issued["/cgi-bin/token"] == rotations + 1
    sandbox.clear_faults()


@pytest.mark.gen_test
async def test_login_pairs_only_where_wechat_takes_them_and_each_argument_once(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    before = len(sandbox.requests)
    login = {"grant_type": "authorization_code", "code": "c1"}
    # The same pair on another path, a repeated appid, a missing secret: refused, never forwarded.
    status, body = await call(srv.port, "/cgi-bin/token/", headers=NO_AUTH, appid=SHOP_ID, secret=SHOP_SECRET, grant_type="client_credential")
    assert body["errcode"] == 41001
    status, body = await call(srv.port, "/sns/oauth2/access_token", headers=NO_AUTH,
                              query=f"appid={SHOP_ID}&secret={SHOP_SECRET}&appid=wx9999&secret=other-secret-0123456789&code=c&grant_type=authorization_code")
    assert body["errcode"] == 40097
    assert len(sandbox.requests) == before
    # A missing secret is no guess: not counted, however often (the limit is 10 a minute).
    for _ in range(12):
        status, body = await call(srv.port, "/sns/oauth2/access_token", headers=NO_AUTH, appid=SHOP_ID, **login)
        assert body == {"errcode": 41004, "errmsg": "appsecret missing"}
    status, body = await call(srv.port, "/sns/oauth2/access_token", headers=NO_AUTH, appid=SHOP_ID, secret=SHOP_SECRET, **login)
    assert status == 200 and "openid" in body


@pytest.mark.gen_test
async def test_bodies_held_in_memory_are_bounded_per_process(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    token = await token_of(call, srv.port, MAIN_ID, MAIN_SECRET)
    size = 20 * 1024 * 1024
    head = (f"POST /cgi-bin/media/upload?access_token={token}&type=image HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {size}\r\n\r\n").encode()
    # Three uploads announced and still arriving (their bodies are held for a retry): a
    # fourth would pass 64 MB, and gets WeChat's "system busy" before its body is read.
    streams = []
    for _ in range(3):
        stream = await TCPClient().connect("127.0.0.1", srv.port)
        await stream.write(head + b"x" * 1024)
        streams.append(stream)
    await asyncio.sleep(0.3)
    answer = await raw_request(srv.port, head)
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"errcode": -1, "errmsg": "system error"}
    for stream in streams:
        stream.close()
    await asyncio.sleep(0.3)  # the closed uploads give their share back
    status, body = await call(srv.port, IPS, headers=NO_AUTH, access_token=token)
    assert "ip_list" in body


# --- the wechatpy recipe (README, SDKs) ------------------------------------------------------


def wechatpy_client(port: int, appid: str, secret: str):
    """The README's recipe, as written there."""
    import requests.adapters
    from wechatpy import WeChatClient

    class ToTokenServer(requests.adapters.HTTPAdapter):
        """Sends every request for api.weixin.qq.com to the token server instead."""

        def __init__(self, base: str) -> None:
            super().__init__()
            self.base = base

        def send(self, request, **kwargs):
            request.url = self.base + request.url[len("https://api.weixin.qq.com"):]
            return super().send(request, **kwargs)

    client = WeChatClient(appid, secret)
    client._http.mount("https://api.weixin.qq.com/", ToTokenServer(f"http://127.0.0.1:{port}"))
    return client


@pytest.fixture
def quiet_urllib3():
    """urllib3 logs every URL at DEBUG, and wechatpy's token fetch has the AppSecret in its
    query (WeChat's API design): keep it out of this test process's log (see README, SDKs)."""
    logger = logging.getLogger("urllib3")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.mark.gen_test(timeout=60)
async def test_wechatpy_goes_through_the_server(make_config, sandbox_url, start_server, sandbox, quiet_urllib3):
    srv = await start_server(face_config(make_config, sandbox_url))
    client = wechatpy_client(srv.port, SHOP_ID, SHOP_SECRET)
    loop = asyncio.get_running_loop()
    fetched, rotations = token_fetches(sandbox), sandbox.issued["/cgi-bin/token"]
    # Synchronous requests: in a thread, so that the server on this loop keeps serving.
    ips = await loop.run_in_executor(None, client.misc.get_wechat_ips)
    assert ips and sandbox.requests_to(IPS)[-1].token_owner == SHOP_ID
    sent = await loop.run_in_executor(None, client.message.send_text, "o1", "hi")
    assert sent == {"errcode": 0, "errmsg": "ok"}
    assert token_fetches(sandbox) == fetched  # its token came from the cache
    # WeChat rejects the token once: one rotation, and wechatpy never notices.
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential")
    assert await loop.run_in_executor(None, client.misc.get_wechat_ips)
    assert sandbox.issued["/cgi-bin/token"] == rotations + 1
    # Twice in a row: the server's one retry fails too, wechatpy fetches (from the cache) and
    # retries with the current token, which works: still no second rotation.
    sandbox.inject(IPS, "errcode", errcode=40001, errmsg="invalid credential", times=2)
    assert await loop.run_in_executor(None, client.misc.get_wechat_ips)
    assert sandbox.issued["/cgi-bin/token"] == rotations + 2
