"""Tests of the WeChat simulator, through real HTTP against the in-process app.

Time-dependent rules (overlap, expiry, quota days, the 30 s force spacing) run on a fake clock
that the tests advance, so nothing sleeps except the one "hang" fault test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tornado.simple_httpclient import HTTPTimeoutError

from server.sandbox import (
    API_PATHS,
    DEFAULT_APPSECRET,
    DEFAULT_CORPSECRET,
    MAX_BODY_BYTES,
    Sandbox,
    make_app,
)

ROOT = Path(__file__).resolve().parents[1]
# 2024-03-10 12:00 in China (04:00 UTC): mid-day, so advancing a few hours keeps the same day.
NOON_CHINA = 1710043200.0
TOKEN_ARGS = {"grant_type": "client_credential", "appid": "wx123", "secret": DEFAULT_APPSECRET}
STABLE_ARGS = {**TOKEN_ARGS, "force_refresh": False}


class FakeClock:
    def __init__(self, now: float = NOON_CHINA) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox_kwargs() -> dict[str, Any]:
    """Extra Sandbox arguments; tests override it with @pytest.mark.parametrize."""
    return {}


@pytest.fixture
def sandbox(clock: FakeClock, sandbox_kwargs: dict[str, Any], secret_watch: Any) -> Sandbox:
    sb = Sandbox(clock=clock, **sandbox_kwargs)
    secret_watch.sandboxes.append(sb)  # a whole token in any log line fails the test
    return sb


@pytest.fixture
def app(sandbox: Sandbox) -> Any:
    return make_app(sandbox)


class Api:
    """A thin client: returns (HTTP status, parsed JSON or raw bytes)."""

    def __init__(self, http_client: Any, base_url: str) -> None:
        self.http_client = http_client
        self.base_url = base_url

    async def call(self, path: str, params: dict[str, Any] | None = None, *,
                   method: str = "GET", body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if body is None and method == "POST":
            body = b""
        response = await self.http_client.fetch(url, method=method, body=body,
                                                raise_error=False, **kwargs)
        try:
            return response.code, json.loads(response.body)
        except ValueError:
            return response.code, response.body

    async def token(self, **overrides: Any) -> Any:
        code, body = await self.call("/cgi-bin/token", {**TOKEN_ARGS, **overrides})
        assert code == 200
        return body

    async def stable(self, **overrides: Any) -> Any:
        code, body = await self.call("/cgi-bin/stable_token", method="POST",
                                     body={**STABLE_ARGS, **overrides})
        assert code == 200
        return body

    async def errcode_with(self, token: str) -> int:
        """The errcode /cgi-bin/getcallbackip gives for ``token`` (0 when valid)."""
        _, body = await self.call("/cgi-bin/getcallbackip", {"access_token": token})
        return int(body.get("errcode", 0))


@pytest.fixture
def api(http_client: Any, base_url: str) -> Api:
    return Api(http_client, base_url)


# -- /cgi-bin/token ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_token_issues_a_new_wechat_like_token_each_call(api: Api, sandbox: Sandbox) -> None:
    tokens = [(await api.token())["access_token"] for _ in range(5)]
    assert len(set(tokens)) == 5
    for token in tokens:
        assert 120 <= len(token) <= 160 and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert (await api.token())["expires_in"] == 7200
    assert sandbox.issued["/cgi-bin/token"] == 6
    newest = (await api.token())["access_token"]
    assert sandbox.current_token() == newest
    assert sandbox.current_token("wx-none") is None


@pytest.mark.gen_test
async def test_new_token_kills_the_one_before_the_previous(api: Api, sandbox: Sandbox) -> None:
    first, second, third = [(await api.token())["access_token"] for _ in range(3)]
    assert sandbox.token_status(first) == 40001
    assert await api.errcode_with(first) == 40001
    assert await api.errcode_with(second) == 0
    assert await api.errcode_with(third) == 0


@pytest.mark.gen_test
async def test_previous_token_lives_for_overlap_then_40001(api: Api, clock: FakeClock) -> None:
    old = (await api.token())["access_token"]
    new = (await api.token())["access_token"]
    clock.advance(299)
    assert await api.errcode_with(old) == 0
    clock.advance(1)
    assert await api.errcode_with(old) == 40001
    assert await api.errcode_with(new) == 0


@pytest.mark.gen_test
async def test_expired_token_gives_42001(api: Api, clock: FakeClock) -> None:
    token = (await api.token())["access_token"]
    clock.advance(7199)
    assert await api.errcode_with(token) == 0
    clock.advance(1)
    assert await api.errcode_with(token) == 42001


@pytest.mark.gen_test
async def test_overlap_does_not_outlive_the_token(api: Api, sandbox: Sandbox,
                                                  clock: FakeClock) -> None:
    old = (await api.token())["access_token"]
    clock.advance(7100)
    await api.token()
    clock.advance(100)  # the overlap would run to 7400 s; the token's own life ends at 7200 s
    assert sandbox.token_status(old) == 42001


@pytest.mark.parametrize("overrides, errcode", [
    ({"grant_type": None}, 40002),
    ({"grant_type": "authorization_code"}, 40002),
    ({"appid": None}, 41002),
    ({"appid": "wx-unknown"}, 40013),
    ({"secret": None}, 41004),
    ({"secret": "wrong"}, 40125),
    ({"secret": DEFAULT_APPSECRET + " "}, 40125),
])
@pytest.mark.gen_test
async def test_token_request_errors(api: Api, sandbox: Sandbox, overrides: dict[str, Any],
                                    errcode: int) -> None:
    params = {k: v for k, v in {**TOKEN_ARGS, **overrides}.items() if v is not None}
    code, body = await api.call("/cgi-bin/token", params)
    assert code == 200 and body["errcode"] == errcode and "access_token" not in body
    assert sandbox.calls["/cgi-bin/token"] == 1
    assert sandbox.issued["/cgi-bin/token"] == 0
    assert sandbox.current_token() is None


@pytest.mark.parametrize("sandbox_kwargs", [{"ip_whitelist": ["10.0.0.0/8"]}])
@pytest.mark.gen_test
async def test_ip_not_whitelisted_names_the_ip(api: Api, sandbox_kwargs: dict[str, Any]) -> None:
    body = await api.token()
    assert body["errcode"] == 40164
    assert body["errmsg"].startswith("invalid ip 127.0.0.1 ipv6 ::ffff:127.0.0.1, not in whitelist")
    assert (await api.stable())["errcode"] == 40164
    _, body = await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                   "corpsecret": DEFAULT_CORPSECRET})
    assert body["errcode"] == 60020 and "127.0.0.1" in body["errmsg"]


@pytest.mark.parametrize("sandbox_kwargs", [{"ip_whitelist": ["10.1.2.3", "127.0.0.1"]}])
@pytest.mark.gen_test
async def test_whitelisted_ip_gets_a_token(api: Api, sandbox_kwargs: dict[str, Any]) -> None:
    assert "access_token" in await api.token()


@pytest.mark.parametrize("sandbox_kwargs", [{"daily_quota": 3}])
@pytest.mark.gen_test
async def test_daily_quota_45009_and_clear_quota(api: Api, sandbox_kwargs: dict[str, Any], sandbox: Sandbox) -> None:
    assert (await api.token(secret="wrong"))["errcode"] == 40125  # rejected calls use no quota
    tokens = [(await api.token())["access_token"] for _ in range(3)]
    body = await api.token()
    assert body == {"errcode": 45009, "errmsg": "reach max api daily quota limit"}
    assert sandbox.current_token() == tokens[-1]

    quota_params = {"access_token": tokens[-1]}
    _, body = await api.call("/cgi-bin/openapi/quota/get", quota_params, method="POST",
                             body={"cgi_path": "/cgi-bin/token"})
    assert body == {"errcode": 0, "errmsg": "ok",
                    "quota": {"daily_limit": 3, "used": 3, "remain": 0}}

    _, body = await api.call("/cgi-bin/clear_quota", quota_params, method="POST",
                             body={"appid": "wx123"})
    assert body == {"errcode": 0, "errmsg": "ok"}
    assert "access_token" in await api.token()


@pytest.mark.parametrize("sandbox_kwargs", [{"daily_quota": 1}])
@pytest.mark.gen_test
async def test_quota_day_is_china_day(api: Api, sandbox_kwargs: dict[str, Any], clock: FakeClock) -> None:
    clock.now = 1704124740.0  # 2024-01-01 15:59 UTC = 23:59 in China
    assert "access_token" in await api.token()
    assert (await api.token())["errcode"] == 45009
    clock.advance(60)  # still 2024-01-01 in UTC, but the next day in China
    assert "access_token" in await api.token()


@pytest.mark.gen_test
async def test_clear_quota_is_limited_to_ten_a_month(api: Api, clock: FakeClock) -> None:
    params = {"access_token": (await api.token())["access_token"]}
    for _ in range(10):
        _, body = await api.call("/cgi-bin/clear_quota", params, method="POST",
                                 body={"appid": "wx123"})
        assert body["errcode"] == 0
    _, body = await api.call("/cgi-bin/clear_quota", params, method="POST",
                             body={"appid": "wx123"})
    assert body["errcode"] == 48006
    clock.advance(31 * 86400)  # next month: a fresh allowance (the token is stale by then)
    params = {"access_token": (await api.token())["access_token"]}
    _, body = await api.call("/cgi-bin/clear_quota", params, method="POST",
                             body={"appid": "wx123"})
    assert body["errcode"] == 0


@pytest.mark.parametrize("params, body, errcode", [
    ({}, {"appid": "wx123"}, 41001),
    ({"access_token": "nope"}, {"appid": "wx123"}, 40001),
    (None, b"{not json", 47001),
    (None, {"appid": "wx-unknown"}, 40013),
    (None, {}, 41002),
])
@pytest.mark.gen_test
async def test_clear_quota_errors(api: Api, params: dict[str, str] | None, body: Any,
                                  errcode: int) -> None:
    if params is None:
        params = {"access_token": (await api.token())["access_token"]}
    _, answer = await api.call("/cgi-bin/clear_quota", params, method="POST", body=body)
    assert answer["errcode"] == errcode


@pytest.mark.gen_test
async def test_quota_get_errors(api: Api) -> None:
    token = (await api.token())["access_token"]
    _, body = await api.call("/cgi-bin/openapi/quota/get", {"access_token": token},
                             method="POST", body={"cgi_path": "/cgi-bin/nothing"})
    assert body["errcode"] == 76021
    _, body = await api.call("/cgi-bin/openapi/quota/get", {"access_token": "bad"},
                             method="POST", body={"cgi_path": "/cgi-bin/token"})
    assert body["errcode"] == 40001
    _, body = await api.call("/cgi-bin/openapi/quota/get", {"access_token": token},
                             method="POST", body=b"[")
    assert body["errcode"] == 47001


# -- /cgi-bin/stable_token --------------------------------------------------------------------


@pytest.mark.gen_test
async def test_stable_token_is_the_same_with_its_remaining_life(api: Api,
                                                                clock: FakeClock) -> None:
    first = await api.stable()
    assert first["expires_in"] == 7200 and 120 <= len(first["access_token"]) <= 160
    clock.advance(1000.5)
    again = await api.stable()
    assert again == {"access_token": first["access_token"], "expires_in": 6199}


@pytest.mark.gen_test
async def test_stable_token_renews_itself_near_expiry(api: Api, sandbox: Sandbox,
                                                      clock: FakeClock) -> None:
    old = (await api.stable())["access_token"]
    clock.advance(6899)  # 301 s left: still the same token
    assert (await api.stable())["access_token"] == old
    clock.advance(2)  # 299 s left: WeChat has renewed it
    renewed = await api.stable()
    assert renewed["access_token"] != old and renewed["expires_in"] == 7200
    clock.advance(298)  # the old one keeps its own life, not just an overlap
    assert sandbox.token_status(old) == 0
    clock.advance(1)
    assert sandbox.token_status(old) == 42001


@pytest.mark.gen_test
async def test_stable_force_refresh_and_its_limits(api: Api, sandbox: Sandbox,
                                                   clock: FakeClock) -> None:
    old = (await api.stable())["access_token"]
    forced = await api.stable(force_refresh=True)
    assert forced["access_token"] != old and forced["expires_in"] == 7200
    assert (await api.stable())["access_token"] == forced["access_token"]

    clock.advance(29)
    body = await api.stable(force_refresh=True)
    assert body == {"errcode": 45011, "errmsg": "api minute-quota reach limit"}
    assert sandbox.token_status(old) == 0  # within its 300 s overlap
    clock.advance(1)
    third = (await api.stable(force_refresh=True))["access_token"]
    assert sandbox.token_status(old) == 40001  # the one before the previous
    assert sandbox.token_status(forced["access_token"]) == 0
    assert sandbox.token_status(third) == 0

    for _ in range(18):  # 20 forced calls succeeded with this one's 18
        clock.advance(30)
        assert "access_token" in await api.stable(force_refresh=True)
    clock.advance(30)
    assert (await api.stable(force_refresh=True))["errcode"] == 45009
    assert "access_token" in await api.stable()  # normal mode still works


@pytest.mark.gen_test
async def test_stable_and_plain_tokens_are_independent(api: Api, sandbox: Sandbox,
                                                       clock: FakeClock) -> None:
    stable = (await api.stable())["access_token"]
    plain = (await api.token())["access_token"]
    for _ in range(3):
        await api.token()
    assert sandbox.token_status(stable) == 0
    for _ in range(2):
        clock.advance(30)
        await api.stable(force_refresh=True)
    clock.advance(300)
    assert await api.errcode_with(sandbox.current_token() or "") == 0
    assert (await api.stable())["access_token"] != sandbox.current_token()
    assert sandbox.token_status(plain) == 40001  # killed by the plain calls, not the stable ones


@pytest.mark.parametrize("body, errcode", [
    (b"{not json", 47001),
    (b"[1, 2]", 47001),
    ({**STABLE_ARGS, "force_refresh": "true"}, 47001),
    ({**STABLE_ARGS, "grant_type": "x"}, 40002),
    ({k: v for k, v in STABLE_ARGS.items() if k != "appid"}, 41002),
    ({**STABLE_ARGS, "appid": "wx-unknown"}, 40013),
    ({k: v for k, v in STABLE_ARGS.items() if k != "secret"}, 41004),
    ({**STABLE_ARGS, "secret": "wrong"}, 40125),
])
@pytest.mark.gen_test
async def test_stable_token_errors(api: Api, body: Any, errcode: int) -> None:
    code, answer = await api.call("/cgi-bin/stable_token", method="POST", body=body)
    assert code == 200 and answer["errcode"] == errcode and "access_token" not in answer


# -- tickets, callback IPs, WeCom -------------------------------------------------------------


@pytest.mark.gen_test
async def test_ticket_with_plain_and_stable_tokens(api: Api, sandbox: Sandbox) -> None:
    tickets = []
    for token in [(await api.token())["access_token"], (await api.stable())["access_token"]]:
        for kind in ("jsapi", "wx_card"):
            _, body = await api.call("/cgi-bin/ticket/getticket",
                                     {"access_token": token, "type": kind})
            assert body["errcode"] == 0 and body["errmsg"] == "ok"
            assert body["expires_in"] == 7200 and len(body["ticket"]) >= 120
            tickets.append(body["ticket"])
    assert len(set(tickets)) == 4
    assert sandbox.issued["/cgi-bin/ticket/getticket"] == 4


@pytest.mark.gen_test
async def test_ticket_checks_the_token(api: Api, clock: FakeClock) -> None:
    async def ticket_errcode(params: dict[str, str]) -> int:
        _, body = await api.call("/cgi-bin/ticket/getticket", params)
        return int(body["errcode"])

    token = (await api.token())["access_token"]
    assert await ticket_errcode({"type": "jsapi"}) == 41001
    assert await ticket_errcode({"access_token": "made-up", "type": "jsapi"}) == 40001
    assert await ticket_errcode({"access_token": token, "type": "agent_config"}) == 40097
    _, corp = await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                   "corpsecret": DEFAULT_CORPSECRET})
    assert await ticket_errcode({"access_token": corp["access_token"], "type": "jsapi"}) == 40001
    clock.advance(7200)
    assert await ticket_errcode({"access_token": token, "type": "jsapi"}) == 42001


@pytest.mark.gen_test
async def test_getcallbackip(api: Api) -> None:
    token = (await api.token())["access_token"]
    _, body = await api.call("/cgi-bin/getcallbackip", {"access_token": token})
    assert "101.226.103.0/25" in body["ip_list"]
    _, body = await api.call("/cgi-bin/getcallbackip")
    assert body["errcode"] == 41001


@pytest.mark.gen_test
async def test_wecom_gettoken(api: Api, clock: FakeClock) -> None:
    params = {"corpid": "ww123", "corpsecret": DEFAULT_CORPSECRET}
    _, first = await api.call("/cgi-bin/gettoken", params)
    assert first["errcode"] == 0 and first["errmsg"] == "ok" and first["expires_in"] == 7200
    clock.advance(100)
    _, again = await api.call("/cgi-bin/gettoken", params)
    assert again["access_token"] == first["access_token"] and again["expires_in"] == 7100
    assert await api.errcode_with(first["access_token"]) == 0
    clock.advance(7100)
    _, renewed = await api.call("/cgi-bin/gettoken", params)
    assert renewed["access_token"] != first["access_token"] and renewed["expires_in"] == 7200


@pytest.mark.parametrize("params, errcode", [
    ({"corpid": "ww-unknown", "corpsecret": DEFAULT_CORPSECRET}, 40013),
    ({"corpid": "ww123", "corpsecret": "wrong"}, 40001),
    ({"corpsecret": DEFAULT_CORPSECRET}, 41002),
    ({"corpid": "ww123"}, 41004),
])
@pytest.mark.gen_test
async def test_wecom_gettoken_errors(api: Api, params: dict[str, str], errcode: int) -> None:
    _, body = await api.call("/cgi-bin/gettoken", params)
    assert body["errcode"] == errcode and "access_token" not in body


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_fault_busy_then_normal(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "busy", times=2)
    assert await api.token() == {"errcode": -1, "errmsg": "system busy"}
    assert await api.token() == {"errcode": -1, "errmsg": "system busy"}
    assert "access_token" in await api.token()
    assert sandbox.calls["/cgi-bin/token"] == 3 and sandbox.issued["/cgi-bin/token"] == 1


@pytest.mark.gen_test
async def test_fault_errcode(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/ticket/getticket", "errcode", errcode=45009, errmsg="quota")
    token = (await api.token())["access_token"]
    params = {"access_token": token, "type": "jsapi"}
    assert (await api.call("/cgi-bin/ticket/getticket", params))[1] == {"errcode": 45009,
                                                                         "errmsg": "quota"}
    assert (await api.call("/cgi-bin/ticket/getticket", params))[1]["errcode"] == 0


@pytest.mark.gen_test
async def test_fault_http_error(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "http_error", status=503)
    code, body = await api.call("/cgi-bin/token", TOKEN_ARGS)
    assert code == 503 and isinstance(body, bytes) and b"<html>" in body
    assert (await api.call("/cgi-bin/token", TOKEN_ARGS))[0] == 200


@pytest.mark.gen_test
async def test_fault_garbage(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/stable_token", "garbage")
    code, body = await api.call("/cgi-bin/stable_token", method="POST", body=STABLE_ARGS)
    assert code == 200 and isinstance(body, bytes)  # Api.call could not parse it as JSON


@pytest.mark.gen_test
async def test_fault_missing_field(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "missing_field")
    assert await api.token() == {"expires_in": 7200}
    assert sandbox.current_token() is None


@pytest.mark.gen_test
async def test_fault_hang_delays_then_answers(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "hang", delay=0.3)
    with pytest.raises(HTTPTimeoutError):
        await api.call("/cgi-bin/token", TOKEN_ARGS, request_timeout=0.1)
    sandbox.inject("/cgi-bin/token", "hang", delay=0.1)
    started = time.monotonic()
    body = await api.token()
    assert time.monotonic() - started >= 0.1 and "access_token" in body


@pytest.mark.gen_test
async def test_fault_until_cleared_and_fifo(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "errcode", errcode=40164, errmsg="ip")
    sandbox.inject("/cgi-bin/token", "busy", times=None)
    assert (await api.token())["errcode"] == 40164
    for _ in range(4):
        assert (await api.token())["errcode"] == -1
    assert "access_token" in await api.stable()  # faults are per path
    sandbox.clear_faults()
    assert "access_token" in await api.token()


def test_inject_rejects_typos() -> None:
    sandbox = Sandbox()
    typos: list[tuple[str, str, dict[str, Any]]] = [
        ("/cgi-bin/tokn", "busy", {}), ("/cgi-bin/token", "bussy", {}),
        ("/cgi-bin/token", "busy", {"times": 0}),
        ("/cgi-bin/token", "http_error", {"status": 200}),
        ("/cgi-bin/token", "hang", {"delay": -1})]
    for path, kind, kwargs in typos:
        with pytest.raises(ValueError):
            sandbox.inject(path, kind, **kwargs)


# -- control API, routing, logging ------------------------------------------------------------


@pytest.mark.gen_test
async def test_control_api(api: Api, sandbox: Sandbox, clock: FakeClock) -> None:
    code, body = await api.call("/sandbox/faults", method="POST",
                                body={"path": "/cgi-bin/token", "kind": "errcode", "times": 2,
                                      "errcode": 40013, "errmsg": "invalid appid"})
    assert code == 200 and body["errcode"] == 0
    assert (await api.token())["errcode"] == 40013
    code, _ = await api.call("/sandbox/faults", method="DELETE")
    assert code == 200
    token = (await api.token())["access_token"]

    _, stats = await api.call("/sandbox/stats")
    assert stats == {"calls": {"/cgi-bin/token": 2}, "issued": {"/cgi-bin/token": 1}}
    assert (await api.call("/sandbox/token_status", {"token": token}))[1] == {"status": 0}
    clock.advance(7200)
    assert (await api.call("/sandbox/token_status", {"token": token}))[1] == {"status": 42001}

    code, _ = await api.call("/sandbox/reset", method="POST")
    assert code == 200
    assert (await api.call("/sandbox/token_status", {"token": token}))[1] == {"status": 40001}
    assert (await api.call("/sandbox/stats"))[1] == {"calls": {}, "issued": {}}


@pytest.mark.parametrize("body", [
    {"path": "/cgi-bin/token", "kind": "nonsense"},
    {"kind": "busy"},
    {"path": "/cgi-bin/token", "kind": "busy", "colour": "red"},
    b"not json",
])
@pytest.mark.gen_test
async def test_control_api_rejects_bad_faults(api: Api, sandbox: Sandbox, body: Any) -> None:
    code, answer = await api.call("/sandbox/faults", method="POST", body=body)
    assert code == 400 and answer["errcode"] == 400
    assert "access_token" in await api.token()


@pytest.mark.gen_test
async def test_unknown_path_and_method_answer_json(api: Api, sandbox: Sandbox) -> None:
    assert await api.call("/cgi-bin/nothing") == (404, {"errcode": 404, "errmsg": "not found"})
    code, body = await api.call("/cgi-bin/token", method="POST", body=b"{}")
    assert code == 405 and body["errcode"] == 405
    assert sandbox.calls["/cgi-bin/token"] == 1 and sandbox.calls["/cgi-bin/nothing"] == 1


@pytest.mark.gen_test
async def test_secrets_never_reach_the_log(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.token()
    await api.token(secret="wrong-secret-value")
    await api.call("/cgi-bin/gettoken", {"corpid": "ww123", "corpsecret": DEFAULT_CORPSECRET})
    assert "/cgi-bin/token" in caplog.text
    for secret in (DEFAULT_APPSECRET, "wrong-secret-value", DEFAULT_CORPSECRET, "secret="):
        assert secret not in caplog.text


# -- CLI --------------------------------------------------------------------------------------


def test_cli_prints_url_serves_and_exits_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "server.sandbox", "--port", "0",
                             "--appid", "wxcli", "--secret", "cli-secret"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no SANDBOX_URL line within 10 s"
        line = proc.stdout.readline()
        match = re.fullmatch(r"SANDBOX_URL=(http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        query = urllib.parse.urlencode({"grant_type": "client_credential", "appid": "wxcli",
                                        "secret": "cli-secret"})
        with urllib.request.urlopen(f"{match[1]}/cgi-bin/token?{query}", timeout=5) as reply:
            body = json.load(reply)
        assert len(body["access_token"]) >= 120 and body["expires_in"] == 7200
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=5)
        assert proc.returncode == 0, stderr
        assert stdout == ""  # exactly one line on stdout
        assert "cli-secret" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- several accounts at once ------------------------------------------------------------------

MP_SECRET = "sandbox-second-mp-secret-0123"
MINI_SECRET = "sandbox-mini-program-secret-0123"
CORP_APP_SECRET = "sandbox-corp-app2-secret-0123"
OTHER_CORP_SECRET = "sandbox-other-corp-secret-0123"
ACCOUNTS = {"wx123": DEFAULT_APPSECRET, "wxmp2": MP_SECRET, "wxmini": MINI_SECRET}
CORP_APPS = {"ww123": {"1000005": CORP_APP_SECRET}, "ww999": {"1000002": OTHER_CORP_SECRET}}
SEVERAL = {"apps": ACCOUNTS, "corp_apps": CORP_APPS}


@pytest.mark.parametrize("sandbox_kwargs", [{**SEVERAL, "daily_quota": 2}])
@pytest.mark.gen_test
async def test_accounts_have_their_own_tokens_quota_and_stable_token(
        api: Api, sandbox: Sandbox, clock: FakeClock, sandbox_kwargs: dict[str, Any]) -> None:
    plain = {appid: (await api.token(appid=appid, secret=secret))["access_token"]
             for appid, secret in ACCOUNTS.items()}
    stable = {appid: (await api.stable(appid=appid, secret=secret))["access_token"]
              for appid, secret in ACCOUNTS.items()}
    assert len(set(plain.values()) | set(stable.values())) == 6
    for appid in ACCOUNTS:
        assert sandbox.current_token(appid) == plain[appid]
        assert sandbox.current_stable_token(appid) == stable[appid]
    # wx123 spends its quota and rotates: the others' tokens and quotas are untouched.
    await api.token()
    assert (await api.token())["errcode"] == 45009
    assert sandbox.token_status(plain["wx123"]) == 0  # the previous one, within its overlap
    assert "access_token" in await api.token(appid="wxmini", secret=MINI_SECRET)
    assert sandbox.token_status(plain["wxmp2"]) == 0
    # A mini program's stable token: the same while valid, forced with its own 30 s spacing.
    assert (await api.stable(appid="wxmini", secret=MINI_SECRET))["access_token"] == stable["wxmini"]
    forced = await api.stable(appid="wxmini", secret=MINI_SECRET, force_refresh=True)
    assert forced["access_token"] != stable["wxmini"]
    assert "access_token" in await api.stable(appid="wxmp2", secret=MP_SECRET, force_refresh=True)
    assert (await api.stable(appid="wxmini", secret=MINI_SECRET, force_refresh=True))["errcode"] == 45011
    # Each token works for business calls; the secret of one account does not open another.
    for token in [*plain.values(), *stable.values()]:
        assert await api.errcode_with(token) == 0
    assert (await api.token(appid="wxmini", secret=MP_SECRET))["errcode"] == 40125


@pytest.mark.parametrize("sandbox_kwargs", [SEVERAL])
@pytest.mark.gen_test
async def test_wecom_one_token_per_app_secret(api: Api, sandbox: Sandbox, clock: FakeClock,
                                              sandbox_kwargs: dict[str, Any]) -> None:
    async def corp_token(corpid: str, secret: str) -> Any:
        _, body = await api.call("/cgi-bin/gettoken", {"corpid": corpid, "corpsecret": secret})
        return body

    first = await corp_token("ww123", DEFAULT_CORPSECRET)
    second = await corp_token("ww123", CORP_APP_SECRET)
    other = await corp_token("ww999", OTHER_CORP_SECRET)
    tokens = {b["access_token"] for b in (first, second, other)}
    assert len(tokens) == 3
    assert sandbox.current_corp_token() == first["access_token"]
    assert sandbox.current_corp_token("ww123", "1000005") == second["access_token"]
    assert sandbox.current_corp_token("ww999") == other["access_token"]
    clock.advance(60)
    again = await corp_token("ww123", CORP_APP_SECRET)
    assert again == {**second, "expires_in": 7140}  # WeCom: the same token while it lives
    assert (await corp_token("ww999", CORP_APP_SECRET))["errcode"] == 40001  # another corp's
    assert sandbox.issued["/cgi-bin/gettoken"] == 4


# -- WeCom tickets ----------------------------------------------------------------------------


async def wecom_ticket(api: Api, path: str, token: str | None, **params: str) -> Any:
    query = {**params, **({"access_token": token} if token is not None else {})}
    code, body = await api.call(path, query)
    assert code == 200
    return body


@pytest.mark.parametrize("sandbox_kwargs", [{**SEVERAL, "corp_ticket_hourly": 3}])
@pytest.mark.gen_test
async def test_wecom_corp_jsapi_ticket_and_its_hourly_limit_per_corp(
        api: Api, sandbox: Sandbox, clock: FakeClock, sandbox_kwargs: dict[str, Any]) -> None:
    path = "/cgi-bin/get_jsapi_ticket"
    app1 = (await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                 "corpsecret": DEFAULT_CORPSECRET}))[1]["access_token"]
    app2 = (await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                 "corpsecret": CORP_APP_SECRET}))[1]["access_token"]
    other = (await api.call("/cgi-bin/gettoken", {"corpid": "ww999",
                                                  "corpsecret": OTHER_CORP_SECRET}))[1]["access_token"]
    tickets = []
    for token in (app1, app2, app1):  # the limit is the corp's, whichever app asks
        body = await wecom_ticket(api, path, token)
        assert set(body) == {"errcode", "errmsg", "ticket", "expires_in"}
        assert body["errcode"] == 0 and body["errmsg"] == "ok" and body["expires_in"] == 7200
        tickets.append(body["ticket"])
        clock.advance(600)
    assert len(set(tickets)) == 3 and all(len(t) >= 120 for t in tickets)
    assert await wecom_ticket(api, path, app2) == {"errcode": 45009,
                                                   "errmsg": "api freq out of limit"}
    assert (await wecom_ticket(api, path, other))["errcode"] == 0  # another corp's hour
    clock.advance(1800)  # the first ticket is an hour old: one call free again
    assert (await wecom_ticket(api, path, app2))["errcode"] == 0
    assert (await wecom_ticket(api, path, app2))["errcode"] == 45009
    assert sandbox.issued[path] == 5 and sandbox.calls[path] == 7


@pytest.mark.parametrize("sandbox_kwargs", [{**SEVERAL, "agent_ticket_hourly": 2}])
@pytest.mark.gen_test
async def test_wecom_agent_config_ticket_and_its_hourly_limit_per_app(
        api: Api, sandbox: Sandbox, clock: FakeClock, sandbox_kwargs: dict[str, Any]) -> None:
    path = "/cgi-bin/ticket/get"
    app1 = (await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                 "corpsecret": DEFAULT_CORPSECRET}))[1]["access_token"]
    app2 = (await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                 "corpsecret": CORP_APP_SECRET}))[1]["access_token"]
    for _ in range(2):
        body = await wecom_ticket(api, path, app1, type="agent_config")
        assert body["errcode"] == 0 and body["errmsg"] == "ok" and body["expires_in"] == 7200
    assert (await wecom_ticket(api, path, app1, type="agent_config"))["errcode"] == 45009
    assert (await wecom_ticket(api, path, app2, type="agent_config"))["errcode"] == 0
    assert (await wecom_ticket(api, path, app1, type="jsapi"))["errcode"] == 40058
    clock.advance(3600)
    assert (await wecom_ticket(api, path, app1, type="agent_config"))["errcode"] == 0


def test_wecom_ticket_limits_default_to_wecoms() -> None:
    sandbox = Sandbox()
    assert (sandbox.wecom.corp_ticket_hourly, sandbox.wecom.agent_ticket_hourly) == (400, 100)


@pytest.mark.parametrize("path, params", [
    ("/cgi-bin/get_jsapi_ticket", {}),
    ("/cgi-bin/ticket/get", {"type": "agent_config"}),
])
@pytest.mark.gen_test
async def test_wecom_tickets_check_the_token(api: Api, clock: FakeClock, path: str,
                                             params: dict[str, str]) -> None:
    corp = (await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                 "corpsecret": DEFAULT_CORPSECRET}))[1]["access_token"]
    official = (await api.token())["access_token"]
    assert (await wecom_ticket(api, path, None, **params))["errcode"] == 41001
    assert (await wecom_ticket(api, path, "made-up", **params))["errcode"] == 40014
    assert (await wecom_ticket(api, path, official, **params))["errcode"] == 40014
    assert (await wecom_ticket(api, path, corp, **params))["errcode"] == 0
    clock.advance(7200)
    assert (await wecom_ticket(api, path, corp, **params))["errcode"] == 42001


# -- business APIs ----------------------------------------------------------------------------

MESSAGE = {"touser": "oUser123", "msgtype": "text", "text": {"content": "hello 你好"}}


@pytest.mark.gen_test
async def test_business_calls_tell_malformed_stale_and_expired_tokens(
        api: Api, clock: FakeClock) -> None:
    first, second, third = [(await api.token())["access_token"] for _ in range(3)]
    send = "/cgi-bin/message/custom/send"
    for token, errcode in [(third, 0), (second, 0), (first, 40001), ("x" * 513, 40014),
                           (third[:-1] + "!", 40014), ("not a token", 40014)]:
        assert await api.errcode_with(token) == errcode
        _, body = await api.call(send, {"access_token": token}, method="POST", body=MESSAGE)
        assert body["errcode"] == errcode
    _, body = await api.call(send, method="POST", body=MESSAGE)
    assert body["errcode"] == 41001
    clock.advance(7200)
    assert await api.errcode_with(third) == 42001
    _, body = await api.call(send, {"access_token": third}, method="POST", body=MESSAGE)
    assert body["errcode"] == 42001


@pytest.mark.parametrize("body, errcode", [
    (MESSAGE, 0),
    (b"", 44002),
    (b"{not json", 47001),
    (b"[1]", 47001),
    ({**MESSAGE, "touser": ""}, 40003),
    ({k: v for k, v in MESSAGE.items() if k != "msgtype"}, 40008),
])
@pytest.mark.gen_test
async def test_message_custom_send(api: Api, sandbox: Sandbox, body: Any, errcode: int) -> None:
    token = (await api.stable())["access_token"]
    code, answer = await api.call("/cgi-bin/message/custom/send", {"access_token": token},
                                  method="POST", body=body)
    assert code == 200
    assert answer == ({"errcode": 0, "errmsg": "ok"} if errcode == 0 else
                      {"errcode": errcode, "errmsg": answer["errmsg"]})
    assert sandbox.calls["/cgi-bin/message/custom/send"] == 1


@pytest.mark.gen_test
async def test_message_send_refuses_a_wecom_token(api: Api) -> None:
    _, corp = await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                   "corpsecret": DEFAULT_CORPSECRET})
    _, body = await api.call("/cgi-bin/message/custom/send",
                             {"access_token": corp["access_token"]}, method="POST", body=MESSAGE)
    assert body["errcode"] == 40001


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field name, file name or None, content) parts."""
    boundary = "----sandbox-test-boundary-7d3f"
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                      f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.gen_test
async def test_media_upload_of_several_megabytes(api: Api, sandbox: Sandbox,
                                                 clock: FakeClock) -> None:
    token = (await api.token())["access_token"]
    image = os.urandom(5 * 1024 * 1024 + 3)
    body, headers = multipart([("media", "photo.jpg", image)])
    code, answer = await api.call("/cgi-bin/media/upload", {"access_token": token, "type": "image"},
                                  method="POST", body=body, headers=headers)
    assert code == 200
    assert answer["type"] == "image" and answer["size"] == len(image)
    assert answer["created_at"] == int(clock.now) and len(answer["media_id"]) >= 32
    assert "errcode" not in answer  # WeChat's success shape for media has none
    assert MAX_BODY_BYTES > 10 * 1024 * 1024  # the subprocess sandbox takes WeChat's largest media
    # WeCom's media/upload shares the path, with a "file" type.
    _, corp = await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                   "corpsecret": DEFAULT_CORPSECRET})
    body, headers = multipart([("media", "a.pdf", b"%PDF-1.4")])
    _, answer = await api.call("/cgi-bin/media/upload",
                               {"access_token": corp["access_token"], "type": "file"},
                               method="POST", body=body, headers=headers)
    assert answer["type"] == "file" and answer["size"] == 8


