"""deploy/nginx.conf, run by a real nginx in front of the server: TLS, proxying, no secret in its log."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from server.embedded_redis import free_port
from tests.conftest import TEST_SECRET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not (shutil.which("nginx") and shutil.which("openssl")), reason="nginx and openssl not installed (.ci/run installs them)"
)


async def https_get(client: AsyncHTTPClient, url: str, **kw) -> Any:
    """GET through nginx's self-signed TLS, retried while nginx is still binding (599)."""
    for _ in range(50):
        resp = await client.fetch(url, validate_cert=False, raise_error=False, **kw)
        if resp.code != 599:
            return resp
        await asyncio.sleep(0.1)
    return resp


@pytest.fixture
def nginx_for(tmp_path):
    """``nginx_for(backend_port)`` -> (https_port, access_log_path): deploy/nginx.conf with its
    placeholders and ports filled in, run in the foreground."""
    procs = []

    def start(backend_port: int) -> tuple[int, str]:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-keyout", str(tmp_path / "t.key"), "-out", str(tmp_path / "t.crt")],
            check=True, capture_output=True,
        )
        https, http = free_port(), free_port()
        site = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
        for old, new in [
            ("listen 443 ssl", f"listen 127.0.0.1:{https} ssl"),
            ("listen 80;", f"listen 127.0.0.1:{http};"),
            ("/etc/nginx/tls/CHANGE_ME.crt", str(tmp_path / "t.crt")),
            ("/etc/nginx/tls/CHANGE_ME.key", str(tmp_path / "t.key")),
            ("/var/log/nginx/", f"{tmp_path}/"),
            ("server 127.0.0.1:12123", f"server 127.0.0.1:{backend_port}"),
        ]:
            assert old in site, old
            site = site.replace(old, new)
        (tmp_path / "site.conf").write_text(site)
        temp = "".join(f"{k}_temp_path {tmp_path}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp_path / "nginx.conf").write_text(
            f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/main-error.log;\nevents {{}}\n"
            f"http {{\n{temp}access_log off;\ninclude {tmp_path}/site.conf;\n}}\n"
        )
        check = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"])
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(tmp_path / "nginx.pid") and time.monotonic() < deadline:
            time.sleep(0.05)
        return https, str(tmp_path / "wechat-token-server.access.log")

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.mark.gen_test(timeout=30)
async def test_nginx_proxies_over_tls_and_keeps_secrets_out_of_its_logs(make_config, start_server, nginx_for, sandbox):
    from server.app import stop

    srv = await start_server(make_config())
    https, access_log = nginx_for(srv.port)
    error_log = access_log.replace(".access.log", ".error.log")
    client = AsyncHTTPClient(force_instance=True)
    base = f"https://127.0.0.1:{https}/wechat/token?type=access_token"

    def get(url, **headers):
        return https_get(client, url, headers=headers)

    resp = await get(base, **{"X-Token-Secret": TEST_SECRET})
    assert resp.code == 200 and sandbox.current_token().encode() in resp.body
    resp = await get(base, **{"X-Token-Secret": "wrong-secret-0123456789"})
    assert resp.code == 403 and resp.body.startswith(b'{"errcode": 403')
    # A secret in the URL is refused by nginx itself, with a JSON error saying what to do.
    resp = await get(f"{base}&secret={TEST_SECRET}")
    assert resp.code == 400 and b"X-Token-Secret header" in resp.body
    # Every instance down: JSON 503, and the error log (which writes the request line) has
    # nothing secret because the secret travels in a header.
    await stop(srv, 1.0)
    resp = await get(base, **{"X-Token-Secret": TEST_SECRET})
    assert resp.code == 503 and resp.body.startswith(b'{"errcode": 503')
    client.close()
    time.sleep(0.2)
    log = open(access_log).read()
    assert "GET /wechat/token HTTP/" in log and " 200 " in log and " 403 " in log and " 400 " in log
    errors = open(error_log).read()
    assert "connect() failed" in errors or "upstream" in errors  # the failure was logged...
    for text in (log, errors):
        assert TEST_SECRET not in text and "secret=" not in text  # ...without the secret


