"""The WeChat-shaped face: token and ticket endpoints answered from the cache, in WeChat's
dialect, for several accounts at once (real Redis, the sandbox as WeChat, real HTTP)."""

from __future__ import annotations

import json

import pytest

from tests import helpers_face
from tests.conftest import TEST_SECRET
from tests.helpers_face import (
    CLIENT_SECRET,
    CORP_ID,
    CORP_SECRET,
    MAIN_ID,
    MAIN_SECRET,
    MINI_ID,
    MINI_SECRET,
    SHOP_ID,
    SHOP_SECRET,
    face_config,
    token_fetches,
)

sandbox = helpers_face.sandbox  # the fixture: WeChat with several accounts
NO_AUTH: dict[str, str] = {}


def stable_body(appid, secret, force=False, grant_type="client_credential"):
    return json.dumps({"grant_type": grant_type, "appid": appid, "secret": secret, "force_refresh": force}).encode()


async def classic(call, port, appid, secret, grant_type="client_credential"):
    return await call(port, "/cgi-bin/token", headers=NO_AUTH, grant_type=grant_type, appid=appid, secret=secret)


async def stable(call, port, appid, secret, force=False):
    return await call(port, "/cgi-bin/stable_token", headers=NO_AUTH, method="POST", body=stable_body(appid, secret, force))


@pytest.mark.gen_test
async def test_each_token_endpoint_answers_from_the_cache(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    fetched = token_fetches(sandbox)
    cases = [
        (await stable(call, srv.port, MAIN_ID, MAIN_SECRET), sandbox.current_stable_token(MAIN_ID)),
        (await classic(call, srv.port, MAIN_ID, MAIN_SECRET), sandbox.current_stable_token(MAIN_ID)),
        (await classic(call, srv.port, SHOP_ID, SHOP_SECRET), sandbox.current_token(SHOP_ID)),
        (await stable(call, srv.port, SHOP_ID, SHOP_SECRET), sandbox.current_token(SHOP_ID)),
        (await stable(call, srv.port, MINI_ID, MINI_SECRET), sandbox.current_stable_token(MINI_ID)),
    ]
    for (status, body), expected in cases:
        assert status == 200 and set(body) == {"access_token", "expires_in"}, body
        assert body["access_token"] == expected and 6900 < body["expires_in"] <= 7000
    status, body = await call(srv.port, "/cgi-bin/gettoken", headers=NO_AUTH, corpid=CORP_ID, corpsecret=CORP_SECRET)
    assert status == 200 and set(body) == {"errcode", "errmsg", "access_token", "expires_in"}
    assert (body["errcode"], body["errmsg"], body["access_token"]) == (0, "ok", sandbox.current_corp_token(CORP_ID))
    assert token_fetches(sandbox) == fetched  # all from the cache


WRONG = "wrong-appsecret-0123456789abcdef"


@pytest.mark.gen_test
async def test_bad_credentials_get_wechats_errcodes(make_config, sandbox_url, start_server, call, sandbox, secret_watch):
    secret_watch.secrets.add(WRONG)
    srv = await start_server(face_config(make_config, sandbox_url, server={"auth_failures_per_minute": 1000}))
    port = srv.port
    cases = [
        (await classic(call, port, MAIN_ID, MAIN_SECRET, grant_type="password"), 40002),
        (await call(port, "/cgi-bin/token", headers=NO_AUTH, grant_type="client_credential", secret=MAIN_SECRET), 41002),
        (await classic(call, port, "wx-nobody", MAIN_SECRET), 40013),
        (await classic(call, port, CORP_ID, CORP_SECRET), 40013),  # a corpid is no appid
        (await call(port, "/cgi-bin/token", headers=NO_AUTH, grant_type="client_credential", appid=MAIN_ID), 41004),
        (await classic(call, port, MAIN_ID, WRONG), 40125),
        (await classic(call, port, MAIN_ID, SHOP_SECRET), 40125),  # another account's secret
        (await stable(call, port, MAIN_ID, WRONG), 40125),
        (await call(port, "/cgi-bin/stable_token", headers=NO_AUTH, method="POST", body=b"not json"), 47001),
        (await call(port, "/cgi-bin/stable_token", headers=NO_AUTH, method="POST", body=b'{"appid": 1}'), 47001),
        (await call(port, "/cgi-bin/stable_token", headers=NO_AUTH, method="POST", body=stable_body(MAIN_ID, MAIN_SECRET)[:-1] + b', "force_refresh": "yes"}'), 47001),
        (await call(port, "/cgi-bin/gettoken", headers=NO_AUTH, corpsecret=CORP_SECRET), 41002),
        (await call(port, "/cgi-bin/gettoken", headers=NO_AUTH, corpid="ww-nobody", corpsecret=CORP_SECRET), 40013),
        (await call(port, "/cgi-bin/gettoken", headers=NO_AUTH, corpid=CORP_ID), 41004),
        (await call(port, "/cgi-bin/gettoken", headers=NO_AUTH, corpid=CORP_ID, corpsecret=WRONG), 40001),
        (await call(port, "/cgi-bin/stable_token", headers=NO_AUTH), 43002),  # GET where WeChat wants POST
        (await call(port, "/cgi-bin/token", headers=NO_AUTH, method="POST", body=b""), 43001),
    ]
    for (status, body), errcode in cases:
        assert status == 200 and body["errcode"] == errcode and set(body) == {"errcode", "errmsg"}, (errcode, body)
    assert (await classic(call, port, MAIN_ID, WRONG))[1]["errmsg"] == "invalid appsecret"
    assert (await classic(call, port, "wx-nobody", WRONG))[1]["errmsg"] == "invalid appid"
    refusals = [line for line in secret_watch.records if "wrong secret for account main" in line]
    assert refusals, "a wrong secret is logged (without its value: the session's leak check)"


@pytest.mark.gen_test
async def test_wrong_secrets_count_toward_the_brute_force_limit(make_config, sandbox_url, start_server, call, sandbox, secret_watch):
    secret_watch.secrets.add(WRONG)
    srv = await start_server(face_config(make_config, sandbox_url, server={"auth_failures_per_minute": 3}))
    for _ in range(3):
        assert (await classic(call, srv.port, MAIN_ID, WRONG))[1]["errcode"] == 40125
    # Over the limit: even the right secret waits, on the face and on the token API alike.
    assert (await classic(call, srv.port, MAIN_ID, MAIN_SECRET))[1] == {"errcode": 45011, "errmsg": "api minute-quota reach limit"}
    status, _ = await call(srv.port, "/wechat/token", type="access_token")
    assert status == 429


@pytest.mark.gen_test
async def test_unknown_appids_count_too(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url, server={"auth_failures_per_minute": 2}))
    for appid in ("wx-a", "wx-b"):
        assert (await classic(call, srv.port, appid, MAIN_SECRET))[1]["errcode"] == 40013
    assert (await stable(call, srv.port, MAIN_ID, MAIN_SECRET))[1]["errcode"] == 45011