@pytest.mark.parametrize("media_type, parts, errcode", [
    (None, [("media", "a.jpg", b"x")], 40004),
    ("file", [("media", "a.jpg", b"x")], 40004),  # a WeCom type, not an official account's
    ("image", [], 41005),
    ("image", [("file", "a.jpg", b"x")], 41005),
    ("image", [("media", None, b"x")], 41005),  # a form field, not a file
    ("image", [("media", "a.jpg", b"")], 44001),
    ("thumb", [("media", "t.jpg", b"x" * (64 * 1024 + 1))], 40006),
])
@pytest.mark.gen_test
async def test_media_upload_errors(api: Api, media_type: str | None,
                                   parts: list[tuple[str, str | None, bytes]], errcode: int) -> None:
    params = {"access_token": (await api.token())["access_token"]}
    if media_type:
        params["type"] = media_type
    body, headers = multipart(parts)
    _, answer = await api.call("/cgi-bin/media/upload", params, method="POST", body=body,
                               headers=headers)
    assert answer["errcode"] == errcode and "media_id" not in answer


@pytest.mark.gen_test
async def test_media_upload_checks_the_token_first(api: Api) -> None:
    body, headers = multipart([("media", "a.jpg", b"x")])
    _, answer = await api.call("/cgi-bin/media/upload", {"access_token": "stale", "type": "image"},
                               method="POST", body=body, headers=headers)
    assert answer["errcode"] == 40001