@pytest.mark.gen_test(timeout=30)
async def test_nginx_refuses_a_secret_in_the_url_however_it_is_encoded(make_config, start_server, nginx_for):
    from server.app import stop

    srv = await start_server(make_config())
    https, access_log = nginx_for(srv.port)
    error_log = access_log.replace(".access.log", ".error.log")
    client = AsyncHTTPClient(force_instance=True)
    base = f"https://127.0.0.1:{https}/wechat/token?type=access_token"
    names = ["secret", "SECRET", "Secret", "s%65cret", "%73ecret", "secre%74", "%53ECRET", "s%2565cret"]

    def get(url, **headers):
        return https_get(client, url, headers=headers)

    # A legitimate encoded VALUE is still proxied; only encoded NAMES are refused.
    resp = await get(f"{base.replace('/token?', '/token/forcerefresh?')}&old=a%2Fb", **{"X-Token-Secret": TEST_SECRET})
    assert resp.code == 200, resp.body
    # The live reload is per instance: nginx would reach one of them, so it refuses it.
    resp = await https_get(client, f"https://127.0.0.1:{https}/admin/reload", method="POST", body=b"", headers={"X-Token-Secret": TEST_SECRET})
    assert resp.code == 403 and b"kill -HUP" in resp.body, resp.body
    for down in (False, True):
        if down:
            await stop(srv, 1.0)  # every backend down: nginx's error log would write the request line
        for name in names:
            resp = await get(f"{base}&{name}={TEST_SECRET}")
            assert resp.code == 400 and b"X-Token-Secret header" in resp.body, (name, down, resp.code, resp.body)
    # The refusals never reached a backend, so nothing was written to the error log about them.
    resp = await get(base, **{"X-Token-Secret": TEST_SECRET})
    assert resp.code == 503
    client.close()
    time.sleep(0.2)
    errors = open(error_log).read()
    assert "connect() failed" in errors or "upstream" in errors
    for text in (open(access_log).read(), errors):
        assert TEST_SECRET not in text and "ecret=" not in text and "%65" not in text


@pytest.mark.gen_test(timeout=30)
async def test_the_face_through_nginx_takes_wechats_own_requests_and_logs_no_appsecret(make_config, start_server, nginx_for, sandbox, sandbox_url):
    from server.app import stop
    from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET

    account = {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "api_base": sandbox_url}
    srv = await start_server(make_config(sources={}, accounts={"main": account}))
    https, access_log = nginx_for(srv.port)
    error_logs = [access_log.replace(".access.log", suffix) for suffix in (".error.log", ".face-error.log")]
    client = AsyncHTTPClient(force_instance=True)
    fetch_token = f"https://127.0.0.1:{https}/cgi-bin/token?grant_type=client_credential&appid={DEFAULT_APPID}&secret={DEFAULT_APPSECRET}"

    def get(url):
        return https_get(client, url)

    resp = await get(fetch_token)
    assert resp.code == 200, resp.body
    token = json.loads(resp.body)["access_token"]
    assert token == sandbox.current_token() and sandbox.calls["/cgi-bin/token"] == 1  # from the cache
    resp = await get(f"https://127.0.0.1:{https}/cgi-bin/getcallbackip?access_token={token}")
    assert resp.code == 200 and "ip_list" in json.loads(resp.body)
    # Our own API still refuses a secret in the URL.
    resp = await get(f"https://127.0.0.1:{https}/wechat/token?type=access_token&secret={TEST_SECRET}")
    assert resp.code == 400
    # Every instance down: WeChat's "system busy" (SDKs retry), and no AppSecret in any log.
    await stop(srv, 1.0)
    resp = await get(fetch_token)
    assert resp.code == 200 and json.loads(resp.body) == {"errcode": -1, "errmsg": "system error"}
    client.close()
    time.sleep(0.2)
    for path in [access_log, *error_logs]:
        text = open(path).read() if os.path.exists(path) else ""
        assert DEFAULT_APPSECRET not in text and "secret=" not in text and token not in text, path
