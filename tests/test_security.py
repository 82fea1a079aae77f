"""Locked down: clients and scopes, JWT, IP rules, brute force, forced-refresh limit, secrets
kept out of responses, logs and reprs, and config refusals.

Real HTTP through the running server (conftest's ``start_server``), real Redis, the sandbox
as upstream.  Requests come from real loopback peers (127.0.0.1, 127.0.0.2, ...); the rate
limiters get a fake clock through the Authenticator the app was built with.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

import jwt
import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError

from server.auth import Authenticator
from server.config import ConfigError
from server.config_file import load_config, parse_config
from server.ratelimit import CACHE_SECONDS
from server.redact import RedactFilter, Redactor, config_secrets
from server.sandbox import DEFAULT_APPSECRET
from tests.conftest import AUTH, TEST_SECRET, base_config
from token_server import setup_logging

SHOP_SECRET = "shop-secret-0123456789abcdefXYZ"
OPS_SECRET = "ops-secret-0123456789abcdefXYZ"
KEY1 = "jwt-key-one-0123456789abcdefghijklmnop"
KEY2 = "jwt-key-two-0123456789abcdefghijklmnop"
AUDIENCE = "wechat-token-server"
CLIENTS = [
    {"name": "shop", "secret": SHOP_SECRET, "sources": ["access_token"]},
    {"name": "ops", "secret": OPS_SECRET, "sources": ["ticket"]},
]
JWT_CFG = {"keys": {"k1": KEY1, "k2": KEY2}, "audience": AUDIENCE}


@pytest.fixture(autouse=True)
def watch_our_secrets(secret_watch):
    """Make conftest's log watch look for this file's secrets too."""
    secret_watch.secrets.update({SHOP_SECRET, OPS_SECRET, KEY1, KEY2})


def failures_counted(redis_sync) -> int:
    """Failed authentications counted in Redis's shared limit (all IPs)."""
    return sum(int(redis_sync.get(k) or 0) for k in redis_sync.keys("wechat-token:limits*auth-failures*"))


async def limit_windows_end_in(redis_sync, seconds: float) -> None:
    """Make every rate-limit window end in ``seconds`` (Redis keeps them as TTLs), then wait
    until the instances' one-second caches of the counts have gone."""
    for key in redis_sync.keys("wechat-token:limits*"):
        redis_sync.pexpire(key, max(1, int(seconds * 1000)))
    await asyncio.sleep(CACHE_SECONDS + 0.1)


@pytest.fixture
def fetch(io_loop):
    """``await fetch(port, path, source_ip=..., headers=..., **params)`` -> (status, body, headers);
    ``(599, None, {})`` when the connection was closed without an answer (refused at accept)."""
    client = AsyncHTTPClient(force_instance=True)

    async def _fetch(port, path, *, source_ip="127.0.0.1", headers=None, **params):
        from urllib.parse import urlencode

        qs = urlencode(params)
        req = HTTPRequest(
            f"http://127.0.0.1:{port}{path}" + (f"?{qs}" if qs else ""),
            headers=AUTH if headers is None else headers,
            network_interface=source_ip,
        )
        try:
            resp = await client.fetch(req, raise_error=False)
        except HTTPStreamClosedError:
            return 599, None, {}
        return resp.code, json.loads(resp.body), resp.headers

    yield _fetch
    client.close()


def log_lines(secret_watch, since: int, needle: str) -> list[str]:
    return [line for line in secret_watch.records[since:] if needle in line]


# --- clients and scopes -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_client_may_use_only_its_sources_on_every_endpoint(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config(clients=CLIENTS))
    shop = {"X-Token-Secret": SHOP_SECRET}
    since = len(secret_watch.records)
    assert (await call(srv.port, "/wechat/token", headers=shop, type="access_token"))[0] == 200
    for path in ("/wechat/token", "/wechat/token/forcerefresh"):
        status, body = await call(srv.port, path, headers=shop, type="ticket")
        assert (status, body) == (403, {"errcode": 403, "errmsg": "type not allowed for this client"})
    status, body = await call(srv.port, "/status", headers=shop)
    assert status == 200 and set(body["sources"]) == {"access_token"}
    ops = {"Authorization": f"Bearer {OPS_SECRET}"}
    assert (await call(srv.port, "/wechat/token", headers=ops, type="ticket"))[0] == 200
    assert (await call(srv.port, "/wechat/token", headers=ops, type="access_token"))[0] == 403
    # the access log names the client and shows no query string (the secret is checked by the watch)
    lines = log_lines(secret_watch, since, "GET /wechat/token")
    assert any(line.startswith("200 GET /wechat/token ") and "client=shop auth=secret" in line for line in lines)
    assert any(line.startswith("403 GET /wechat/token/forcerefresh ") and "client=shop" in line for line in lines)
    assert not any("?" in line or "type=" in line for line in lines)