@pytest.mark.gen_test
async def test_a_client_secret_opens_only_its_accounts(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    status, body = await classic(call, srv.port, SHOP_ID, CLIENT_SECRET)
    assert body["access_token"] == sandbox.current_token(SHOP_ID)
    assert (await classic(call, srv.port, MAIN_ID, CLIENT_SECRET))[1]["errcode"] == 40125
    # The operator's secret opens every account.
    assert (await stable(call, srv.port, MINI_ID, TEST_SECRET))[1]["access_token"] == sandbox.current_stable_token(MINI_ID)


@pytest.mark.gen_test
async def test_force_refresh_is_a_forced_refresh_under_the_usual_rules(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url, refresh={"force_min_interval": 30}))
    first = (await stable(call, srv.port, MAIN_ID, MAIN_SECRET))[1]["access_token"]
    calls = sandbox.calls["/cgi-bin/stable_token"]
    # Within force_min_interval of the last fetch: that fetch's value, no call.
    assert (await stable(call, srv.port, MAIN_ID, MAIN_SECRET, force=True))[1]["access_token"] == first
    assert sandbox.calls["/cgi-bin/stable_token"] == calls


@pytest.mark.gen_test
async def test_force_refresh_rotates_once_the_interval_has_passed(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url, refresh={"force_min_interval": 0}))
    first = (await stable(call, srv.port, MAIN_ID, MAIN_SECRET))[1]["access_token"]
    status, body = await stable(call, srv.port, MAIN_ID, MAIN_SECRET, force=True)
    assert body["access_token"] != first and body["access_token"] == sandbox.current_stable_token(MAIN_ID)
    # The stored value moved too: every reader sees the new token.
    assert (await call(srv.port, "/wechat/token", type="access_token"))[1]["access_token"] == body["access_token"]


async def face_token(call, port, appid, secret):
    return (await classic(call, port, appid, secret))[1]["access_token"]


