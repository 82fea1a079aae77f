"""Exposure: what a peer can cost the server before it has proved anything, and what an
answer or a log line can show.  Floods of connections from a refused IP, heads that never
end, running out of file descriptors, a secret in a proxied URL, /metrics and scopes,
over-long header values in the access log.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import jwt
import pytest

from tests.conftest import AUTH, TEST_SECRET
from tests.helpers_procs import REPO, get_json, proc_config

SHOP_SECRET = "shop-secret-0123456789abcdefXYZ"
OPS_SECRET = "ops-secret-0123456789abcdefXYZW"
KEY1 = "jwt-key-one-0123456789abcdefghijklmnop"


@pytest.fixture(autouse=True)
def watch_our_secrets(secret_watch):
    secret_watch.secrets.update({SHOP_SECRET, OPS_SECRET, KEY1})


def _wait_closed(socks: list[socket.socket], timeout: float) -> tuple[int, int, int]:
    """(closed without an answer, answered, still open) after at most ``timeout`` seconds."""
    closed = answered = 0
    pending = {s.fileno(): s for s in socks}
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd, None)
            if sock is None:
                continue
            poller.unregister(fd)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                answered += 1
            else:
                closed += 1
    return closed, answered, len(pending)


def _flood(port: int, n: int, source: str) -> tuple[int, int, int]:
    """``n`` connections from ``source``; every other one sends a request, the rest stay silent
    (half-open, as a flood would).  Returns what _wait_closed saw."""
    socks = []
    try:
        for i in range(n):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            if i % 2:
                try:
                    sock.sendall(b"GET /wechat/token?type=access_token HTTP/1.1\r\nHost: x\r\n\r\n")
                except OSError:
                    pass  # already closed by the server: what we want
            socks.append(sock)
        return _wait_closed(socks, 3.0)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_ip_is_closed_at_accept_and_healthz_keeps_answering(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config(server={"allow_ips": ["127.0.0.1"], "trusted_proxies": []}))
    since = len(secret_watch.records)
    loop = asyncio.get_running_loop()
    flood = loop.run_in_executor(None, _flood, srv.port, 400, "127.0.0.2")
    slowest = 0.0
    while not flood.done():
        started = time.monotonic()
        status, body = await call(srv.port, "/healthz", headers={})
        slowest = max(slowest, time.monotonic() - started)
        assert (status, body) == (200, {"status": "ok"})
        await asyncio.sleep(0.05)
    closed, answered, still_open = await flood
    # Every connection of the refused IP closed without a byte of answer, none held open.
    assert (closed, answered, still_open) == (400, 0, 0)
    assert slowest < 1.0
    about = [line for line in secret_watch.records[since:] if "127.0.0.2" in line]
    assert 1 <= len(about) <= 8, about[:10]
    # The allowed IP is served as before.
    assert (await call(srv.port, "/wechat/token", type="access_token"))[0] == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_probe_ip_reaches_healthz_only(make_config, start_server, secret_watch):
    srv = await start_server(make_config(server={"allow_ips": ["127.0.0.1"], "trusted_proxies": [], "probe_ips": ["127.0.0.3"]}))
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.simple_httpclient import HTTPStreamClosedError

    client = AsyncHTTPClient(force_instance=True)
    try:
        def req(path, ip):
            return HTTPRequest(f"http://127.0.0.1:{srv.port}{path}", headers=AUTH, network_interface=ip, request_timeout=5)

        assert (await client.fetch(req("/healthz", "127.0.0.3"), raise_error=False)).code == 200
        resp = await client.fetch(req("/wechat/token?type=access_token", "127.0.0.3"), raise_error=False)
        assert resp.code == 403 and b"ip not allowed" in resp.body
        with pytest.raises(HTTPStreamClosedError):  # no answer at all: closed at accept
            await client.fetch(req("/healthz", "127.0.0.4"), raise_error=False)
    finally:
        client.close()


def _slow_head(port: int, wait: float) -> tuple[bytes | None, float]:
    """A head sent one header line at a time, never finished.  Returns (what the server
    sent before closing, or None if it was still open after ``wait``; seconds it took)."""
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.3)
        received = b""
        while time.monotonic() - started < wait:
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                try:
                    sock.sendall(b"X-Trickle: 1\r\n")  # keeps sending: must not extend the deadline
                except OSError:
                    return received, time.monotonic() - started
                continue
            except ConnectionResetError:
                return received, time.monotonic() - started
            if not chunk:
                return received, time.monotonic() - started
            received += chunk
        return None, wait
    finally:
        sock.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_head_that_never_ends_is_closed_after_the_header_timeout(make_config, start_server, call):
    srv = await start_server(make_config(server={"header_timeout": 1.5}))
    received, took = await asyncio.get_running_loop().run_in_executor(None, _slow_head, srv.port, 6.0)
    assert received == b"" and 1.0 <= took < 3.5, (received, took)
    assert (await call(srv.port, "/healthz", headers={}))[0] == 200


def _hold(port: int, n: int, seconds: float) -> int:
    """Open ``n`` silent connections, hold them ``seconds``, close them; returns how many connected."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    time.sleep(seconds)
    for sock in socks:
        sock.close()
    return len(socks)


