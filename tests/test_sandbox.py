"""Tests of the WeChat simulator, through real HTTP against the in-process app.

Time-dependent rules (overlap, expiry, quota days, the 30 s force spacing) run on a fake clock
that the tests advance, so nothing sleeps except the one "hang" fault test.
"""

from __future__ import annotations

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

from server.sandbox import DEFAULT_APPSECRET, DEFAULT_CORPSECRET, Sandbox, make_app

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
def sandbox(clock: FakeClock, sandbox_kwargs: dict[str, Any]) -> Sandbox:
    return Sandbox(clock=clock, **sandbox_kwargs)


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