@pytest.mark.gen_test
async def test_ticket_endpoints_serve_the_tokens_account(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    port = srv.port
    main_t, shop_t = await face_token(call, port, MAIN_ID, MAIN_SECRET), await face_token(call, port, SHOP_ID, SHOP_SECRET)
    corp_t = (await call(port, "/cgi-bin/gettoken", headers=NO_AUTH, corpid=CORP_ID, corpsecret=CORP_SECRET))[1]["access_token"]
    mini_t = (await stable(call, port, MINI_ID, MINI_SECRET))[1]["access_token"]

    async def ours(type_, account):
        return (await call(port, "/wechat/token", type=type_, account=account))[1]["ticket"]

    fetched = dict(sandbox.calls)
    cases = [
        (("/cgi-bin/ticket/getticket", main_t, "jsapi"), await ours("ticket", "main")),
        (("/cgi-bin/ticket/getticket", main_t, "wx_card"), await ours("wx_card_ticket", "main")),
        (("/cgi-bin/ticket/getticket", shop_t, "jsapi"), await ours("ticket", "shop")),
        (("/cgi-bin/get_jsapi_ticket", corp_t, None), await ours("ticket", "corp")),
        (("/cgi-bin/ticket/get", corp_t, "agent_config"), await ours("agent_config_ticket", "corp")),
    ]
    for (path, token, type_), expected in cases:
        params = {"access_token": token, **({"type": type_} if type_ else {})}
        status, body = await call(port, path, headers=NO_AUTH, **params)
        assert status == 200 and body == {"errcode": 0, "errmsg": "ok", "ticket": expected, "expires_in": body["expires_in"]}, (path, body)
        assert 6900 < body["expires_in"] <= 7000
    assert len({e for _, e in cases}) == len(cases)  # no two accounts (or tickets) share a value
    assert dict(sandbox.calls) == fetched  # from the cache
    # Not issued here, missing, or a ticket the account does not keep.
    assert (await call(port, "/cgi-bin/ticket/getticket", headers=NO_AUTH, access_token="x" * 40, type="jsapi"))[1]["errcode"] == 40001
    assert (await call(port, "/cgi-bin/ticket/getticket", headers=NO_AUTH, type="jsapi"))[1]["errcode"] == 41001
    assert (await call(port, "/cgi-bin/ticket/getticket", headers=NO_AUTH, access_token=shop_t, type="wx_card"))[1]["errcode"] == 40097
    assert (await call(port, "/cgi-bin/ticket/getticket", headers=NO_AUTH, access_token=mini_t, type="jsapi"))[1]["errcode"] == 40097


@pytest.mark.gen_test
async def test_ip_allowlist_applies_on_the_face(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url, server={"allow_ips": ["10.0.0.0/8"]}))
    status, body = await classic(call, srv.port, MAIN_ID, MAIN_SECRET)
    assert status == 200 and body["errcode"] == 40164 and "not in whitelist" in body["errmsg"]
    headers = {"X-Real-IP": "10.1.2.3"}  # from the trusted proxy (127.0.0.1)
    status, body = await call(srv.port, "/cgi-bin/token", headers=headers, grant_type="client_credential", appid=MAIN_ID, secret=MAIN_SECRET)
    assert body["access_token"] == sandbox.current_stable_token(MAIN_ID)


@pytest.mark.gen_test
async def test_face_off_leaves_the_api_as_it_was(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url, face=False))
    for path in ("/cgi-bin/token", "/cgi-bin/getcallbackip"):
        status, body = await call(srv.port, path, headers=NO_AUTH, appid=MAIN_ID, secret=MAIN_SECRET)
        assert (status, body) == (404, {"errcode": 404, "errmsg": "not found"})


@pytest.mark.gen_test
async def test_bare_sources_have_no_account_for_the_face(make_config, start_server, call, sandbox):
    srv = await start_server(make_config())  # today's config: sources only
    assert (await classic(call, srv.port, "wx123", "anything-at-all-0123"))[1] == {"errcode": 40013, "errmsg": "invalid appid"}
    status, body = await call(srv.port, "/cgi-bin/getcallbackip", headers=NO_AUTH, access_token="x")
    assert (status, body) == (404, {"errcode": 404, "errmsg": "not found"})


@pytest.mark.gen_test
async def test_our_own_routes_keep_precedence(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(face_config(make_config, sandbox_url))
    assert (await call(srv.port, "/healthz", headers=NO_AUTH))[1] == {"status": "ok"}
    assert (await call(srv.port, "/wechat/token", type="access_token"))[0] == 200
    # Our namespace keeps our dialect: a typo there is our 404, not a call to WeChat.
    assert await call(srv.port, "/wechat/nothing", headers=NO_AUTH) == (404, {"errcode": 404, "errmsg": "not found"})