SNS_ARGS = {"appid": "wx123", "secret": DEFAULT_APPSECRET, "code": "code-1",
            "grant_type": "authorization_code"}


@pytest.mark.gen_test
async def test_sns_oauth_web_login(api: Api, sandbox: Sandbox) -> None:
    _, body = await api.call("/sns/oauth2/access_token", SNS_ARGS)
    assert set(body) == {"access_token", "expires_in", "refresh_token", "openid", "scope"}
    assert body["expires_in"] == 7200 and body["scope"] == "snsapi_base"
    assert re.fullmatch(r"o[A-Za-z0-9_-]{27}", body["openid"])
    assert {body["access_token"], body["refresh_token"]} <= sandbox.issued_values()
    # A web-login token is not an access_token for the account's APIs.
    assert await api.errcode_with(body["access_token"]) == 40001
    # A code works once; the same code in a fresh sandbox names the same user.
    _, again = await api.call("/sns/oauth2/access_token", SNS_ARGS)
    assert again == {"errcode": 40163, "errmsg": "code been used"}
    sandbox.reset()
    _, replay = await api.call("/sns/oauth2/access_token", SNS_ARGS)
    assert replay["openid"] == body["openid"] and replay["access_token"] != body["access_token"]
    _, user2 = await api.call("/sns/oauth2/access_token", {**SNS_ARGS, "code": "code-2"})
    assert user2["openid"] != body["openid"]
    assert sandbox.issued["/sns/oauth2/access_token"] == 2


