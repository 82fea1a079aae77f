"""Hostile input: every route answers malformed, repeated, huge, non-UTF-8 or unexpected
input with a 4xx JSON error, never a 500 or a traceback; ``type`` never reaches Redis or a
URL unchecked.  Explicit cases first, then a property-based test (hypothesis) that throws
generated methods, paths, query strings, headers and bodies at the running server.
"""

from __future__ import annotations

import time
from urllib.parse import quote, quote_from_bytes

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, DEFAULT_CORPID, DEFAULT_CORPSECRET
from tests.conftest import TEST_SECRET

SHOP_SECRET = "shop-secret-0123456789abcdefXYZ"
KEY1 = "jwt-key-one-0123456789abcdefghijklmnop"
ROUTES = ["/wechat/token", "/wechat/token/forcerefresh", "/healthz", "/readyz", "/status", "/wechat/jssdk/config"]


@pytest.fixture(autouse=True)
def watch_our_secrets(secret_watch):
    secret_watch.secrets.update({SHOP_SECRET, KEY1, DEFAULT_CORPSECRET})


def hostile_config(make_config, sandbox_url):
    # Two accounts beside the plain sources (so neither is the default and the plain names stay
    # the sources'): "web" signs JS-SDK pages publicly, "corp" is a WeCom app with both tickets.
    accounts = {
        "web": {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": ["jsapi"], "api_base": sandbox_url,
                "jssdk": {"allowed_domains": ["shop.example.com"], "public": True, "public_per_minute": 1_000_000}},
        "corp": {"kind": "wecom", "corpid": DEFAULT_CORPID, "corpsecret": DEFAULT_CORPSECRET, "agentid": 1000002,
                 "tickets": ["jsapi", "agent_config"], "api_base": sandbox_url, "jssdk": {"allowed_domains": ["shop.example.com"]}},
    }
    return make_config(
        server={"auth_failures_per_minute": 1_000_000},  # keep the generated requests reaching the handlers
        clients=[{"name": "shop", "secret": SHOP_SECRET, "sources": ["access_token"]}],
        jwt={"keys": {"k1": KEY1}},
        accounts=accounts,
    )


def assert_json_error(status, body, expected_status=None):
    assert status == expected_status if expected_status else 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"errcode", "errmsg"}, body
    assert body["errcode"] == status and isinstance(body["errmsg"], str)
    assert "Traceback" not in body["errmsg"] and len(body["errmsg"]) < 100


# --- explicit cases -----------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "query, errmsg",
    [
        ("type=access_token&type=ticket", "repeated argument type"),
        ("type=%FF%FE", "argument type is not UTF-8"),
        ("type=" + "a" * 5000, "argument type too long"),
        ("type=access_token&callback=x", "unknown argument callback"),
        ("type=access_token&" + quote(TEST_SECRET) + "=1", "unknown argument ?"),  # a secret as a name is not echoed
        ("type=access_token&%FF=1", "unknown argument ?"),
        ("type=", "missing type"),
        ("", "missing type"),
        ("type=access_token&secret=a&secret=b", "repeated argument secret"),
    ],
)
async def test_malformed_query_is_a_400(query, errmsg, make_config, sandbox_url, start_server, call):
    srv = await start_server(hostile_config(make_config, sandbox_url))
    for path in ("/wechat/token", "/wechat/token/forcerefresh"):
        status, body = await call(srv.port, path, query=query)
        assert_json_error(status, body, 400)
        assert body["errmsg"] == errmsg


@pytest.mark.gen_test
async def test_repeated_secret_is_ambiguous_not_a_guess(make_config, sandbox_url, start_server, call):
    srv = await start_server(hostile_config(make_config, sandbox_url))
    query = f"type=access_token&secret={quote(TEST_SECRET)}&secret=wrong-wrong-wrong-wrong"
    status, body = await call(srv.port, "/wechat/token", headers={}, query=query)
    assert_json_error(status, body, 400)
    assert body["errmsg"] == "repeated argument secret"


@pytest.mark.gen_test
async def test_unknown_type_reaches_neither_redis_nor_upstream(make_config, sandbox_url, start_server, call, redis_sync, sandbox):
    srv = await start_server(hostile_config(make_config, sandbox_url))
    keys = set(redis_sync.keys("*"))
    calls = dict(sandbox.calls)
    for name in ("access_token:lock", "access_token:meta", "*", "ticket ", " ticket", "TICKET", "../ticket",
                 "access_token\r\nFLUSHALL", "http://evil.example/", "<<access_token>>", "a" * 64):
        for path in ("/wechat/token", "/wechat/token/forcerefresh"):
            status, body = await call(srv.port, path, type=name)
            assert_json_error(status, body, 404)
            assert body["errmsg"] == "unknown type"
    assert set(redis_sync.keys("*")) == keys
    assert dict(sandbox.calls) == calls


