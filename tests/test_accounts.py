"""Accounts: expanded into ordinary sources, looked up by name or appid, end to end on the sandbox."""

from __future__ import annotations

import pytest
import yaml

from server.config import ConfigError
from server.config_file import parse_config
from server.sandbox import DEFAULT_AGENTID, DEFAULT_APPID, DEFAULT_APPSECRET, DEFAULT_CORPID, DEFAULT_CORPSECRET, Sandbox
from tests.conftest import AUTH, TEST_SECRET

SHOP_APPID, SHOP_SECRET = "wxshop1", "sandbox-shop-appsecret-0123456789"
#: For configs parsed without a sandbox (WeChat's own host): the README's example ids are refused there.
APPID = "wx0a1b2c3d4e5f6a7b"
MINI_APPID, MINI_SECRET = "wxmini1", "sandbox-mini-appsecret-0123456789"
CLIENT_SECRET = "shop-client-secret-0123456789"


def parse(accounts: dict, **extra) -> object:
    raw = {"server": {"secret": TEST_SECRET}, "accounts": accounts, **extra}
    return parse_config(yaml.safe_dump(raw), env={}, source="test")


def official(appid: str = APPID, secret: str = DEFAULT_APPSECRET, **more) -> dict:
    return {"appid": appid, "secret": secret, **more}


# --- expansion and refusals -------------------------------------------------------------------


def test_one_account_keeps_the_plain_keys():
    cfg = parse({"main": official(tickets=["jsapi"])})
    assert list(cfg.sources) == ["access_token", "ticket"]
    token = cfg.sources["access_token"]
    assert token.url == "https://api.weixin.qq.com/cgi-bin/stable_token" and token.method == "POST"
    assert token.json == {"grant_type": "client_credential", "appid": APPID, "secret": DEFAULT_APPSECRET, "force_refresh": False}
    assert token.force == {"force_refresh": True}
    assert cfg.sources["ticket"].args == {"access_token": "<<access_token>>", "type": "jsapi"}


def test_the_default_account_keeps_plain_keys_and_the_others_are_prefixed():
    cfg = parse({
        "main": official(tickets=["jsapi", "wx_card"], default=True),
        "shop": official(SHOP_APPID, SHOP_SECRET, token="classic", tickets=["jsapi"]),
        "corp": {"kind": "wecom", "corpid": "ww0a1b2c3d4e5f6a7b", "corpsecret": "corp-secret-0123456789", "agentid": 1000002,
                 "tickets": ["jsapi", "agent_config"]},
    })
    assert set(cfg.sources) == {
        "access_token", "ticket", "wx_card_ticket",
        "shop.access_token", "shop.ticket",
        "corp.access_token", "corp.ticket", "corp.agent_config_ticket",
    }
    assert cfg.sources["shop.access_token"].url == "https://api.weixin.qq.com/cgi-bin/token"
    assert cfg.sources["shop.ticket"].args["access_token"] == "<<shop.access_token>>"
    assert cfg.sources["corp.access_token"].url == "https://qyapi.weixin.qq.com/cgi-bin/gettoken"
    assert cfg.sources["corp.ticket"].url == "https://qyapi.weixin.qq.com/cgi-bin/get_jsapi_ticket"
    assert cfg.sources["corp.agent_config_ticket"].args == {"access_token": "<<corp.access_token>>", "type": "agent_config"}
    # dependency order: every token before its tickets
    order = list(cfg.sources)
    assert order.index("corp.access_token") < order.index("corp.agent_config_ticket")


def test_without_a_default_every_account_is_prefixed_and_bare_sources_stay():
    cfg = parse(
        {"a": official(), "b": official(SHOP_APPID, SHOP_SECRET)},
        sources={"legacy": {"url": "https://api.weixin.qq.com/cgi-bin/token", "args": {"appid": "wx999", "secret": "x" * 20}}},
    )
    assert set(cfg.sources) == {"legacy", "a.access_token", "b.access_token"}


def test_a_client_limited_to_accounts_gets_their_sources():
    cfg = parse(
        {"main": official(tickets=["jsapi"], default=True), "shop": official(SHOP_APPID, SHOP_SECRET, tickets=["jsapi"])},
        clients=[{"name": "shopsrv", "secret": CLIENT_SECRET, "accounts": ["shop"], "sources": ["access_token"]}],
    )
    assert cfg.clients[0].sources == ["access_token", "shop.access_token", "shop.ticket"]


