"""The status page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium): login, every source with its state, the countdown moving, the button
forcing a refresh, a blocked source's errcode and advice, a phone-sized window.

The server and the sandbox run in the test's event loop; every selenium call blocks, so each
browser step runs in a worker thread (``in_thread``) while the loop keeps serving.

The screenshot goes to a temporary directory; ``UPDATE_SCREENSHOTS=1 python -m pytest
tests/test_status_browser.py`` writes it to docs/status-page.png (shown in the README).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET, Sandbox
from tests.conftest import TEST_SECRET

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [what for what, ok in (
    ("chromium", os.path.exists(CHROMIUM)),
    ("chromedriver (Debian's chromium-driver)", os.path.exists(CHROMEDRIVER)),
    ("selenium", importlib.util.find_spec("selenium") is not None),
) if not ok]
# CI sets REQUIRE_BROWSER_TESTS=1: there a missing browser is a failure, not a quiet skip.
pytestmark = pytest.mark.skipif(
    bool(MISSING) and os.environ.get("REQUIRE_BROWSER_TESTS") != "1",
    reason=f"browser tests need {', '.join(MISSING)} (apt-get install chromium chromium-driver; pip install selenium)",
)

MINI_APPID, MINI_SECRET = "wx5a9e0000mini", "mini-appsecret-0123456789abcdef"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
WAIT = 10  # seconds any one browser condition may take


@pytest.fixture
def sandbox(secret_watch) -> Sandbox:
    sb = Sandbox(apps={DEFAULT_APPID: DEFAULT_APPSECRET, MINI_APPID: MINI_SECRET})
    secret_watch.sandboxes.append(sb)
    secret_watch.secrets.add(MINI_SECRET)
    return sb


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1100,1000"):
        options.add_argument(arg)
    # selenium logs every WebDriver command's payload at DEBUG, typed text (the secret) included.
    quiet = logging.getLogger("selenium")
    level = quiet.level
    quiet.setLevel(logging.INFO)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT)
    yield browser
    browser.quit()
    quiet.setLevel(level)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def accounts(sandbox_url: str) -> dict[str, Any]:
    return {
        "main": {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "tickets": ["jsapi"], "default": True,
                 "api_base": sandbox_url},
        "mini": {"kind": "miniprogram", "appid": MINI_APPID, "secret": MINI_SECRET, "api_base": sandbox_url},
    }


def seconds(countdown: str) -> int:
    """``1:39:58`` -> 5998."""
    h, m, s = (int(n) for n in re.fullmatch(r"(\d+):(\d\d):(\d\d)", countdown.strip()).groups())  # type: ignore[union-attr]
    return 3600 * h + 60 * m + s


def log_in(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.delete_all_cookies()
    driver.get(url)
    WebDriverWait(driver, WAIT).until(ec.url_contains("/wechat/status/login"))  # redirected to the form
    driver.find_element(By.ID, "secret").send_keys(TEST_SECRET)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, WAIT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-source] .countdown")) == 3)
    assert "secret" not in driver.current_url.lower()


def cards(driver: Any) -> dict[str, dict[str, str]]:
    """What a person reads on each card, by source name."""
    return driver.execute_script(
        """const out = {};
        for (const el of document.querySelectorAll('.card[data-source]')) {
          const t = (s) => el.querySelector(s).textContent;
          out[el.dataset.source] = {state: el.dataset.state, badge: t('.state'), countdown: t('.countdown'),
            fetched: t('.fetched'), calls: t('.calls'), trouble: el.querySelector('.trouble').hidden ? '' : el.querySelector('.trouble').innerText,
            errcode: el.dataset.errcode, result: t('.result')};
        }
        return out;"""
    )


@pytest.mark.gen_test(timeout=60)
async def test_status_page_in_chromium(driver, make_config, start_server, sandbox, sandbox_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    sandbox.expires_in = 3000
    # The mini program's stable_token answers 40164 (our IP is not whitelisted); the main account works.
    sandbox.inject("/cgi-bin/stable_token", "errcode", errcode=40164,
                   errmsg="invalid ip 203.0.113.9 ipv6 ::ffff:203.0.113.9, not in whitelist", times=None)
    srv = await start_server(make_config(sources={}, accounts=accounts(sandbox_url), refresh={"force_min_interval": 0}))
    url = f"http://127.0.0.1:{srv.port}/wechat/status/"
    await in_thread(log_in, driver, url)

    shown = await in_thread(cards, driver)
    assert set(shown) == {"access_token", "ticket", "mini.access_token"}
    assert shown["access_token"]["state"] == shown["ticket"]["state"] == "ok"
    assert shown["access_token"]["badge"] == "ok" and "1 by this instance" in shown["access_token"]["calls"]
    assert 2900 < seconds(shown["access_token"]["countdown"]) <= 3000
    blocked = shown["mini.access_token"]
    assert blocked["state"] == "blocked" and blocked["badge"] == "blocked" and blocked["errcode"] == "40164"
    assert "errcode 40164" in blocked["trouble"] and "203.0.113.9" in blocked["trouble"]
    assert "IP whitelist" in blocked["trouble"] and blocked["countdown"] == "—"

    # The countdown moves every second without a request.
    first = seconds(shown["access_token"]["countdown"])
    await asyncio.sleep(2.1)
    later = seconds((await in_thread(cards, driver))["access_token"]["countdown"])
    assert first - 3 <= later <= first - 1

    # The button forces a refresh: one more upstream call, a new value, a longer life on the card.
    sandbox.expires_in = 6000
    calls, before = sandbox.calls["/cgi-bin/token"], sandbox.current_token()

    def press_force() -> None:
        driver.find_element(By.CSS_SELECTOR, '.card[data-source="access_token"] .force').click()
        WebDriverWait(driver, WAIT).until(ec.alert_is_present()).accept()  # "Force a refresh of access_token?"
        WebDriverWait(driver, WAIT).until(lambda d: seconds(cards(d)["access_token"]["countdown"]) > 5000)

    await in_thread(press_force)
    assert sandbox.calls["/cgi-bin/token"] == calls + 1 and sandbox.current_token() != before
    shown = await in_thread(cards, driver)
    assert "new value fetched" in shown["access_token"]["result"] and "2 by this instance" in shown["access_token"]["calls"]
    # The page never shows a value.
    text = await in_thread(lambda: driver.find_element(By.TAG_NAME, "body").text)
    assert not [v for v in sandbox.issued_values() if v in text] and TEST_SECRET not in text

    # The screenshot kept in the README.
    target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / "status-page.png"
    await in_thread(driver.save_screenshot, str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000

    # Readable on a phone: one column, nothing wider than the screen.
    def phone() -> tuple[int, int, int]:
        driver.set_window_size(390, 844)
        return driver.execute_script(
            "const cs = [...document.querySelectorAll('.card')].map(c => c.getBoundingClientRect().left);"
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth, new Set(cs).size];"
        )

    scroll_width, client_width, columns = await in_thread(phone)
    assert scroll_width <= client_width and columns == 1

    # Logout: back to the form, and the page asks for a login again.
    def logout() -> str:
        driver.find_element(By.ID, "logout").click()
        WebDriverWait(driver, WAIT).until(ec.url_contains("/wechat/status/login"))
        driver.get(url)
        return driver.current_url

    assert (await in_thread(logout)).endswith("/wechat/status/login")