@pytest.mark.parametrize("overrides, errcode", [
    ({"appid": None}, 41002),
    ({"appid": "wx-unknown"}, 40013),
    ({"secret": None}, 41004),
    ({"secret": "wrong"}, 40125),
    ({"code": None}, 41008),
    ({"code": ""}, 41008),
    ({"grant_type": "client_credential"}, 40002),
])
@pytest.mark.gen_test
async def test_sns_oauth_errors(api: Api, overrides: dict[str, Any], errcode: int) -> None:
    params = {k: v for k, v in {**SNS_ARGS, **overrides}.items() if v is not None}
    _, body = await api.call("/sns/oauth2/access_token", params)
    assert body["errcode"] == errcode and "access_token" not in body


NEW_PATHS = ["/cgi-bin/get_jsapi_ticket", "/cgi-bin/ticket/get", "/cgi-bin/message/custom/send",
             "/cgi-bin/media/upload", "/sns/oauth2/access_token"]


@pytest.mark.parametrize("path", NEW_PATHS)
@pytest.mark.gen_test
async def test_new_paths_take_faults(api: Api, sandbox: Sandbox, path: str) -> None:
    assert path in API_PATHS
    sandbox.inject(path, "errcode", errcode=45009, errmsg="api freq out of limit")
    method = "POST" if path.startswith("/cgi-bin/m") else "GET"
    code, body = await api.call(path, method=method, body=b"" if method == "POST" else None)
    assert code == 200 and body == {"errcode": 45009, "errmsg": "api freq out of limit"}
    sandbox.inject(path, "http_error", status=502)
    assert (await api.call(path, method=method, body=b"" if method == "POST" else None))[0] == 502
    _, body = await api.call(path, method=method, body=b"" if method == "POST" else None)
    assert body["errcode"] == 41001 or body["errcode"] == 41002  # no fault: the real check
    assert sandbox.calls[path] == 3