@pytest.mark.gen_test(timeout=60)
async def test_out_of_file_descriptors_the_log_stays_short_and_the_server_recovers(token_servers, redis_url, sandbox_url):
    """A real token_server.py under a 64-descriptor limit (prlimit), flooded with silent
    connections from an allowed IP: accept() fails with EMFILE for seconds."""
    if not os.path.exists("/usr/bin/prlimit"):
        pytest.skip("prlimit (util-linux) not installed")
    proc = token_servers(proc_config(redis_url, sandbox_url))
    proc.starts += 1
    with open(proc.log_path, "ab") as log:
        proc.process = subprocess.Popen(
            ["/usr/bin/prlimit", "--nofile=64:64", sys.executable, os.path.join(REPO, "token_server.py"),
             "-c", proc.config_path, "--port", str(proc.port)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    await proc.wait_ready()
    before = len(proc.log().splitlines())
    held = asyncio.get_running_loop().run_in_executor(None, _hold, proc.port, 300, 4.0)
    await asyncio.sleep(1.0)
    assert not held.done()
    assert await held == 300
    # Descriptors are free again: the server answers at once.
    started = time.monotonic()
    status, _ = await get_json(f"{proc.base}/healthz", timeout=3.0)
    assert status == 200 and time.monotonic() - started < 2.0
    assert (await proc.get("/wechat/token", type="access_token"))[0] == 200
    lines = proc.log().splitlines()[before:]
    assert any("Too many open files" in line for line in lines), lines[-5:]
    # Four seconds of EMFILE: a handful of lines (at most 3 a second, plus the count of
    # the suppressed), not one traceback per turn of the event loop.
    assert len(lines) <= 30, f"{len(lines)} lines, e.g. {lines[:3]}"
    assert proc.alive()


# --- a secret in a proxied URL ------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("name", ["secret", "s%65cret", "%73ecret", "secre%74", "%73%65%63%72%65%74"])
async def test_a_secret_in_the_url_of_a_proxied_request_is_refused(name, make_config, start_server, call):
    srv = await start_server(make_config())
    query = f"type=access_token&{name}={quote(TEST_SECRET)}"
    for proxy_header in ({"X-Real-IP": "10.1.2.3"}, {"X-Forwarded-For": "10.1.2.3"}):
        status, body = await call(srv.port, "/wechat/token", headers=proxy_header, query=query)
        assert (status, body) == (400, {"errcode": 400, "errmsg": "send the secret in the X-Token-Secret header, not in the URL"})
    # A direct caller (no proxy between) may still use the argument.
    assert (await call(srv.port, "/wechat/token", headers={}, query=query))[0] == 200


# --- /metrics -----------------------------------------------------------------------------


def _jwt(**claims):
    payload = {"aud": "wechat-token-server", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, KEY1, algorithm="HS256", headers={"kid": "k1"})


@pytest.mark.gen_test
async def test_metrics_only_for_the_operator_and_clients_given_them(make_config, start_server, call):
    srv = await start_server(make_config(
        clients=[
            {"name": "shop", "secret": SHOP_SECRET, "sources": ["access_token"]},
            {"name": "ops", "secret": OPS_SECRET, "sources": [], "metrics": True},
        ],
        jwt={"keys": {"k1": KEY1}},
    ))
    refused = {
        "shop": {"X-Token-Secret": SHOP_SECRET},
        "jwt scoped to nothing": {"Authorization": f"Bearer {_jwt(sub='bot')}"},
        "jwt whose sub is default": {"Authorization": f"Bearer {_jwt(sub='default', sources=['access_token', 'ticket'])}"},
    }
    for who, headers in refused.items():
        status, body = await call(srv.port, "/metrics", headers=headers)
        assert (status, body) == (403, {"errcode": 403, "errmsg": "metrics not allowed for this client"}), who
    for who, headers in {"operator": AUTH, "ops": {"X-Token-Secret": OPS_SECRET},
                         "jwt of ops": {"Authorization": f"Bearer {_jwt(sub='ops')}"}}.items():
        status, text = await call(srv.port, "/metrics", headers=headers)
        assert status == 200 and 'wechat_token_seconds_left{source="ticket"}' in text, who


# --- what reaches a log line or an answer -------------------------------------------------


@pytest.mark.gen_test
async def test_a_long_forwarded_ip_is_bounded_in_the_access_log(make_config, start_server, call, secret_watch):
    srv = await start_server(make_config())
    since = len(secret_watch.records)
    long_ip = "fe80::1%" + "A" * 3100  # parses as an IPv6 address with a zone
    status, _ = await call(srv.port, "/wechat/token", headers={**AUTH, "X-Real-IP": long_ip}, type="access_token")
    assert status == 200
    lines = secret_watch.records[since:]
    assert any("200 GET /wechat/token" in line and "ip=fe80::1" in line for line in lines), lines
    assert max(len(line) for line in lines) < 300


@pytest.mark.gen_test
async def test_what_tornado_refuses_before_our_handlers_is_a_bare_400(make_config, start_server):
    """Two Host headers and a query of 2,000 arguments never reach a handler of ours: Tornado's
    parser answers 400 without a body (docs/SECURITY.md).  Pinned, so that a Tornado
    upgrade that lets them through is noticed: then our handlers must answer JSON."""
    srv = await start_server(make_config())

    def raw(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    loop = asyncio.get_running_loop()
    two_hosts = b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    many = b"GET /wechat/token?type=access_token&" + b"&".join(b"a%d=1" % i for i in range(2000)) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for request in (two_hosts, many):
        answer = await loop.run_in_executor(None, raw, request)
        assert answer == b"HTTP/1.1 400 Bad Request\r\n\r\n", answer[:200]
