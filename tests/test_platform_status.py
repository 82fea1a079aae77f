"""The operator's status page shows each third-party platform: counts, the next authorizers due
and the blocked ones (the merchant must authorise again), never a list of all of them.

Real redis-server, the sandbox (its component endpoints), real HTTP; the page itself in a real
headless Chromium (skipped locally without it, never in CI).
"""

from __future__ import annotations

import json
import os

import pytest
from helpers_platform import AUTHORIZER_TOKEN_PATH, COMPONENT_TOKEN_PATH, platform_sections, push_event, wait_for
from test_status_browser import MISSING, WAIT, driver, in_thread  # noqa: F401  (driver: the fixture)
from test_status_page import Browserish

from server.sandbox.component import DEFAULT_COMPONENT_APPID
from tests.conftest import TEST_SECRET

HEALTHY, BLOCKED = "wxauthorizer0healthy", "wxauthorizer0blocked"


async def platform_with_a_blocked_authorizer(make_config, start_server, sandbox, sandbox_url, call):
    sandbox.expires_in = 8  # authorizer tokens are refreshed about 3 s before their end
    cfg = make_config(refresh={"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2}, **platform_sections(sandbox_url))
    running = await start_server(cfg)
    assert await push_event(sandbox, running.port, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 1, 5, "the component token")
    for appid in (HEALTHY, BLOCKED):
        code = sandbox.component.authorize(DEFAULT_COMPONENT_APPID, appid)
        status, body = await call(running.port, "/wechat/component/authorizers", method="POST",
                                  body=json.dumps({"authorization_code": code}).encode())
        assert status == 200, body
    sandbox.component.invalidate_refresh_token(DEFAULT_COMPONENT_APPID, BLOCKED)  # its next refresh gets 61023
    await wait_for(lambda: any(r.errcode == 61023 for r in sandbox.requests_to(AUTHORIZER_TOKEN_PATH)), 15, "the 61023")
    status, page = await call(running.port, "/wechat/component/status")
    assert page["blocked"] == 1
    return running


@pytest.mark.gen_test(timeout=60)
async def test_the_page_data_summarises_each_platform(make_config, start_server, sandbox, sandbox_url, call):
    running = await platform_with_a_blocked_authorizer(make_config, start_server, sandbox, sandbox_url, call)
    browser = Browserish(running.port)
    await browser.login()
    status, data = await browser.data()
    assert status == 200
    [platform] = data["platforms"]
    assert platform["platform"] == "myplatform" and platform["verify_ticket"] == "held"
    assert platform["scheduled"] >= 1 and platform["blocked"] == 1
    assert [b["appid"] for b in platform["blocked_authorizers"]] == [BLOCKED]
    assert HEALTHY in [a["appid"] for a in platform["authorizers"]]
    assert len(platform["authorizers"]) <= 10  # a page, however many authorizers there are
    assert "refresh_token" not in json.dumps(data)


@pytest.mark.skipif(bool(MISSING) and os.environ.get("REQUIRE_BROWSER_TESTS") != "1", reason=f"browser tests need {', '.join(MISSING)}")
@pytest.mark.gen_test(timeout=90)
async def test_the_page_in_chromium_shows_the_blocked_authorizer(driver, make_config, start_server, sandbox, sandbox_url, call):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    running = await platform_with_a_blocked_authorizer(make_config, start_server, sandbox, sandbox_url, call)

    def look() -> dict:
        driver.delete_all_cookies()
        driver.get(f"http://127.0.0.1:{running.port}/wechat/status/")
        WebDriverWait(driver, WAIT).until(ec.url_contains("/wechat/status/login"))
        driver.find_element(By.ID, "secret").send_keys(TEST_SECRET)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card.platform .counts"))
        return driver.execute_script(
            """const el = document.querySelector('.card.platform');
            return {name: el.querySelector('h2').textContent, state: el.querySelector('.state').textContent,
                    counts: el.querySelector('.counts').textContent,
                    blocked: [...el.querySelectorAll('.blocked-list li')].map(li => li.textContent),
                    due: [...el.querySelectorAll('.due-list li')].map(li => li.textContent)};""")

    shown = await in_thread(look)
    assert shown["name"] == f"platform myplatform ({DEFAULT_COMPONENT_APPID})"
    assert shown["state"] == "verify ticket held"
    assert "1 blocked" in shown["counts"]
    assert shown["blocked"] == [f"{BLOCKED} (errcode 61023)"]
    assert any(line.startswith(HEALTHY) for line in shown["due"])