@pytest.mark.parametrize("accounts, expected", [
    ({"a": official(), "b": official()}, "accounts.b: same appid as accounts.a; each account once"),
    ({"a": official(kind="service")}, "accounts.a.kind: 'service' is no kind; use one of official, miniprogram, wecom"),
    ({"a": official(tickets=["jsapi2"])}, "accounts.a.tickets[0]: 'jsapi2' is no ticket type; use jsapi, wx_card, agent_config"),
    ({"a": official(kind="miniprogram", tickets=["jsapi"])}, "accounts.a.tickets[0]: a miniprogram account has no jsapi ticket (it has: none)"),
    ({"a": official(tickets=["agent_config"])}, "accounts.a.tickets[0]: an official account has no agent_config ticket (it has: jsapi, wx_card)"),
    ({"a": {"kind": "wecom", "corpid": "ww1", "corpsecret": "s" * 20, "tickets": ["agent_config"]}},
     "accounts.a.agentid: the agent_config ticket needs the app's agentid"),
    ({"a": {"kind": "wecom", "corpid": "ww1"}}, "accounts.a.corpsecret: missing; a wecom account needs corpid and corpsecret"),
    ({"a": {"appid": "wx1"}}, "accounts.a.secret: missing; an official account needs appid and secret"),
    ({"a": official(token="fast")}, "accounts.a.token: 'fast'; use stable (POST /cgi-bin/stable_token) or classic (GET /cgi-bin/token)"),
    ({"a": official(default=True), "b": official(SHOP_APPID, SHOP_SECRET, default=True)},
     "accounts.b.default: only one account can be the default (also: a)"),
    ({"a.b": official()}, "accounts.a.b: an account name is letters, digits, _ - (at most 32), starting with a letter"),
    ({"a": official(api_base="https://api.example/cgi-bin")}, "accounts.a.api_base: an origin like https://api.weixin.qq.com (no path)"),
    ({"a": official(jssdk={"public": True})}, "accounts.a.jssdk.public: needs jssdk.allowed_domains (the only pages a browser may sign)"),
    ({"a": official(colour="red")}, "accounts.a.colour: unknown key"),
    ({"a": official(secret="change-me")}, "accounts.a.secret: does not look like a secret WeChat issued"),
    ({"a": official(appid="wx 123")}, "accounts.a.appid: 'wx 123' is no appid or corpid"),
    ({"a": official(api_base="http://h\n")}, "accounts.a.api_base: an origin like https://api.weixin.qq.com (no path)"),
    ({"a": {"kind": "wecom", "corpid": "ww1", "corpsecret": "s" * 20, "agentid": 1, "tickets": ["jsapi"]},
      "b": {"kind": "wecom", "corpid": "ww1", "corpsecret": "t" * 20, "agentid": 2, "tickets": ["jsapi"]}},
     "accounts.b.tickets: corp ww1's jsapi ticket is already kept by accounts.a; list jsapi on one of its apps"),
])
def test_check_refuses_a_bad_account_in_one_line(accounts, expected):
    with pytest.raises(ConfigError) as err:
        parse(accounts)
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value) and DEFAULT_APPSECRET not in str(err.value)


def test_check_refuses_an_account_whose_source_is_declared_by_hand_and_an_unknown_client_account():
    with pytest.raises(ConfigError, match=r"^accounts.main: its source access_token is also declared under sources:"):
        parse({"main": official()}, sources={"access_token": {"url": "https://x.example/cgi-bin/token"}})
    with pytest.raises(ConfigError, match=r"^clients\[0\].accounts: 'nope' is no account \(known: main\)"):
        parse({"main": official()}, clients=[{"name": "c", "secret": CLIENT_SECRET, "accounts": ["nope"]}])


# --- end to end on the sandbox ------------------------------------------------------------------


@pytest.fixture
def sandbox(secret_watch) -> Sandbox:
    sb = Sandbox(apps={DEFAULT_APPID: DEFAULT_APPSECRET, SHOP_APPID: SHOP_SECRET, MINI_APPID: MINI_SECRET})
    secret_watch.sandboxes.append(sb)
    secret_watch.secrets.update({SHOP_SECRET, MINI_SECRET, CLIENT_SECRET})
    return sb


