"""JS-SDK signatures: the formula (official vector), URL and domain rules, and
``/wechat/jssdk/config`` through real HTTP, real Redis and the sandbox as WeChat."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from urllib.parse import urlencode

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from server import jssdk
from server.config import ConfigError
from server.config_file import parse_config
from server.sandbox import DEFAULT_AGENTID, DEFAULT_APPID, DEFAULT_APPSECRET, DEFAULT_CORPID, DEFAULT_CORPSECRET
from tests.conftest import AUTH, TEST_SECRET

SHOP_SECRET = "shop-client-secret-0123456789abc"
PAGE = "https://shop.example.com/pay?id=7&from=menu"


@pytest.fixture(autouse=True)
def watch_our_secrets(secret_watch):
    secret_watch.secrets.update({SHOP_SECRET, DEFAULT_CORPSECRET})


def accounts(sandbox_url, *, public=False, per_minute=120, main_tickets=("jsapi",)):
    """main: an official account (default), corp: a WeCom app with both tickets."""
    return {
        "main": {
            "appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "tickets": list(main_tickets), "api_base": sandbox_url,
            "default": True,
            "jssdk": {"allowed_domains": ["shop.example.com", "*.example.org", "pay.example.net:8443"],
                      "public": public, "public_per_minute": per_minute},
        },
        "corp": {
            "kind": "wecom", "corpid": DEFAULT_CORPID, "corpsecret": DEFAULT_CORPSECRET, "agentid": int(DEFAULT_AGENTID),
            "tickets": ["jsapi", "agent_config"], "api_base": sandbox_url,
            "jssdk": {"allowed_domains": ["work.example.com"]},
        },
    }


def config(make_config, sandbox_url, **kw):
    extra = {k: kw.pop(k) for k in ("clients", "server") if k in kw}
    return make_config(sources={}, accounts=accounts(sandbox_url, **kw), **extra)


@pytest.fixture
def fetch(io_loop):
    """``await fetch(port, query_params, headers=..., method=...)`` on /wechat/jssdk/config
    -> (status, body (JSON or text), response headers)."""
    client = AsyncHTTPClient(force_instance=True)

    async def _fetch(port, params=None, *, headers=None, method="GET", query=None):
        qs = query if query is not None else urlencode(params or {})
        req = HTTPRequest(f"http://127.0.0.1:{port}/wechat/jssdk/config" + (f"?{qs}" if qs else ""), method=method,
                          headers=AUTH if headers is None else headers, allow_nonstandard_methods=True)
        resp = await client.fetch(req, raise_error=False)
        text = resp.body.decode() if resp.body else ""
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return resp.code, body, resp.headers

    yield _fetch
    client.close()


def issued_matching(sandbox, nonce, timestamp, url, signature):
    """The sandbox-issued tickets that give ``signature``."""
    return [t for t in sandbox.ledger.tickets if jssdk.sign(t, nonce, timestamp, url) == signature]


# --- the formula and the rules (pure) -------------------------------------------------------


def test_official_test_vector():
    ticket = "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg"
    signature = jssdk.sign(ticket, "Wm3WZYTPz0wzccnW", 1414587457, "http://mp.weixin.qq.com?params=value")
    assert signature == "0f9de62fce790f9a083d5c99e95740ceb90c27ed"
    assert jssdk.sign(ticket, "Wm3WZYTPz0wzccnW", "1414587457", "http://mp.weixin.qq.com?params=value") == signature


def test_nonces_are_fresh_letters_and_digits():
    nonces = {jssdk.new_nonce() for _ in range(200)}
    assert len(nonces) == 200 and all(re.fullmatch(r"[A-Za-z0-9]{16}", n) for n in nonces)


@pytest.mark.parametrize(
    "raw, url, host, port",
    [
        ("https://shop.example.com/pay?id=7#/cart?x=1", "https://shop.example.com/pay?id=7", "shop.example.com", 443),
        ("http://Shop.Example.COM:8080/a#", "http://Shop.Example.COM:8080/a", "shop.example.com", 8080),
        ("HTTPS://shop.example.com", "HTTPS://shop.example.com", "shop.example.com", 443),
        # raw, never re-escaped: %2F and + stay as the page has them
        ("https://shop.example.com/a%2Fb?q=a+b&r=%E4%B8%AD", "https://shop.example.com/a%2Fb?q=a+b&r=%E4%B8%AD", "shop.example.com", 443),
    ],
)
def test_parse_page_cuts_the_fragment_and_keeps_the_rest_raw(raw, url, host, port):
    assert jssdk.parse_page(raw) == jssdk.Page(url, host, port)


HOSTILE_URLS = [
    "ftp://shop.example.com/", "javascript:alert(1)//shop.example.com", "data:text/html,x", "//shop.example.com/",
    "shop.example.com/pay", "https://user:pw@shop.example.com/", "https://evil.com@shop.example.com/",
    "https://shop.example.com\\@evil.com/", "https://evil.com\\.shop.example.com/", "https://shop.example.com /",
    "https://shop.example.com/\r\nX-Injected: 1", "https://shop.example.com/\x00", "https://shop.exämple.com/",
    "https://shop.example.com/中文", "https://[::1]/", "https://[/", "https://shop.example.com:99999/",
    "https://shop.example.com:/", "https://shop.example.com:0/", "https:///pay", "https://%73hop.example.com/",
    "https://shop_x.example.com/", "https://shop.example.com/" + "a" * jssdk.MAX_PAGE_URL,
]


@pytest.mark.parametrize("raw", HOSTILE_URLS)
def test_hostile_page_urls_are_refused(raw):
    with pytest.raises(jssdk.BadPageURL) as refused:
        jssdk.parse_page(raw)
    assert raw not in str(refused.value) and len(str(refused.value)) < 100


ALLOWED = ["shop.example.com", "*.example.org", "pay.example.net:8443"]


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://shop.example.com/", True),
        ("http://SHOP.EXAMPLE.COM:8080/x", True),  # any port for an entry without one
        ("https://example.com/", False),
        ("https://www.shop.example.com/", False),  # an exact entry is not a wildcard
        ("https://shop.example.com.evil.com/", False),
        ("https://evilshop.example.com/", False),
        ("https://a.example.org/", True),
        ("https://a.b.example.org/", True),
        ("https://example.org/", False),  # *.example.org: its subdomains, not itself
        ("https://evil-example.org/", False),
        ("https://aexample.org/", False),
        ("https://example.org.evil.com/", False),
        ("https://pay.example.net:8443/", True),
        ("https://pay.example.net/", False),  # 443 is not 8443
        ("http://pay.example.net:8443/", True),
        ("https://shop.example.com./", False),  # a trailing dot is another origin to a browser
    ],
)
def test_allowed_domains(url, allowed):
    page = jssdk.parse_page(url)
    assert jssdk.host_allowed(page.host, page.port, ALLOWED) is allowed


@pytest.mark.parametrize(
    "origin, allowed",
    [
        ("https://shop.example.com", True), ("http://shop.example.com:8080", True), ("https://a.example.org", True),
        ("https://evil.com", False), ("https://example.org", False), ("null", False), ("", False),
        ("https://shop.example.com/", False), ("https://shop.example.com/path", False), ("https://u@shop.example.com", False),
        ("chrome-extension://shop.example.com", False), ("https://[", False), ("https://shop.example.com\r\n", False),
    ],
)
def test_allowed_origins(origin, allowed):
    assert jssdk.origin_allowed(origin, ALLOWED) is allowed


@pytest.mark.parametrize(
    "domain, error",
    [
        ("*.com", "a wildcard covers the subdomains"),
        ("shop.example.com/pay", "a host like"),
        ("https://shop.example.com", "a host like"),
        ("shop.example.com:70000", "a host like"),
        ("*.*.example.com", "a host like"),
        ("shop.example.com\n", "a host like"),
    ],
)
def test_check_refuses_bad_allowed_domains(domain, error):
    raw = {"server": {"secret": TEST_SECRET}, "accounts": {"main": {"appid": "wx1", "secret": "s" * 32, "tickets": ["jsapi"],
                                                                    "jssdk": {"allowed_domains": [domain]}}}}
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(json.dumps(raw), env={}, source="test")


def test_check_refuses_a_public_limit_below_one():
    raw = {"server": {"secret": TEST_SECRET}, "accounts": {"main": {"appid": "wx1", "secret": "s" * 32, "tickets": ["jsapi"],
           "jssdk": {"allowed_domains": ["a.example.com"], "public": True, "public_per_minute": 0}}}}
    with pytest.raises(ConfigError, match="public_per_minute"):
        parse_config(json.dumps(raw), env={}, source="test")


# --- the endpoint -----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_signature_verifies_with_the_ticket_the_sandbox_issued(make_config, sandbox_url, start_server, fetch, call, sandbox):
    srv = await start_server(config(make_config, sandbox_url))
    calls = dict(sandbox.calls)
    status, body, headers = await fetch(srv.port, {"url": PAGE + "#/cart"})
    assert status == 200, body
    assert set(body) == {"appId", "timestamp", "nonceStr", "signature", "url"}
    assert body["appId"] == DEFAULT_APPID and body["url"] == PAGE  # fragment cut, query kept raw
    assert isinstance(body["timestamp"], int) and abs(body["timestamp"] - time.time()) < 5
    assert re.fullmatch(r"[A-Za-z0-9]{16}", body["nonceStr"]) and re.fullmatch(r"[0-9a-f]{40}", body["signature"])
    # The signature is the one WeChat would compute with the ticket it issued, and that is the served ticket.
    _, served = await call(srv.port, "/wechat/token", type="ticket")
    assert issued_matching(sandbox, body["nonceStr"], body["timestamp"], PAGE, body["signature"]) == [served["ticket"]]
    assert headers["Vary"] == "Origin" and "Access-Control-Allow-Origin" not in headers
    assert headers["Cache-Control"] == "no-store"
    # Signing never calls WeChat, however often, and nonces are fresh each time.
    nonces = set()
    for _ in range(20):
        status, again, _ = await fetch(srv.port, {"url": PAGE, "account": "main"})
        assert status == 200 and again["url"] == PAGE
        nonces.add(again["nonceStr"])
    assert len(nonces) == 20
    assert dict(sandbox.calls) == calls
    assert served["ticket"] not in json.dumps(body)


@pytest.mark.gen_test
async def test_account_chosen_by_appid_and_unknown_ones(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url))
    status, body, _ = await fetch(srv.port, {"url": PAGE, "appid": DEFAULT_APPID})
    assert status == 200 and body["appId"] == DEFAULT_APPID
    for params, errmsg in (({"account": "nope"}, "unknown account"), ({"appid": "wx999"}, "unknown appid"),
                           ({"account": "corp", "appid": DEFAULT_APPID}, "account and appid name different accounts")):
        status, body, _ = await fetch(srv.port, {"url": PAGE, **params})
        assert (status, body) == (404, {"errcode": 404, "errmsg": errmsg})


@pytest.mark.gen_test
async def test_pages_on_other_hosts_get_403(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url))
    for url in ("https://a.example.org/x", "https://a.b.example.org/", "https://pay.example.net:8443/ok", "http://SHOP.example.com/"):
        status, body, _ = await fetch(srv.port, {"url": url})
        assert status == 200 and body["url"] == url, (url, body)
    for url in ("https://evil.com/", "https://example.org/", "https://pay.example.net/", "https://shop.example.com.evil.com/",
                "https://work.example.com/"):  # corp's domain is not main's
        status, body, _ = await fetch(srv.port, {"url": url})
        assert (status, body) == (403, {"errcode": 403, "errmsg": "page not on this account's jssdk.allowed_domains"}), url
    status, body, _ = await fetch(srv.port, {"url": "https://work.example.com/", "account": "corp"})
    assert status == 200


@pytest.mark.gen_test
async def test_hostile_urls_get_400_json(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url))
    for raw in HOSTILE_URLS:
        status, body, _ = await fetch(srv.port, {"url": raw})
        assert status == 400 and body["errcode"] == 400, (raw, body)
        assert raw not in body["errmsg"]
    for query, errmsg in (("", "missing url"), ("url=", "missing url"), ("url=a&url=b", "repeated argument url"),
                          ("url=%FF", "argument url is not UTF-8"), ("url=x&callback=y", "unknown argument callback"),
                          ("url=" + "a" * 5000, "argument url too long")):
        status, body, _ = await fetch(srv.port, query=query)
        assert (status, body) == (400, {"errcode": 400, "errmsg": errmsg}), query
    status, body, _ = await fetch(srv.port, {"url": PAGE, "type": "card"})
    assert (status, body["errcode"]) == (404, 404)


@pytest.mark.gen_test
async def test_secret_required_when_not_public(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url))
    status, body, headers = await fetch(srv.port, {"url": PAGE}, headers={"Origin": "https://shop.example.com"})
    assert (status, body) == (401, {"errcode": 401, "errmsg": "missing secret"})
    assert "Access-Control-Allow-Origin" not in headers
    status, body, _ = await fetch(srv.port, {"url": PAGE}, headers={"X-Token-Secret": "wrong-secret-0123456789abc"})
    assert (status, body) == (403, {"errcode": 403, "errmsg": "wrong secret"})
    status, body, _ = await fetch(srv.port, {"url": PAGE}, method="OPTIONS", headers={"Origin": "https://shop.example.com"})
    assert status == 401
    status, body, _ = await fetch(srv.port, {"url": PAGE}, method="POST", headers={**AUTH, "Content-Length": "0"})
    assert status == 405 and body["errcode"] == 405


@pytest.mark.gen_test
async def test_client_scope(make_config, sandbox_url, start_server, fetch):
    clients = [{"name": "shop", "secret": SHOP_SECRET, "accounts": ["corp"]},
               {"name": "reader", "secret": SHOP_SECRET[::-1], "sources": ["access_token"]}]
    srv = await start_server(config(make_config, sandbox_url, clients=clients))
    shop = {"X-Token-Secret": SHOP_SECRET}
    status, body, _ = await fetch(srv.port, {"url": "https://work.example.com/", "account": "corp"}, headers=shop)
    assert status == 200
    status, body, _ = await fetch(srv.port, {"url": PAGE, "account": "main"}, headers=shop)
    assert (status, body) == (403, {"errcode": 403, "errmsg": "type not allowed for this client"})
    # a token is not the ticket: a client given only the access_token may not sign
    status, body, _ = await fetch(srv.port, {"url": PAGE}, headers={"X-Token-Secret": SHOP_SECRET[::-1]})
    assert status == 403


@pytest.mark.gen_test
async def test_wecom_config_and_agent_config(make_config, sandbox_url, start_server, fetch, call, sandbox):
    srv = await start_server(config(make_config, sandbox_url))
    page = "https://work.example.com/app/index.html?a=1"
    calls = dict(sandbox.calls)
    _, corp_ticket = await call(srv.port, "/wechat/token", type="ticket", account="corp")
    _, agent_ticket = await call(srv.port, "/wechat/token", type="agent_config_ticket", account="corp")
    assert corp_ticket["ticket"] != agent_ticket["ticket"]

    status, body, _ = await fetch(srv.port, {"url": page + "#x", "account": "corp"})
    assert status == 200 and set(body) == {"appId", "timestamp", "nonceStr", "signature", "url"}
    assert body["appId"] == DEFAULT_CORPID and body["url"] == page
    assert issued_matching(sandbox, body["nonceStr"], body["timestamp"], page, body["signature"]) == [corp_ticket["ticket"]]

    status, body, _ = await fetch(srv.port, {"url": page, "account": "corp", "type": "agent_config"})
    assert status == 200 and set(body) == {"corpid", "agentid", "timestamp", "nonceStr", "signature", "url"}
    assert body["corpid"] == DEFAULT_CORPID and body["agentid"] == DEFAULT_AGENTID
    assert issued_matching(sandbox, body["nonceStr"], body["timestamp"], page, body["signature"]) == [agent_ticket["ticket"]]
    assert dict(sandbox.calls) == calls

    # an official account has no agent ticket
    status, body, _ = await fetch(srv.port, {"url": PAGE, "type": "agent_config"})
    assert (status, body) == (404, {"errcode": 404, "errmsg": "account has no agent_config ticket (accounts.NAME.tickets)"})


@pytest.mark.gen_test
async def test_account_without_jsapi_ticket_gets_404(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url, main_tickets=()))
    status, body, _ = await fetch(srv.port, {"url": PAGE})
    assert (status, body) == (404, {"errcode": 404, "errmsg": "account has no jsapi ticket (accounts.NAME.tickets)"})


@pytest.mark.gen_test
async def test_no_valid_ticket_is_503(make_config, sandbox_url, start_server, fetch, sandbox):
    sandbox.inject("/cgi-bin/ticket/getticket", "http_error", status=502, times=None)
    srv = await start_server(config(make_config, sandbox_url))
    calls = dict(sandbox.calls)
    status, body, _ = await fetch(srv.port, {"url": PAGE})
    assert (status, body) == (503, {"errcode": 503, "errmsg": "no valid ticket: upstream is failing"})
    assert dict(sandbox.calls) == calls  # still no upstream call from signing


@pytest.mark.gen_test
async def test_no_accounts_configured(make_config, start_server, fetch):
    srv = await start_server(make_config())  # bare sources: no appid to sign for
    status, body, _ = await fetch(srv.port, {"url": PAGE})
    assert (status, body["errcode"]) == (404, 404) and "accounts" in body["errmsg"]


# --- public mode ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_public_mode_cors_for_exactly_the_allowed_origins(make_config, sandbox_url, start_server, fetch, call, sandbox):
    srv = await start_server(config(make_config, sandbox_url, public=True))
    origin = "https://shop.example.com"
    status, body, headers = await fetch(srv.port, {"url": PAGE}, headers={"Origin": origin})
    assert status == 200 and body["url"] == PAGE
    assert headers["Access-Control-Allow-Origin"] == origin and headers["Vary"] == "Origin"
    _, served = await call(srv.port, "/wechat/token", type="ticket")
    assert issued_matching(sandbox, body["nonceStr"], body["timestamp"], PAGE, body["signature"]) == [served["ticket"]]
    # a subdomain page signs itself under the wildcard
    status, _, headers = await fetch(srv.port, {"url": "https://m.example.org/"}, headers={"Origin": "https://m.example.org"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://m.example.org"
    # another origin: the answer is not readable by its page (no CORS header), never "*"
    for other in ("https://evil.com", "null", "https://example.org", "https://shop.example.com.evil.com"):
        status, _, headers = await fetch(srv.port, {"url": PAGE}, headers={"Origin": other})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"
    # pages off the list are refused, and the allowed page can read why
    status, body, headers = await fetch(srv.port, {"url": "https://evil.com/"}, headers={"Origin": origin})
    assert status == 403 and body["errcode"] == 403 and headers["Access-Control-Allow-Origin"] == origin
    # preflight
    pre = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    status, body, headers = await fetch(srv.port, {"url": PAGE}, method="OPTIONS", headers=pre)
    assert status == 204 and body == ""
    assert headers["Access-Control-Allow-Origin"] == origin and headers["Access-Control-Allow-Methods"] == "GET"
    assert headers["Vary"] == "Origin"
    status, body, headers = await fetch(srv.port, {"url": PAGE}, method="OPTIONS", headers={**pre, "Origin": "https://evil.com"})
    assert (status, body) == (403, {"errcode": 403, "errmsg": "origin not allowed"}) and "Access-Control-Allow-Origin" not in headers


@pytest.mark.gen_test
async def test_public_mode_opens_nothing_else(make_config, sandbox_url, start_server, fetch, call):
    srv = await start_server(config(make_config, sandbox_url, public=True))
    # the other endpoints, and the other (non-public) account, still want a credential
    for path, params in (("/wechat/token", {"type": "ticket"}), ("/wechat/token/forcerefresh", {"type": "ticket"}), ("/status", {})):
        status, _ = await call(srv.port, path, headers={"Origin": "https://shop.example.com"}, **params)
        assert status == 401, path
    status, body, _ = await fetch(srv.port, {"url": "https://work.example.com/", "account": "corp"}, headers={})
    assert (status, body["errmsg"]) == (401, "missing secret")
    # a presented credential is checked even on the public account: no bypass with a wrong one
    status, body, _ = await fetch(srv.port, {"url": PAGE}, headers={"X-Token-Secret": "wrong-secret-0123456789abc"})
    assert (status, body["errmsg"]) == (403, "wrong secret")
    status, _, _ = await fetch(srv.port, {"url": PAGE})  # and the right one works as before
    assert status == 200


@pytest.mark.gen_test
async def test_public_mode_is_rate_limited_per_ip(make_config, sandbox_url, start_server, fetch):
    srv = await start_server(config(make_config, sandbox_url, public=True, per_minute=3))
    browser = {"Origin": "https://shop.example.com", "X-Real-IP": "203.0.113.5"}
    for _ in range(3):
        assert (await fetch(srv.port, {"url": PAGE}, headers=browser))[0] == 200
    status, body, headers = await fetch(srv.port, {"url": PAGE}, headers=browser)
    assert (status, body) == (429, {"errcode": 429, "errmsg": "too many requests"})
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["Access-Control-Allow-Origin"] == "https://shop.example.com"  # the page can tell why
    # another IP has its own budget; the authenticated way is not counted
    assert (await fetch(srv.port, {"url": PAGE}, headers={**browser, "X-Real-IP": "203.0.113.6"}))[0] == 200
    assert (await fetch(srv.port, {"url": PAGE}, headers={**AUTH, "X-Real-IP": "203.0.113.5"}))[0] == 200


@pytest.mark.gen_test
async def test_public_mode_passes_the_ip_allowlist_only_for_itself(make_config, sandbox_url, start_server, fetch, call):
    """Browsers cannot be listed in allow_ips: behind the trusted proxy a public signature is
    served to any IP, while every other request from that IP is refused as before."""
    srv = await start_server(config(make_config, sandbox_url, public=True, server={"allow_ips": ["10.9.9.9"]}))
    browser = {"Origin": "https://shop.example.com", "X-Real-IP": "203.0.113.7"}
    status, body, _ = await fetch(srv.port, {"url": PAGE}, headers=browser)
    assert status == 200 and body["url"] == PAGE
    status, body, _ = await fetch(srv.port, {"url": PAGE}, headers={**browser, **AUTH})
    assert (status, body["errmsg"]) == (403, "ip not allowed")
    status, body, _ = await fetch(srv.port, {"url": "https://work.example.com/", "account": "corp"}, headers=browser)
    assert (status, body["errmsg"]) == (403, "ip not allowed")
    status, body = await call(srv.port, "/wechat/token", headers={**AUTH, "X-Real-IP": "203.0.113.7"}, type="ticket")
    assert (status, body["errmsg"]) == (403, "ip not allowed")


# --- the README's example, run as written ---------------------------------------------------


def readme_curl() -> str:
    """The bash block of the README's JS-SDK section."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8").read()
    section = readme.split("\n## JS-SDK\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.gen_test
async def test_readme_curl_example_as_written(make_config, sandbox_url, start_server, call, sandbox):
    srv = await start_server(config(make_config, sandbox_url))
    block = readme_curl()
    assert "http://127.0.0.1:12123/" in block
    command = "\n".join(line for line in block.splitlines() if not line.startswith("#"))
    # Only the port differs from the README (the test server listens on a free one).
    command = command.replace("127.0.0.1:12123", f"127.0.0.1:{srv.port}")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", "set -e\n" + command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKEN_SERVER_SECRET": TEST_SECRET},
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    body = json.loads(out)
    shown = json.loads(block.split("\n# ", 1)[1].splitlines()[0])  # the answer the README shows
    assert set(body) == set(shown) and body["url"] == shown["url"] and body["appId"] == shown["appId"]
    _, served = await call(srv.port, "/wechat/token", type="ticket")
    assert issued_matching(sandbox, body["nonceStr"], body["timestamp"], body["url"], body["signature"]) == [served["ticket"]]
