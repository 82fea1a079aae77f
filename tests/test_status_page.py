"""The operator's status page over real HTTP, without a browser: login, session cookie, CSRF,
what the data endpoint shows (and never shows).  The browser itself: test_status_browser.py."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from server.sandbox import DEFAULT_APPSECRET
from server.web.session import COOKIE, SESSION_SECONDS
from tests.conftest import AUTH, TEST_SECRET

TOKEN_PATH = "/cgi-bin/token"
TICKET_PATH = "/cgi-bin/ticket/getticket"
CLIENT_SECRET = "client-secret-0123456789abcdefXYZ"
PAGE = "/wechat/status/"


class Browserish:
    """Real HTTP to one server, keeping the session cookie like a browser (no redirects followed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = AsyncHTTPClient(force_instance=True)
        self.cookie: str | None = None
        self.csrf = ""

    async def request(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None) -> HTTPResponse:
        sent = dict(headers or {})
        if self.cookie is not None:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        req = HTTPRequest(f"http://127.0.0.1:{self.port}{path}", method=method, body=body, headers=sent, follow_redirects=False)
        return await self.client.fetch(req, raise_error=False)

    async def login(self, secret: str = TEST_SECRET, headers: dict[str, str] | None = None) -> HTTPResponse:
        form = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        resp = await self.request(PAGE + "login", "POST", urlencode({"secret": secret}).encode(), form)
        morsel = set_cookie(resp)
        if morsel is not None:
            self.cookie = morsel.value
        return resp

    async def data(self) -> tuple[int, Any]:
        resp = await self.request(PAGE + "data")
        body = json.loads(resp.body)
        if resp.code == 200:
            self.csrf = body["csrf"]
        return resp.code, body

    async def force(self, source: str, csrf: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        resp = await self.request(PAGE + "refresh", "POST", json.dumps({"source": source}).encode(), headers)
        return resp.code, json.loads(resp.body)


def set_cookie(resp: HTTPResponse) -> Any:
    headers = resp.headers.get_list("Set-Cookie")
    if not headers:
        return None
    jar: SimpleCookie = SimpleCookie()
    jar.load(headers[0])
    return jar[COOKIE]


@pytest.fixture
def browserish(io_loop):
    made: list[Browserish] = []

    def make(port: int) -> Browserish:
        made.append(Browserish(port))
        return made[-1]

    yield make
    for b in made:
        b.client.close()


@pytest.mark.gen_test
async def test_the_page_and_its_data_need_a_login(make_config, start_server, browserish):
    srv = await start_server(make_config())
    b = browserish(srv.port)
    resp = await b.request(PAGE)
    assert resp.code == 302 and resp.headers["Location"] == "login"
    assert (await b.request("/wechat/status")).headers["Location"] == "status/"
    code, body = await b.data()
    assert (code, body) == (401, {"errcode": 401, "errmsg": "login required"})
    assert await b.force("access_token", csrf="x") == (401, {"errcode": 401, "errmsg": "login required"})
    # The API's header secret is not a session: the page is for browsers.
    assert (await b.request(PAGE + "data", headers=AUTH)).code == 401
    form = await b.request(PAGE + "login")
    assert form.code == 200 and form.headers["Content-Type"].startswith("text/html")
    assert b'name="secret"' in form.body and b'type="password"' in form.body
    assert "script-src 'self'" in form.headers["Content-Security-Policy"] and form.headers["X-Frame-Options"] == "DENY"
    # Never a secret in a URL: any query argument is refused, the secret first of all.
    resp = await b.request(PAGE + "?" + urlencode({"secret": TEST_SECRET}))
    assert resp.code == 400 and json.loads(resp.body)["errmsg"] == "the status page takes no query arguments"
    assert (await b.request(PAGE + "nowhere.html")).code == 404


@pytest.mark.gen_test
async def test_login_sets_an_httponly_samesite_strict_session_cookie(make_config, start_server, browserish, sandbox):
    srv = await start_server(make_config())
    b = browserish(srv.port)
    resp = await b.login()
    assert resp.code == 303 and resp.headers["Location"] == "./"
    cookie = set_cookie(resp)
    assert cookie["httponly"] is True and cookie["samesite"] == "Strict" and cookie["path"] == "/wechat/status"
    assert cookie["secure"] == "" and int(cookie["max-age"]) == SESSION_SECONDS  # plain HTTP: no Secure
    assert TEST_SECRET not in resp.headers["Set-Cookie"]
    page = await b.request(PAGE)
    assert page.code == 200 and b'<script src="status.js"' in page.body and page.headers["Cache-Control"] == "no-store"
    assert (await b.request(PAGE + "status.js")).headers["Content-Type"].startswith("text/javascript")
    assert (await b.data())[0] == 200
    # Behind TLS: X-Forwarded-Proto from a trusted proxy (127.0.0.1 by default) makes it Secure.
    tls = await browserish(srv.port).login(headers={"X-Forwarded-Proto": "https"})
    assert tls.code == 303 and set_cookie(tls)["secure"] is True
    # A tampered cookie is no session.
    b.cookie = b.cookie[:-2] + ("aa" if not b.cookie.endswith("aa") else "bb")
    assert (await b.request(PAGE)).code == 302


@pytest.mark.gen_test
async def test_x_forwarded_proto_from_an_untrusted_peer_is_not_believed(make_config, start_server, browserish):
    srv = await start_server(make_config(server={"trusted_proxies": []}))
    resp = await browserish(srv.port).login(headers={"X-Forwarded-Proto": "https"})
    assert resp.code == 303 and set_cookie(resp)["secure"] == ""


@pytest.mark.gen_test
async def test_a_session_survives_a_restart_and_spans_instances(make_config, start_server, browserish):
    cfg = make_config()
    first, second = await start_server(cfg), await start_server(cfg)
    a = browserish(first.port)
    assert (await a.login()).code == 303
    b = browserish(second.port)
    b.cookie = a.cookie  # the cookie key is derived from server.secret, not drawn per process
    assert (await b.data())[0] == 200
    other = await start_server(make_config(server={"secret": "another-request-secret-0123456789"}))
    c = browserish(other.port)
    c.cookie = a.cookie  # a new server.secret ends every session
    assert (await c.data())[0] == 401


@pytest.mark.gen_test
async def test_wrong_secrets_are_refused_and_counted_with_the_api(make_config, start_server, browserish, call, secret_watch):
    secret_watch.secrets.add(CLIENT_SECRET)
    srv = await start_server(make_config(server={"auth_failures_per_minute": 3},
                                         clients=[{"name": "shop", "secret": CLIENT_SECRET, "sources": ["access_token"]}]))
    b = browserish(srv.port)
    empty = await b.login("")
    assert empty.code == 400 and b"enter the operator secret" in empty.body  # not counted
    wrong = await b.login("wrong-secret-0123456789abcdef")
    assert wrong.code == 403 and b'class="error"' in wrong.body and b"wrong secret" in wrong.body and set_cookie(wrong) is None
    # A client's secret is valid for the API but does not open the operator's page.
    assert (await b.login(CLIENT_SECRET)).code == 403
    assert (await b.login(DEFAULT_APPSECRET)).code == 403
    # Three failures used the IP's minute: now even the right secret gets 429, on the page and the API.
    over = await b.login()
    assert over.code == 429 and int(over.headers["Retry-After"]) >= 1 and set_cookie(over) is None
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 429 and body["errmsg"] == "too many failed authentications"


@pytest.mark.gen_test
async def test_forced_refresh_needs_the_sessions_csrf_token(make_config, start_server, browserish, sandbox):
    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    b = browserish(srv.port)
    await b.login()
    code, data = await b.data()
    assert code == 200 and data["csrf"]
    calls = sandbox.calls[TOKEN_PATH]
    assert await b.force("access_token") == (403, {"errcode": 403, "errmsg": "missing or wrong CSRF token"})
    assert (await b.force("access_token", csrf="0" * 64))[0] == 403
    # Another session's token is not this one's.
    other = browserish(srv.port)
    await other.login()
    await other.data()
    assert other.csrf != b.csrf and (await b.force("access_token", csrf=other.csrf))[0] == 403
    assert sandbox.calls[TOKEN_PATH] == calls  # nothing was called
    before = sandbox.current_token()
    code, body = await b.force("access_token", csrf=b.csrf)
    assert code == 200 and body["source"] == "access_token" and body["new"] is True and body["expires_in"] > 6900
    assert sandbox.calls[TOKEN_PATH] == calls + 1 and sandbox.current_token() != before
    assert await b.force("nope", csrf=b.csrf) == (404, {"errcode": 404, "errmsg": "unknown source"})
    # Logout needs it too, then the session is gone from this browser.
    assert (await b.request(PAGE + "logout", "POST", b"")).code == 403
    out = await b.request(PAGE + "logout", "POST", b"", {"X-CSRF-Token": b.csrf})
    assert out.code == 200 and set_cookie(out).value == ""
    b.cookie = None
    assert (await b.request(PAGE)).code == 302


@pytest.mark.gen_test
async def test_data_shows_states_and_never_a_value(make_config, start_server, browserish, sandbox, call):
    sandbox.inject(TICKET_PATH, "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9 ipv6 ::ffff:203.0.113.9, not in whitelist", times=None)
    srv = await start_server(make_config())
    b = browserish(srv.port)
    await b.login()
    await b.data()  # the CSRF token, for the button below
    resp = await b.request(PAGE + "data")
    text = resp.body.decode()
    issued = sandbox.issued_values()
    assert issued and not [v for v in issued if v in text]
    assert TEST_SECRET not in text and DEFAULT_APPSECRET not in text
    data = json.loads(text)
    token, ticket = data["sources"]["access_token"], data["sources"]["ticket"]
    # Everything /status says, plus what the page needs.
    _, status = await call(srv.port, "/status")
    assert set(status["sources"]["access_token"]) <= set(token)
    assert token["state"] == "ok" and token["blocked"] is None and 6900 < token["expires_in"] <= 7000
    assert token["upstream_calls"] == 1 and abs(token["fetched_at"] - data["server_time"]) < 30
    assert ticket["state"] == "blocked" and ticket["fetched_at"] is None and ticket["expires_in"] == 0
    assert ticket["blocked"]["errcode"] == 40164 and "203.0.113.9" in ticket["blocked"]["errmsg"]
    assert "IP whitelist" in ticket["blocked"]["advice"] and ticket["blocked"]["ends_in"] is None
    # The operator's forced refresh from the page retries the blocked source (WeChat fixed).
    sandbox.clear_faults()
    code, body = await b.force("ticket", csrf=b.csrf)
    assert code == 200 and body["new"] is True
    _, data = await b.data()
    assert data["sources"]["ticket"]["state"] == "ok" and data["sources"]["ticket"]["blocked"] is None
    assert not [v for v in sandbox.issued_values() if v in json.dumps(data)]


@pytest.mark.gen_test
async def test_hostile_bodies_get_4xx_and_reach_nothing(make_config, start_server, browserish, sandbox, redis_sync):
    srv = await start_server(make_config())
    b = browserish(srv.port)
    await b.login()
    await b.data()
    keys, calls = set(redis_sync.keys("*")), dict(sandbox.calls)
    json_headers = {"Content-Type": "application/json", "X-CSRF-Token": b.csrf}
    for body, status in [(b"not json", 400), (b"\xff\xfe", 400), (b"[1, 2]", 404), (b'{"source": 5}', 404),
                         (b'{"source": "access_token:lock"}', 404), (b'{"source": "../ticket"}', 404), (b"", 404),
                         (b'{"source": "' + b"a" * 5000 + b'"}', 0)]:
        resp = await b.request(PAGE + "refresh", "POST", body, json_headers)
        if status == 0:  # over the 4 KiB body limit: Tornado's parser answers a bare 400 before any handler
            assert resp.code == 400 and not resp.body
            continue
        assert resp.code == status, (body[:20], resp.code, resp.body)
        assert set(json.loads(resp.body)) == {"errcode", "errmsg"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"secret=%FF%FE", b"secret=a&secret=b", b"other=1", b"\x00" * 100):
        resp = await b.request(PAGE + "login", "POST", body, form)
        assert 400 <= resp.code < 500 and set_cookie(resp) is None, (body, resp.code)
    assert (await b.request(PAGE + "data", "POST", b"")).code == 405
    assert set(redis_sync.keys("*")) - keys <= {k for k in redis_sync.keys("*") if "auth-failures" in k}
    assert dict(sandbox.calls) == calls


@pytest.mark.gen_test
async def test_data_names_the_instance_that_holds_the_lock(make_config, start_server, browserish, sandbox, call):
    import asyncio
    import os
    import socket

    from server.sandbox import TOKEN_PATH

    srv = await start_server(make_config(refresh={"force_min_interval": 0}))
    b = browserish(srv.port)
    await b.login()
    _, data = await b.data()
    assert data["sources"]["access_token"]["lock_holder"] is None
    sandbox.inject(TOKEN_PATH, "hang", delay=1.5)
    forced = asyncio.ensure_future(call(srv.port, "/wechat/token/forcerefresh", type="access_token"))
    await asyncio.sleep(0.5)
    _, data = await b.data()
    assert data["sources"]["access_token"]["lock_holder"] == f"{socket.gethostname()}:{os.getpid()}"
    assert data["sources"]["ticket"]["lock_holder"] is None
    assert (await forced)[0] == 200
    _, data = await b.data()
    assert data["sources"]["access_token"]["lock_holder"] is None


@pytest.mark.gen_test
async def test_a_cross_site_login_form_is_refused_before_anything_is_counted(make_config, start_server, browserish, call):
    srv = await start_server(make_config())
    b = browserish(srv.port)
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null", "Sec-Fetch-Site": "same-site"}):
        for _ in range(12):  # more than server.auth_failures_per_minute
            resp = await b.login("wrong-secret-0123456789", headers=headers)
            assert resp.code == 403 and b"must be sent from this page" in resp.body
    # Nothing was counted: the operator's IP still reaches the API, and logs in from the page.
    assert (await call(srv.port, "/wechat/token", type="access_token"))[0] == 200
    # What Chromium sends for the page's own form (Referrer-Policy: no-referrer makes Origin null).
    resp = await b.login(headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert resp.code == 303