# -- what the proxy forwarded -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_requests_record_what_reached_wechat(api: Api, sandbox: Sandbox) -> None:
    token = (await api.token())["access_token"]
    message = json.dumps(MESSAGE).encode()
    await api.call("/cgi-bin/message/custom/send", {"access_token": token}, method="POST",
                   body=message, headers={"Content-Type": "application/json"})
    upload, headers = multipart([("media", "a.jpg", b"jpeg-bytes")])
    await api.call("/cgi-bin/media/upload", {"access_token": token, "type": "image"},
                   method="POST", body=upload, headers=headers)
    await api.call("/cgi-bin/getcallbackip", {"access_token": "stale-token"})
    await api.call("/cgi-bin/user/info", {"access_token": token, "openid": "o1"})

    fetch, send, media, stale, unknown = sandbox.requests_to()
    assert (fetch.path, fetch.access_token, fetch.params) == (
        "/cgi-bin/token", None, {"grant_type": "client_credential", "appid": "wx123"})
    assert fetch.query_keys == ("appid", "grant_type", "secret")  # the name, not the secret
    assert (send.method, send.path, send.access_token, send.token_owner, send.token_kind,
            send.token_status, send.errcode) == (
        "POST", "/cgi-bin/message/custom/send", token, "wx123", "token", 0, 0)
    assert send.body_size == len(message)
    assert send.body_sha256 == hashlib.sha256(message).hexdigest()
    assert send.content_type == "application/json" and send.params == {}
    assert media.params == {"type": "image"} and media.body_size == len(upload)
    assert media.content_type.startswith("multipart/form-data")
    assert (stale.token_owner, stale.token_status, stale.errcode) == (None, 40001, 40001)
    assert (unknown.path, unknown.status, unknown.params) == ("/cgi-bin/user/info", 404,
                                                            {"openid": "o1"})
    assert sandbox.requests_to("/cgi-bin/media/upload") == [media]
    assert token not in repr(sandbox.requests_to())  # safe to print in a failing assertion

    _, listed = await api.call("/sandbox/requests", {"path": "/cgi-bin/message/custom/send"})
    assert listed == {"requests": [{
        "method": "POST", "path": "/cgi-bin/message/custom/send",
        "query_keys": ["access_token"], "params": {}, "body_size": len(message),
        "body_sha256": hashlib.sha256(message).hexdigest(), "content_type": "application/json",
        "access_token_prefix": token[:8], "token_owner": "wx123", "token_kind": "token",
        "token_status": 0, "status": 200, "errcode": 0}]}
    assert token not in json.dumps((await api.call("/sandbox/requests"))[1])
    assert len((await api.call("/sandbox/requests"))[1]["requests"]) == 5  # control calls unrecorded
    await api.call("/sandbox/reset", method="POST")
    assert sandbox.requests_to() == []