@pytest.mark.gen_test
async def test_repeated_credential_headers_and_other_methods(make_config, sandbox_url, start_server, call):
    srv = await start_server(hostile_config(make_config, sandbox_url))
    client = AsyncHTTPClient(force_instance=True)
    try:
        from tornado.httputil import HTTPHeaders

        headers = HTTPHeaders()
        headers.add("X-Token-Secret", TEST_SECRET)
        headers.add("X-Token-Secret", SHOP_SECRET)
        resp = await client.fetch(
            HTTPRequest(f"http://127.0.0.1:{srv.port}/wechat/token?type=access_token", headers=headers), raise_error=False
        )
        assert resp.code == 400 and b"repeated X-Token-Secret header" in resp.body
    finally:
        client.close()
    for method, body in (("POST", b"type=access_token"), ("PUT", b"{}"), ("DELETE", None), ("OPTIONS", None), ("PROPFIND", None)):
        status, answer = await call(srv.port, "/wechat/token", method=method, body=body, type="access_token")
        assert_json_error(status, answer, 405)


# --- generated ----------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_huge = st.builds(lambda chunk, n: chunk * n, st.sampled_from([b"a", b"\xff", "\u00e9".encode(), b"%"]), st.integers(4000, 6000))
_names = st.one_of(st.sampled_from(["type", "old", "secret", "TYPE", "type[]", "", "callback", "_"]), _text)
_values = st.one_of(
    st.sampled_from(
        ["access_token", "ticket", "", "nope", "*", "access_token:lock", TEST_SECRET, SHOP_SECRET,
         "\x00", "\u00e9", "\U0001f600", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"access_token\xff"]
    ),
    _text,
    st.binary(max_size=40),
    _huge,
)


def _encode(part: str | bytes) -> str:
    data = part.encode("utf-8") if isinstance(part, str) else part
    return quote_from_bytes(data, safe="")


_pair = st.tuples(_names, _values).map(lambda kv: f"{_encode(kv[0])}={_encode(kv[1])}")
_raw = st.sampled_from(["%", "%zz", "%%", "=", "&", ";", "==", "+", "%00", "%C0%AF", "type", "type=access_token"])


@st.composite
def queries(draw):
    """A plausible start (often a valid request) followed by generated parts."""
    start = st.one_of(
        st.sampled_from(["type=access_token", "type=ticket", "type=access_token&old=x", "",
                         "url=https%3A%2F%2Fshop.example.com%2Fa%3Fb%3D1%23c&account=web", "url=https%3A%2F%2Fshop.example.com%2F&account=corp&type=agent_config"]),
        _values.map(lambda v: f"url={_encode(v)}&account=web"),
        _values.map(lambda v: f"url=https%3A%2F%2Fshop.example.com%2F&account={_encode(v)}"),
        _values.map(lambda v: f"type={_encode(v)}"),
        _values.map(lambda v: f"type=access_token&old={_encode(v)}"),
    )
    parts = [draw(start)]
    parts += draw(st.one_of(st.just([]), st.lists(st.one_of(_pair, _raw), max_size=5)))
    query = "&".join(p for p in parts if p)
    while len(query) > 40_000:  # stay under the server's 64 KB header limit
        parts.pop()
        query = "&".join(parts)
    return query


def _valid_jwt(**claims):
    payload = {"sub": "shop", "aud": "wechat-token-server", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, KEY1, algorithm="HS256", headers={"kid": "k1"})


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=200)
_header_values = st.one_of(
    st.sampled_from(
        [
            TEST_SECRET, SHOP_SECRET, f"Bearer {TEST_SECRET}", f"bearer {SHOP_SECRET}", "Bearer ", "Basic Zm9vOmJhcg==",
            "Bearer eyJ.e30.", "Bearer a.b.c", "10.1.2.3", "::1", "1.2.3.4, 5.6.7.8", "garbage", "999.1.1.1",
            "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json",
            "https://shop.example.com", "https://evil.example", "null",
        ]
    ),
    _header_text,
)
_credentials = st.sampled_from([None, "default", "shop", "jwt_shop", "jwt_bot"])
_headers = st.dictionaries(
    st.sampled_from(["Authorization", "X-Token-Secret", "X-Real-IP", "X-Forwarded-For", "Content-Type", "Cookie",
                     "Accept", "Accept-Encoding", "Origin", "Range", "If-None-Match", "X-Whatever"]),
    _header_values,
    max_size=5,
)
_methods = st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
_paths = st.sampled_from(ROUTES[:2] * 3 + ROUTES[2:] * 2 + ["/", "/wechat/token/", "/wechat/token/x", "/%FF", "/wechat/%00token", "/..%2f..%2fetc/passwd"])