@pytest.mark.gen_test
async def test_default_secret_may_use_every_source(make_config, start_server, call):
    srv = await start_server(make_config(clients=CLIENTS))
    for name in ("access_token", "ticket"):
        assert (await call(srv.port, "/wechat/token", type=name))[0] == 200
    status, body = await call(srv.port, "/status")
    assert set(body["sources"]) == {"access_token", "ticket"}


@pytest.mark.gen_test
async def test_secret_in_query_works_and_never_reaches_the_log(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config(clients=CLIENTS))
    since = len(secret_watch.records)
    status, _ = await call(srv.port, "/wechat/token", headers={}, type="access_token", secret=SHOP_SECRET)
    assert status == 200
    assert log_lines(secret_watch, since, "client=shop")
    assert not log_lines(secret_watch, since, SHOP_SECRET)


# --- JWT ----------------------------------------------------------------------------------


def make_jwt(*, kid: str | None = "k1", key: str = KEY1, drop: tuple[str, ...] = (), **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": "shop", "aud": AUDIENCE, "exp": int(time.time()) + 300}
    payload.update(claims)
    for name in drop:
        payload.pop(name)
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm="HS256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], key: str | None = KEY1, **claims: Any) -> str:
    """A token built by hand, HMAC-signed with ``key`` (SHA-512 for ``alg: HS512``, else
    SHA-256, whatever ``alg`` says); None: unsigned."""
    payload = {"sub": "shop", "aud": AUDIENCE, "exp": int(time.time()) + 300, **claims}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    digest = hashlib.sha512 if header.get("alg") == "HS512" else hashlib.sha256
    return signing_input + "." + _b64(hmac.new(key.encode(), signing_input.encode(), digest).digest())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.gen_test
async def test_valid_jwt_names_its_sub_in_the_log(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))
    token = make_jwt()
    secret_watch.secrets.add(token)
    since = len(secret_watch.records)
    status, body = await call(srv.port, "/wechat/token", headers=bearer(token), type="access_token")
    assert status == 200 and body["access_token"]
    assert log_lines(secret_watch, since, "client=shop auth=jwt")
    # the second key works too, chosen by kid; a hand-built HS256 token is accepted (the forge is sound)
    assert (await call(srv.port, "/wechat/token", headers=bearer(make_jwt(kid="k2", key=KEY2)), type="access_token"))[0] == 200
    assert (await call(srv.port, "/wechat/token", headers=bearer(forge({"alg": "HS256", "kid": "k1"})), type="access_token"))[0] == 200


BAD_TOKENS = {
    "expired": lambda: make_jwt(exp=int(time.time()) - 120),  # beyond the 30 s leeway
    "wrong_aud": lambda: make_jwt(aud="another-service"),
    "unknown_kid": lambda: make_jwt(kid="k9"),
    "no_kid": lambda: make_jwt(kid=None),
    "bad_signature": lambda: make_jwt(key="an-attacker-key-0123456789abcdefghij"),
    "other_kids_key": lambda: make_jwt(kid="k1", key=KEY2),
    "tampered_payload": lambda: (lambda p: f"{p[0]}.{_b64(json.dumps({'sub': 'shop', 'aud': AUDIENCE, 'exp': 9999999999, 'sources': ['ticket']}).encode())}.{p[2]}")(make_jwt().split(".")),
    "alg_none": lambda: forge({"alg": "none", "kid": "k1"}, key=None),
    "alg_none_signed": lambda: forge({"alg": "none", "kid": "k1"}),
    "alg_rs256": lambda: forge({"alg": "RS256", "kid": "k1"}),
    "alg_hs512": lambda: forge({"alg": "HS512", "kid": "k1"}),
    "missing_exp": lambda: make_jwt(drop=("exp",)),
    "missing_aud": lambda: make_jwt(drop=("aud",)),
    "missing_sub": lambda: make_jwt(drop=("sub",)),
    "not_yet_valid": lambda: make_jwt(nbf=int(time.time()) + 600),
    "garbage_header": lambda: "bm90LWpzb24." + make_jwt().split(".", 1)[1],
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_jwt_is_refused(case, make_config, start_server, call, secret_watch, redis_sync):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))
    token = BAD_TOKENS[case]()
    secret_watch.secrets.add(token)
    status, body = await call(srv.port, "/wechat/token", headers=bearer(token), type="access_token")
    assert (status, body) == (403, {"errcode": 403, "errmsg": "invalid token"})
    assert failures_counted(redis_sync) == 1