@pytest.mark.gen_test
async def test_requests_record_injected_faults(api: Api, sandbox: Sandbox) -> None:
    sandbox.inject("/cgi-bin/token", "busy")
    sandbox.inject("/cgi-bin/token", "http_error", status=503)
    await api.call("/cgi-bin/token", TOKEN_ARGS)
    await api.call("/cgi-bin/token", TOKEN_ARGS)
    assert [(r.status, r.errcode) for r in sandbox.requests_to("/cgi-bin/token")] == [
        (200, -1), (503, 503)]


@pytest.mark.gen_test
async def test_new_endpoints_keep_secrets_and_tokens_out_of_the_log(
        api: Api, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = (await api.token())["access_token"]
    await api.call("/cgi-bin/message/custom/send", {"access_token": token}, method="POST",
                   body=MESSAGE)
    await api.call("/sns/oauth2/access_token", SNS_ARGS)
    _, corp = await api.call("/cgi-bin/gettoken", {"corpid": "ww123",
                                                   "corpsecret": DEFAULT_CORPSECRET})
    await api.call("/cgi-bin/get_jsapi_ticket", {"access_token": corp["access_token"]})
    assert "/sns/oauth2/access_token" in caplog.text
    for value in [DEFAULT_APPSECRET, DEFAULT_CORPSECRET, "code-1", *sandbox.issued_values()]:
        assert value not in caplog.text


def test_cli_serves_several_accounts() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "server.sandbox", "--port", "0",
                             "--app", "wxmini:mini:secret", "--corp-app", "ww9:1000005:corp-s"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no SANDBOX_URL line within 10 s"
        url = proc.stdout.readline().strip().split("=", 1)[1]
        for path, query in [
            ("/cgi-bin/token", {"grant_type": "client_credential", "appid": "wx123",
                                "secret": DEFAULT_APPSECRET}),
            ("/cgi-bin/token", {"grant_type": "client_credential", "appid": "wxmini",
                                "secret": "mini:secret"}),
            ("/cgi-bin/gettoken", {"corpid": "ww9", "corpsecret": "corp-s"}),
            ("/cgi-bin/gettoken", {"corpid": "ww123", "corpsecret": DEFAULT_CORPSECRET}),
        ]:
            with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}",
                                        timeout=5) as reply:
                assert "access_token" in json.load(reply), path
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=5)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