def test_generated_requests_get_a_json_answer_below_500(io_loop, make_config, sandbox_url, start_server, call):
    srv = io_loop.run_sync(lambda: start_server(hostile_config(make_config, sandbox_url)))
    credentials = {
        "default": {"X-Token-Secret": TEST_SECRET},
        "shop": {"Authorization": f"Bearer {SHOP_SECRET}"},
        "jwt_shop": {"Authorization": f"Bearer {_valid_jwt()}"},
        "jwt_bot": {"Authorization": f"Bearer {_valid_jwt(sub='bot', sources=['ticket'])}"},
    }
    seen: set[int] = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    # Explicit examples first: valid requests, so the run always covers the success paths too.
    @example(method="GET", path="/wechat/token", query="type=access_token", headers={}, credential="default", body=None)
    @example(method="GET", path="/wechat/token/forcerefresh", query="type=ticket&old=x", headers={}, credential="jwt_bot", body=None)
    @example(method="GET", path="/status", query="", headers={}, credential="shop", body=None)
    @example(method="PUT", path="/wechat/token", query="type=access_token", headers={}, credential="default", body=b"x")
    @example(method="GET", path="/wechat/jssdk/config", query="url=https%3A%2F%2Fshop.example.com%2F&account=corp&type=agent_config",
             headers={}, credential="default", body=None)
    @example(method="OPTIONS", path="/wechat/jssdk/config", query="url=x&account=web", headers={"Origin": "https://shop.example.com"},
             credential=None, body=None)
    @given(
        method=_methods,
        path=_paths,
        query=queries(),
        headers=_headers,
        credential=_credentials,
        body=st.one_of(st.none(), st.binary(max_size=300), st.just(b"secret=" + TEST_SECRET.encode() + b"&type=ticket")),
    )
    def check(method, path, query, headers, credential, body):
        if credential is not None:  # a valid credential, so that the checks after the gate are reached too
            headers = {**headers, **credentials[credential]}
        status, answer = io_loop.run_sync(lambda: call(srv.port, path, method=method, headers=headers, query=query, body=body))
        seen.add(status)
        assert 200 <= status < 500, (status, answer)
        if method == "HEAD" or status == 204:
            return  # no body by definition (204: the CORS preflight of a public JS-SDK account)
        assert isinstance(answer, dict), answer
        if status >= 400:
            assert_json_error(status, answer)
        for secret in (TEST_SECRET, SHOP_SECRET, KEY1):
            assert secret not in str(answer)

    check()
    assert {200, 400, 404, 405} <= seen and seen & {401, 403}, seen  # every layer was reached


# --- the WeChat-shaped face: generated paths never leave api_base -------------------------------

_segment = st.one_of(
    st.sampled_from(["cgi-bin", "sns", "wxa", "datacube", "card", "getcallbackip", "message", "custom", "send", "media",
                     "upload", "_sim", "sandbox", "requests", "faults", "reset", "..", ".", "", "%2e%2e", "%2F", "%2f..",
                     "%00", "%5C", "\\", "@evil.example", "evil.example:80", "http:", "https:", "~", ";x", "a b", "%FF"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="?#"), min_size=1, max_size=12),
)
_face_paths = st.lists(_segment, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))


def test_generated_paths_through_the_face_never_leave_api_base(io_loop, make_config, sandbox_url, start_server, call, sandbox):
    srv = io_loop.run_sync(lambda: start_server(hostile_config(make_config, sandbox_url)))
    status, body = io_loop.run_sync(lambda: call(srv.port, "/wechat/token", type="access_token", account="web"))
    token = body["access_token"]
    fetched = sandbox.calls["/cgi-bin/stable_token"]
    seen: set[int] = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @example(method="GET", path="/cgi-bin/getcallbackip", with_token=True, body=None)
    @example(method="GET", path="/cgi-bin/../sandbox/reset", with_token=True, body=None)
    @example(method="POST", path="/cgi-bin/%2e%2e/sandbox/reset", with_token=True, body=b"{}")
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]), path=_face_paths, with_token=st.booleans(),
           body=st.one_of(st.none(), st.binary(max_size=200)))
    def check(method, path, with_token, body):
        before = len(sandbox.requests)
        query = f"access_token={token}" if with_token else "access_token=not-issued-here"
        status, answer = io_loop.run_sync(
            lambda: call(srv.port, path, method=method, headers={}, query=query, body=body if method in ("POST", "PUT") else None))
        seen.add(status)
        assert status < 500 or status == 599, (path, status, answer)
        forwarded = list(sandbox.requests)[before:]
        for record in forwarded:
            # Only a plain path that was asked for, with the server's own token, reaches WeChat.
            assert record.path == path and ".." not in record.path.split("/") and "%" not in record.path, (path, record)
            assert record.access_token == token, path
        if not with_token:
            assert not forwarded, f"a token this server never issued was forwarded: {path}"
        if method != "HEAD" and status < 500 and isinstance(answer, dict) and "errcode" in answer and not forwarded:
            assert isinstance(answer["errcode"], int) and isinstance(answer.get("errmsg", ""), str)
            assert TEST_SECRET not in str(answer) and DEFAULT_APPSECRET not in str(answer)

    check()
    # The sandbox's control API was never reached: its counters were not reset.
    assert sandbox.calls["/cgi-bin/stable_token"] == fetched >= 1
    assert 200 in seen, seen