def every_kind(sandbox_url: str) -> dict:
    return {
        "main": {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": ["jsapi"], "default": True, "api_base": sandbox_url},
        "shop": {"appid": SHOP_APPID, "secret": SHOP_SECRET, "token": "classic", "tickets": ["jsapi", "wx_card"], "api_base": sandbox_url},
        "mini": {"kind": "miniprogram", "appid": MINI_APPID, "secret": MINI_SECRET, "api_base": sandbox_url},
        "corp": {"kind": "wecom", "corpid": DEFAULT_CORPID, "corpsecret": DEFAULT_CORPSECRET, "agentid": int(DEFAULT_AGENTID),
                 "tickets": ["jsapi", "agent_config"], "api_base": sandbox_url},
    }


@pytest.mark.gen_test(timeout=30)
async def test_every_kind_of_account_is_served_by_name_and_by_appid(make_config, start_server, call, sandbox, sandbox_url, redis_sync):
    srv = await start_server(make_config(sources={}, accounts=every_kind(sandbox_url)))

    async def value(**params):
        status, body = await call(srv.port, "/wechat/token", **params)
        assert status == 200, (params, body)
        return body.get("access_token") or body["ticket"]

    expected = {
        "main": sandbox.current_stable_token(DEFAULT_APPID),
        "shop": sandbox.current_token(SHOP_APPID),
        "mini": sandbox.current_stable_token(MINI_APPID),
        "corp": sandbox.current_corp_token(DEFAULT_CORPID, DEFAULT_AGENTID),
    }
    assert all(expected.values()) and len(set(expected.values())) == 4  # four accounts, four tokens
    for name, token in expected.items():
        assert await value(type="access_token", account=name) == token
    for name, appid in (("main", DEFAULT_APPID), ("shop", SHOP_APPID), ("mini", MINI_APPID), ("corp", DEFAULT_CORPID)):
        assert await value(type="access_token", appid=appid) == expected[name]
    # The default account answers requests that name none, from the plain keys.
    assert await value(type="access_token") == expected["main"] == redis_sync.get("access_token")
    assert redis_sync.get("shop.access_token") == expected["shop"]
    # Tickets: each account's own, alive at WeChat.
    tickets = [await value(type=t, account=a) for a, t in
               (("main", "ticket"), ("shop", "ticket"), ("shop", "wx_card_ticket"), ("corp", "ticket"), ("corp", "agent_config_ticket"))]
    assert len(set(tickets)) == 5 and set(tickets) <= sandbox.issued_values()
    assert await value(type="ticket") == redis_sync.get("ticket") == tickets[0]
    # Full source names still work.
    assert await value(type="shop.access_token") == expected["shop"]


@pytest.mark.gen_test(timeout=30)
async def test_two_accounts_do_not_touch_each_other(make_config, start_server, call, sandbox, sandbox_url):
    accounts = every_kind(sandbox_url)
    srv = await start_server(make_config(sources={}, accounts={"main": accounts["main"], "shop": accounts["shop"]}, refresh={"force_min_interval": 0}))
    main_before = sandbox.current_stable_token(DEFAULT_APPID)
    shop_before = sandbox.current_token(SHOP_APPID)
    status, body = await call(srv.port, "/wechat/token/forcerefresh", type="access_token", account="shop", old=shop_before)
    assert status == 200 and body["access_token"] == sandbox.current_token(SHOP_APPID) != shop_before
    assert sandbox.current_stable_token(DEFAULT_APPID) == main_before
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert body["access_token"] == main_before
    assert sandbox.token_status(main_before) == 0


@pytest.mark.gen_test(timeout=30)
async def test_lookup_errors_and_client_scope_by_account(make_config, start_server, call, sandbox, sandbox_url):
    accounts = every_kind(sandbox_url)
    accounts["main"] = dict(accounts["main"], default=False)
    cfg = make_config(sources={}, accounts={"main": accounts["main"], "shop": accounts["shop"]},
                      clients=[{"name": "shopsrv", "secret": CLIENT_SECRET, "accounts": ["shop"]}])
    srv = await start_server(cfg)
    assert await call(srv.port, "/wechat/token", type="access_token", account="nope") == (404, {"errcode": 404, "errmsg": "unknown account"})
    assert await call(srv.port, "/wechat/token", type="access_token", appid="wx000") == (404, {"errcode": 404, "errmsg": "unknown appid"})
    status, body = await call(srv.port, "/wechat/token", type="access_token", account="main", appid=SHOP_APPID)
    assert (status, body["errmsg"]) == (404, "account and appid name different accounts")
    status, body = await call(srv.port, "/wechat/token", type="access_token")
    assert (status, body["errmsg"]) == (400, "name the account: account=NAME or appid=APPID")
    status, body = await call(srv.port, "/wechat/token", type="agent_config_ticket", account="shop")
    assert (status, body["errmsg"]) == (404, "unknown type")
    client = {"X-Token-Secret": CLIENT_SECRET}
    assert (await call(srv.port, "/wechat/token", headers=client, type="ticket", account="shop"))[0] == 200
    assert (await call(srv.port, "/wechat/token", headers=client, type="access_token", appid=SHOP_APPID))[0] == 200
    status, body = await call(srv.port, "/wechat/token", headers=client, type="access_token", account="main")
    assert (status, body["errmsg"]) == (403, "type not allowed for this client")
    assert (await call(srv.port, "/wechat/token", headers=AUTH, type="access_token", account="main"))[0] == 200