@pytest.mark.gen_test
async def test_jwt_scope_by_sub_by_sources_claim_or_nothing(make_config, start_server, call):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))

    async def status_of(token, name):
        return (await call(srv.port, "/wechat/token", headers=bearer(token), type=name))[0]

    # sub names a client: that client's sources, whatever the token claims
    shop = make_jwt(sub="shop", sources=["ticket"])
    assert (await status_of(shop, "access_token"), await status_of(shop, "ticket")) == (200, 403)
    # sub names no client: the sources claim, within the configured sources
    bot = make_jwt(sub="ci-bot", sources=["ticket", "no-such-source"])
    assert (await status_of(bot, "access_token"), await status_of(bot, "ticket")) == (403, 200)
    status, body = await call(srv.port, "/status", headers=bearer(bot))
    assert set(body["sources"]) == {"ticket"}
    # neither: nothing
    stranger = make_jwt(sub="stranger")
    assert (await status_of(stranger, "access_token"), await status_of(stranger, "ticket")) == (403, 403)
    odd = make_jwt(sub="odd", sources="access_token")  # not a list
    assert await status_of(odd, "access_token") == 403


@pytest.mark.gen_test
async def test_bearer_secret_still_works_with_jwt_on_and_jwt_is_refused_with_jwt_off(make_config, start_server, call):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))
    assert (await call(srv.port, "/wechat/token", headers=bearer(SHOP_SECRET), type="access_token"))[0] == 200
    srv2 = await start_server(make_config(clients=CLIENTS))
    status, body = await call(srv2.port, "/wechat/token", headers=bearer(make_jwt()), type="access_token")
    assert (status, body["errmsg"]) == (403, "wrong secret")


# --- IP rules -----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_allowlist_compares_addresses_not_text(make_config, start_server, fetch):
    # direct peers, no proxy: 27.0.0.2 allowed must not let 127.0.0.2 in; 127.0.0.2 not 127.0.0.20.
    # A refused direct peer is closed at accept (599: no answer), unless it is a probe IP:
    # then it is let in for /healthz and gets the gate's 403 elsewhere.
    srv = await start_server(make_config(server={"allow_ips": ["27.0.0.2"], "trusted_proxies": []}))
    assert (await fetch(srv.port, "/wechat/token", source_ip="127.0.0.2", type="access_token"))[0] == 599
    srv = await start_server(make_config(server={"allow_ips": ["27.0.0.2"], "trusted_proxies": [], "probe_ips": ["127.0.0.2"]}))
    status, body, _ = await fetch(srv.port, "/wechat/token", source_ip="127.0.0.2", type="access_token")
    assert (status, body) == (403, {"errcode": 403, "errmsg": "ip not allowed"})
    srv = await start_server(make_config(server={"allow_ips": ["127.0.0.2"], "trusted_proxies": []}))
    assert (await fetch(srv.port, "/wechat/token", source_ip="127.0.0.2", type="access_token"))[0] == 200
    for peer in ("127.0.0.20", "127.0.0.1"):
        assert (await fetch(srv.port, "/wechat/token", source_ip=peer, type="access_token"))[0] == 599


@pytest.mark.gen_test
async def test_allowlist_cidr_and_single_addresses(make_config, start_server, fetch):
    # behind a trusted proxy (the loopback peer), X-Real-IP is the client
    srv = await start_server(make_config(server={"allow_ips": ["10.0.0.0/8", "192.168.1.5", "2001:db8::/32"]}))
    expected = {
        "10.0.0.1": 200, "10.255.255.254": 200, "11.0.0.1": 403, "9.255.255.255": 403,
        "192.168.1.5": 200, "192.168.1.50": 403, "192.168.1.55": 403, "192.168.1.4": 403,
        "::ffff:10.1.2.3": 200, "2001:db8:5::1": 200, "2001:db9::1": 403,
    }
    for ip, want in expected.items():
        status, _, _ = await fetch(srv.port, "/wechat/token", headers={**AUTH, "X-Real-IP": ip}, type="access_token")
        assert status == want, ip


@pytest.mark.gen_test
async def test_forwarded_headers_believed_only_from_trusted_proxies(make_config, start_server, fetch):
    # 127.0.0.2 is a probe IP, so that its requests reach the gate instead of being closed at accept.
    cfg = make_config(server={"allow_ips": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.1"], "probe_ips": ["127.0.0.2"]})
    srv = await start_server(cfg)
    for header in ("X-Real-IP", "X-Forwarded-For"):
        spoof = {**AUTH, header: "10.1.2.3"}
        # from the trusted proxy the header is the client ...
        assert (await fetch(srv.port, "/wechat/token", headers=spoof, type="access_token"))[0] == 200
        # ... from any other peer it is ignored: the peer 127.0.0.2 is not allowed
        status, body, _ = await fetch(srv.port, "/wechat/token", source_ip="127.0.0.2", headers=spoof, type="access_token")
        assert (status, body["errmsg"]) == (403, "ip not allowed"), header


@pytest.mark.gen_test
async def test_forwarded_for_takes_the_rightmost_untrusted_hop(make_config, start_server, fetch):
    srv = await start_server(make_config(server={"allow_ips": ["192.168.1.5"], "trusted_proxies": ["127.0.0.1", "172.16.0.0/12"]}))
    cases = {
        "192.168.1.5": 200,
        "203.0.113.9, 192.168.1.5": 200,  # whatever the client wrote on the left is not believed ...
        "192.168.1.5, 203.0.113.9": 403,  # ... so a client cannot prepend an allowed address
        "192.168.1.5, 172.16.0.9": 200,  # an inner trusted proxy is skipped
        "192.168.1.5, nonsense": 403,  # garbage: fall back to the peer (127.0.0.1, not allowed)
        "nonsense": 403,
    }
    for xff, want in cases.items():
        status, _, _ = await fetch(srv.port, "/wechat/token", headers={**AUTH, "X-Forwarded-For": xff}, type="access_token")
        assert status == want, xff
    # an unparseable X-Real-IP is ignored: the peer is the client
    status, _, _ = await fetch(srv.port, "/wechat/token", headers={**AUTH, "X-Real-IP": "not-an-ip"}, type="access_token")
    assert status == 403


@pytest.mark.gen_test
async def test_refused_ip_learns_nothing_and_is_checked_first(make_config, start_server, fetch, redis_sync):
    # 127.0.0.1 as a probe IP reaches the gate (any other refused peer is closed at accept).
    srv = await start_server(make_config(server={"allow_ips": ["10.0.0.0/8"], "trusted_proxies": [], "probe_ips": ["127.0.0.1"]}))
    for headers in ({}, AUTH, {"X-Token-Secret": "wrong-wrong-wrong-wrong"}):
        status, body, _ = await fetch(srv.port, "/wechat/token", headers=headers, type="access_token")
        assert (status, body["errmsg"]) == (403, "ip not allowed")
    status, body, _ = await fetch(srv.port, "/no/such/path", headers={})
    assert (status, body["errmsg"]) == (403, "ip not allowed")
    assert failures_counted(redis_sync) == 0  # refused before any credential was looked at
    assert (await fetch(srv.port, "/healthz", headers={}))[0] == 200  # probes stay possible


# --- brute force --------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_ten_failures_then_429_even_for_the_right_secret_until_the_window_passes(make_config, start_server, fetch, redis_sync):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))
    wrong = {"X-Token-Secret": TEST_SECRET + "x"}
    for i in range(9):
        status, body, _ = await fetch(srv.port, "/wechat/token", headers=wrong, type="access_token")
        assert (status, body) == (403, {"errcode": 403, "errmsg": "wrong secret"}), i
    # a bad JWT is a failed authentication too: the tenth
    assert (await fetch(srv.port, "/wechat/token", headers=bearer(make_jwt(key=KEY2)), type="access_token"))[0] == 403
    for headers in (AUTH, wrong, bearer(make_jwt())):
        status, body, resp_headers = await fetch(srv.port, "/wechat/token", headers=headers, type="access_token")
        assert (status, body) == (429, {"errcode": 429, "errmsg": "too many failed authentications"})
        assert resp_headers["Retry-After"] in ("59", "60")
    # another client IP is not affected
    assert (await fetch(srv.port, "/wechat/token", source_ip="127.0.0.2", type="access_token"))[0] == 200
    await limit_windows_end_in(redis_sync, 30)
    status, _, resp_headers = await fetch(srv.port, "/status")
    assert status == 429 and resp_headers["Retry-After"] in ("28", "29", "30")
    await limit_windows_end_in(redis_sync, 0)
    assert (await fetch(srv.port, "/wechat/token", type="access_token"))[0] == 200


@pytest.mark.gen_test
async def test_missing_credentials_and_successes_are_not_failures(make_config, start_server, fetch, redis_sync):
    srv = await start_server(make_config())
    for _ in range(15):
        status, body, _ = await fetch(srv.port, "/wechat/token", headers={}, type="access_token")
        assert (status, body["errmsg"]) == (401, "missing secret")
        assert (await fetch(srv.port, "/wechat/token", type="access_token"))[0] == 200
    assert failures_counted(redis_sync) == 0


@pytest.mark.gen_test
async def test_failures_are_counted_per_client_ip_behind_a_proxy_and_per_ipv6_64(make_config, start_server, fetch):
    srv = await start_server(make_config())

    async def attempt(ip, headers):
        return (await fetch(srv.port, "/wechat/token", headers={**headers, "X-Real-IP": ip}, type="access_token"))[0]

    wrong = {"X-Token-Secret": "wrong-wrong-wrong-wrong"}
    for i in range(10):
        assert await attempt(f"2001:db8::{i + 1:x}", wrong) == 403  # ten addresses of one /64
    assert await attempt("2001:db8::ffff", AUTH) == 429
    assert await attempt("2001:db8:0:1::1", AUTH) == 200  # the next /64
    assert await attempt("198.51.100.7", AUTH) == 200
    assert await attempt("127.0.0.1", AUTH) == 200  # the proxy itself is not the one blocked


# --- forced-refresh limit -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_only_forced_refreshes_that_call_upstream_count_per_client_and_source(make_config, start_server, call, fetch, sandbox, redis_sync):
    clients = [dict(CLIENTS[0], sources=["access_token", "ticket"]), {"name": "ops", "secret": OPS_SECRET, "sources": ["access_token"]}]
    cfg = make_config(clients=clients, server={"forcerefresh_per_minute": 3}, refresh={"force_min_interval": 600})
    srv = await start_server(cfg)
    shop = {"X-Token-Secret": SHOP_SECRET}
    first = (await call(srv.port, "/wechat/token", headers=shop, type="access_token"))[1]["access_token"]
    calls = sandbox.calls["/cgi-bin/token"]

    async def force(headers, old=None, source="access_token"):
        params = {"type": source} if old is None else {"type": source, "old": old}
        return await fetch(srv.port, "/wechat/token/forcerefresh", headers=headers, **params)

    # Reads, whatever their number: a stale old, and no old within force_min_interval.
    for _ in range(10):
        status, body, _ = await force(shop, old="an-old-token-someone-rotated")
        assert (status, body["access_token"]) == (200, first)
        status, body, _ = await force(shop)
        assert (status, body["access_token"]) == (200, first)
    assert sandbox.calls["/cgi-bin/token"] == calls
    # One client (the design's one shared secret is one client too): 100 callers with the
    # same rejected token make one call and all get the new value; one count.
    answers = await asyncio.gather(*(force(shop, old=first) for _ in range(100)))
    assert {a[0] for a in answers} == {200}
    current = answers[0][1]["access_token"]
    assert current != first and {a[1]["access_token"] for a in answers} == {current}
    assert sandbox.calls["/cgi-bin/token"] == calls + 1
    for _ in range(2):
        status, body, _ = await force(shop, old=current)
        assert status == 200 and body["access_token"] != current
        current = body["access_token"]
    assert sandbox.calls["/cgi-bin/token"] == calls + 3
    # The fourth call in the minute is refused, and makes none.
    status, body, headers = await force(shop, old=current)
    assert (status, body["errmsg"]) == (429, "too many forced refreshes") and 0 < int(headers["Retry-After"]) <= 60
    assert sandbox.calls["/cgi-bin/token"] == calls + 3
    # still free after the limit: reads
    status, body, _ = await force(shop, old=first)
    assert (status, body["access_token"]) == (200, current)
    # the same client's other source has its own budget (the ticket is rejected too)
    ticket = (await call(srv.port, "/wechat/token", headers=shop, type="ticket"))[1]["ticket"]
    status, body, _ = await force(shop, old=ticket, source="ticket")
    assert status == 200 and body["ticket"] != ticket
    # another client has its own budget
    status, body, _ = await force({"X-Token-Secret": OPS_SECRET}, old=current)
    assert status == 200 and body["access_token"] != current
    current = body["access_token"]
    await limit_windows_end_in(redis_sync, 0)
    assert (await force(shop, old=current))[0] == 200


@pytest.mark.gen_test(timeout=30)
async def test_the_forced_refresh_limit_holds_across_instances(make_config, start_server, fetch, sandbox):
    cfg = make_config(clients=CLIENTS, server={"forcerefresh_per_minute": 2}, refresh={"force_min_interval": 0})
    a, b = await start_server(cfg), await start_server(cfg)
    shop = {"X-Token-Secret": SHOP_SECRET}
    statuses = []
    for srv in (a, b, a, b):
        status, body, _ = await fetch(srv.port, "/wechat/token", headers=shop, type="access_token")
        status, body, _ = await fetch(srv.port, "/wechat/token/forcerefresh", headers=shop, type="access_token", old=body["access_token"])
        statuses.append(status)
    assert statuses == [200, 200, 429, 429], "N instances allowed N times the limit"
    assert sandbox.calls["/cgi-bin/token"] == 3


@pytest.mark.gen_test(timeout=30)
async def test_a_burst_of_concurrent_guesses_gets_no_more_than_the_limit_compared(make_config, start_server, fetch):
    srv = await start_server(make_config(server={"auth_failures_per_minute": 3}))
    wrong = {"X-Token-Secret": "wrong-wrong-wrong-wrong"}
    answers = await asyncio.gather(*(fetch(srv.port, "/wechat/token", headers=wrong, type="access_token") for _ in range(300)))
    statuses = [a[0] for a in answers]
    assert statuses.count(403) == 3 and statuses.count(429) == 297, {s: statuses.count(s) for s in set(statuses)}


@pytest.mark.gen_test(timeout=30)
async def test_the_failed_authentication_limit_holds_across_instances(make_config, start_server, fetch):
    cfg = make_config()
    a, b = await start_server(cfg), await start_server(cfg)
    wrong = {"X-Token-Secret": "wrong-wrong-wrong-wrong"}
    for i in range(10):
        assert (await fetch((a, b)[i % 2].port, "/wechat/token", headers=wrong, type="access_token"))[0] == 403
    await asyncio.sleep(CACHE_SECONDS + 0.1)
    for srv in (a, b):
        assert (await fetch(srv.port, "/wechat/token", type="access_token"))[0] == 429


# --- nothing secret in responses, logs or reprs -------------------------------------------


@pytest.fixture
def production_logging():
    """Install the redaction filter as token_server.main does; removed after the test."""
    installed = []

    def install(cfg):
        flt = setup_logging("INFO", cfg)
        installed.append(flt)
        return flt

    yield install
    for flt in installed:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(flt)


@pytest.mark.gen_test
async def test_upstream_error_echoing_the_request_url_is_scrubbed(make_config, start_server, call, sandbox, secret_watch, production_logging):
    # An upstream (or a proxy before it) that echoes the request, appsecret included.
    echoed = f"bad request GET http://api.example/cgi-bin/token?grant_type=client_credential&appid=wx123&secret={DEFAULT_APPSECRET}"
    sandbox.inject("/cgi-bin/token", "errcode", times=None, errcode=-1, errmsg=echoed)
    cfg = make_config(refresh={"force_min_interval": 0})
    production_logging(cfg)
    since = len(secret_watch.records)
    srv = await start_server(cfg)
    answers = [
        await call(srv.port, "/wechat/token", type="access_token"),
        await call(srv.port, "/wechat/token/forcerefresh", type="access_token"),
        await call(srv.port, "/status"),
    ]
    assert [a[0] for a in answers] == [503, 503, 200]
    last_error = answers[2][1]["sources"]["access_token"]["last_error"]
    assert "errcode -1" in last_error and "http://api.example/cgi-bin/token?***" in last_error
    for _, body in answers:
        text = json.dumps(body)
        assert DEFAULT_APPSECRET not in text and "secret=" not in text and TEST_SECRET not in text
    logged = log_lines(secret_watch, since, "errcode -1")
    assert logged and all("?***" in line and DEFAULT_APPSECRET not in line for line in logged)


@pytest.mark.gen_test
async def test_auth_failures_do_not_echo_what_was_presented(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config(clients=CLIENTS, jwt=JWT_CFG))
    near_miss = SHOP_SECRET[:-1] + "!"
    bad = make_jwt(aud="nope")
    secret_watch.secrets.update({near_miss, bad})
    for headers in ({"X-Token-Secret": near_miss}, bearer(bad), {}):
        status, body = await call(srv.port, "/wechat/token", headers=headers, type="access_token")
        assert status in (401, 403) and set(body) == {"errcode", "errmsg"}
        text = json.dumps(body)
        assert all(s not in text for s in (near_miss, bad, SHOP_SECRET, KEY1, "shop"))


def test_reprs_show_no_secret(make_config, redis_url):
    import time

    from server.sources import Fetched, Source
    from server.store import Entry

    cfg = make_config(clients=CLIENTS, jwt=JWT_CFG, redis={"url": redis_url.replace("redis://", "redis://:url-pass-0123456789@"), "password": "redis-pass-0123456789"})
    source = Source(cfg.sources["access_token"])
    from server.app import shared_limits
    from server.redis_client import build_redis
    from server.store import Store

    store = Store(build_redis(cfg.redis), cfg.redis.prefix)  # no connection is made
    auth = Authenticator(cfg, *shared_limits(store.redis, cfg))
    shown = (
        repr(cfg) + repr(auth) + repr(auth.redact) + repr(auth.failures) + repr(store) + repr(source)
        + repr(source.build_request({})) + repr(Fetched("WHOLE-TOKEN-VALUE-0123456789", 7200, "access_token"))
        + repr(Entry("WHOLE-TOKEN-VALUE-0123456789", time.monotonic() + 60, time.monotonic(), 1, "access_token"))
    )
    for secret in (TEST_SECRET, SHOP_SECRET, OPS_SECRET, KEY1, KEY2, "url-pass-0123456789", "redis-pass-0123456789",
                   "sandbox-appsecret-0123456789", "WHOLE-TOKEN-VALUE-0123456789"):
        assert secret not in shown, secret


def _config_with_every_secret() -> str:
    return """
server: {secret: server-secret-0123456789}
clients: [{name: shop, secret: client-secret-0123456789, sources: [corp]}]
jwt: {keys: {k1: jwt-key-0123456789-0123456789-0123456789}}
redis: {url: "rediss://:redis%2Fpass-0123@redis.example:6380/0", password: redis-password-2}
sources:
  corp:
    url: http://qyapi.example/cgi-bin/gettoken
    args: {corpid: ww123, corpsecret: corp-secret-0123456789}
  stable:
    url: http://api.example/cgi-bin/stable_token
    method: POST
    json: {grant_type: client_credential, appid: wx1, secret: app-secret-0123456789, nested: {api_key: nested-key-0123}}
  ticket:
    url: http://api.example/cgi-bin/ticket/getticket
    args: {type: jsapi, access_token: <<stable>>, signing_key: <<corp>>}
"""


def test_config_secrets_collects_every_secret_and_no_template():
    cfg = parse_config(_config_with_every_secret(), env={})
    found = set(config_secrets(cfg))
    assert found >= {
        "server-secret-0123456789", "client-secret-0123456789", "jwt-key-0123456789-0123456789-0123456789",
        "redis/pass-0123", "redis%2Fpass-0123", "redis-password-2", "corp-secret-0123456789",
        "app-secret-0123456789", "nested-key-0123",
    }
    assert not any("<<" in s for s in found) and "ww123" not in found and "jsapi" not in found
    sentinel = parse_config(
        _config_with_every_secret().replace(
            'url: "rediss://:redis%2Fpass-0123@redis.example:6380/0", password: redis-password-2',
            "sentinel: {hosts: ['s1:26379'], password: primary-pass-0123, sentinel_password: sentinel-pass-0123}",
        ),
        env={},
    )
    assert {"primary-pass-0123", "sentinel-pass-0123"} <= set(config_secrets(sentinel))


def test_redact_filter_masks_message_args_and_exception():
    cfg = parse_config(_config_with_every_secret(), env={})
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    log = logging.getLogger("test_security.redact")
    handler = Keep()
    handler.addFilter(RedactFilter(Redactor(config_secrets(cfg))))
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connect %s failed", "rediss://:redis%2Fpass-0123@redis.example:6380/0")
        log.warning("upstream said %r", {"msg": "secret=app-secret-0123456789 corp-secret-0123456789"})
        log.warning("100%% of %s", "a token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzIn0.c2lnbmF0dXJl")
        log.warning("broken % format %s", "server-secret-0123456789")  # shown raw, still masked
        try:
            raise RuntimeError("GET https://api.example/cgi-bin/token?appid=wx1&secret=anything")
        except RuntimeError:
            log.exception("fetch failed with %s", "server-secret-0123456789")
    finally:
        log.removeHandler(handler)
    text = "\n".join(records)
    for secret in config_secrets(cfg) + ["eyJhbGciOiJIUzI1NiJ9", "secret=anything"]:
        assert secret not in text
    assert "rediss://:***@redis.example" in text and "100% of a token ***" in text and "broken % format" in text
    assert "https://api.example/cgi-bin/token?***" in text and "RuntimeError" in text


def test_setup_logging_puts_the_filter_on_the_root_handlers(make_config, production_logging):
    flt = production_logging(make_config(clients=CLIENTS))
    assert isinstance(flt, RedactFilter)
    assert all(flt in h.filters for h in logging.getLogger().handlers)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "s=%s", (SHOP_SECRET,), None)
    flt.filter(record)
    assert record.getMessage() == "s=***"


# --- config refusals ----------------------------------------------------------------------


def _refused(redis_url, sandbox_url, **sections) -> str:
    from helpers_procs import merge

    raw = merge(base_config(redis_url, sandbox_url), sections)
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw), env={})
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"server": {"secret": "short-secret"}}, "server.secret: shorter than 16"),
        ({"server": {"secret": "changeme"}}, "server.secret: is a placeholder"),
        ({"server": {"secret": "please-change-me-0123456789"}}, "server.secret: is a placeholder"),
        ({"server": {"secret": ""}}, "server.secret: empty"),
        ({"server": {"allow_ips": ["10.0.0.0/33"]}}, "server.allow_ips[0]: '10.0.0.0/33' is not an IP address or CIDR"),
        ({"server": {"allow_ips": ["10.0.0.*"]}}, "server.allow_ips[0]"),
        ({"server": {"trusted_proxies": ["proxy.local"]}}, "server.trusted_proxies[0]"),
        ({"server": {"auth_failures_per_minute": 0}}, "server.auth_failures_per_minute: must be at least 1"),
        ({"clients": [{"name": "shop", "secret": "tiny", "sources": []}]}, "clients[0].secret: shorter than 16"),
        ({"clients": [{"name": "shop", "secret": "your-secret-here-123456", "sources": []}]}, "clients[0].secret: is a placeholder"),
        ({"clients": [{"name": "shop", "secret": TEST_SECRET}]}, "clients[0].secret: same as server.secret"),
        ({"clients": [{"name": "default", "secret": SHOP_SECRET}]}, "clients[0].name"),
        ({"clients": [{"name": "sh op\n", "secret": SHOP_SECRET}]}, "clients[0].name"),
        ({"clients": [{"name": "shop", "secret": SHOP_SECRET, "sources": ["nope"]}]}, "clients[0].sources: 'nope' is no source"),
        ({"jwt": {"keys": {"k1": "short-key-0123456789"}}}, "jwt.keys.k1: an HS256 key needs at least 32"),
        ({"jwt": {"keys": {"k1": "changeme"}}}, "jwt.keys.k1: is a placeholder"),
        ({"jwt": {"keys": {}}}, "jwt.keys: give at least one"),
    ],
)
def test_config_refusals_are_one_line(redis_url, sandbox_url, sections, expected):
    message = _refused(redis_url, sandbox_url, **sections)
    assert message.startswith(expected), message
    for secret in ("short-secret", "tiny", TEST_SECRET, SHOP_SECRET, "short-key-0123456789"):
        assert secret not in message


def test_defaults_bind_loopback_and_warn_on_a_readable_config(tmp_path, redis_url, sandbox_url, caplog):
    raw = base_config(redis_url, sandbox_url)
    raw["server"] = {"secret": "${TOKEN_SERVER_SECRET}"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {"TOKEN_SERVER_SECRET": TEST_SECRET}
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="server.config"):
        cfg = load_config(str(path), env=env)
    assert cfg.server.host == "127.0.0.1" and cfg.server.secret == TEST_SECRET
    assert not caplog.records
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="server.config"):
        load_config(str(path), env=env)
    assert any("readable by other users" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)


def test_rediss_url_and_password_are_accepted(redis_url, sandbox_url):
    raw = base_config(redis_url, sandbox_url)
    raw["redis"] = {"url": "rediss://redis.example:6380/0", "password": "redis-password-0123"}
    cfg = parse_config(yaml.safe_dump(raw), env={})
    assert cfg.redis.url.startswith("rediss://") and "redis-password-0123" in config_secrets(cfg)


@pytest.mark.gen_test(timeout=15)
async def test_a_jwt_whose_sub_is_default_is_no_operator(make_config, start_server, call, sandbox):
    sandbox.inject("/cgi-bin/token", "errcode", errcode=40164, errmsg="invalid ip 203.0.113.9", times=None)
    srv = await start_server(make_config(jwt=JWT_CFG))
    assert srv.refresher.status()["access_token"]["state"] == "blocked"
    token = make_jwt(sub="default", sources=["access_token"])
    status, body = await call(srv.port, "/wechat/token/forcerefresh", headers={"Authorization": f"Bearer {token}"}, type="access_token")
    assert status == 503 and "blocked" in body["errmsg"]
    assert sandbox.calls["/cgi-bin/token"] == 1  # only the operator's secret retries a blocked source
