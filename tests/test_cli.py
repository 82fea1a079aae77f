"""The two commands of the README's first page: the demo runs and answers, then stops cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from server.embedded_redis import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_demo(tmp_path, *extra: str) -> tuple[subprocess.Popen[str], int, str, str]:
    """``token_server.py --demo`` on a free port, its stderr in tmp_path/demo.err: (process,
    port, the banner it printed, the request secret the banner names)."""
    port = free_port()
    with open(tmp_path / "demo.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "token_server.py", "--demo", "--port", str(port), *extra],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    banner = ""
    deadline = time.monotonic() + 20
    while "Stop with Ctrl-C" not in banner and time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        banner += line
    found = re.search(r"Request secret \(generated for this run\): (\S+)", banner)
    return proc, port, banner, found.group(1) if found else ""


def test_demo_serves_tokens_from_embedded_redis_and_stops_cleanly(tmp_path) -> None:
    err_path = tmp_path / "demo.err"
    proc, port, banner, secret = start_demo(tmp_path)
    try:
        assert secret, banner
        redis_port = int(re.search(r"redis-cli -p (\d+) GET access_token", banner).group(1))
        assert f"curl -H 'X-Token-Secret: {secret}' 'http://127.0.0.1:{port}/wechat/token?type=access_token'" in banner

        req = urllib.request.Request(f"http://127.0.0.1:{port}/wechat/token?type=access_token", headers={"X-Token-Secret": secret})
        body = json.loads(urllib.request.urlopen(req, timeout=5).read())
        assert 6900 < body["expires_in"] <= 7000
        direct = redis.Redis(port=redis_port, decode_responses=True)
        assert direct.get("access_token") == body["access_token"]  # the redis-cli line of the banner works
        direct.close()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/wechat/token?type=ticket", headers={"X-Token-Secret": secret})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["ticket"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log = err_path.read_text()
        assert "stopped" in log
        assert secret not in log and body["access_token"] not in log
        # The embedded redis-server went down with it.
        try:
            redis.Redis(port=redis_port, socket_connect_timeout=0.5).ping()
            alive = True
        except redis.ConnectionError:
            alive = False
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_port_is_one_line_and_exit_1(tmp_path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "token_server.py", "--demo", "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot start: port {port} is already in use on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


# --- flags under the config's rules -------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "token_server.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], **(env or {})})


def test_a_port_out_of_range_is_refused_like_the_yaml_refuses_it(tmp_path) -> None:
    # 99999 would bind 34463 (99999 modulo 65536): the same rule as server.port, exit 2, one line.
    for port in ("99999", "0", "-1"):
        result = cli("--demo", "--port", port)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"config error: --port: must be between 1 and 65535, got {port}"]
    path = tmp_path / "c.yaml"
    path.write_text("server: {secret: a-long-random-request-secret-42, port: 99999}\nsources: {t: {url: 'http://x/a'}}\n")
    path.chmod(0o600)
    result = cli("--check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config error: server.port: must be between 1 and 65535, got 99999"]


def test_an_unknown_log_level_is_refused() -> None:
    result = cli("--demo", "--log-level", "LOUD")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config error: --log-level: 'LOUD' is no log level; use DEBUG, INFO, WARNING, ERROR"]
    result = cli("--demo", env={"LOG_LEVEL": "verbose"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config error: LOG_LEVEL (environment): 'verbose' is no log level; use DEBUG, INFO, WARNING, ERROR"]


def test_the_demos_forcerefresh_line_with_old_returns_a_new_token(tmp_path) -> None:
    """The banner's forcerefresh recipe, as printed: the current token in old=, a new one back."""
    proc, port, banner, secret = start_demo(tmp_path)
    try:
        assert secret, banner
        base = f"http://127.0.0.1:{port}"
        get_line = (f"TOKEN=$(curl -s -H 'X-Token-Secret: {secret}' '{base}/wechat/token?type=access_token' | "
                    """python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')""")
        force_line = f"""curl -H 'X-Token-Secret: {secret}' "{base}/wechat/token/forcerefresh?type=access_token&old=$TOKEN\""""
        assert f"  {get_line}\n  {force_line}\n" in banner
        assert "forcerefresh?type=access_token'" not in banner  # the form without old= is gone
        assert "refresh.force_min_interval (30 s)" in banner
        # What the two lines do, step by step (curl may be absent): the token read, then forced with old=.
        headers = {"X-Token-Secret": secret}
        old = json.loads(urllib.request.urlopen(urllib.request.Request(f"{base}/wechat/token?type=access_token", headers=headers),
                                                timeout=5).read())["access_token"]
        url = force_line.split('"')[1].replace("$TOKEN", old)
        new = json.loads(urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read())["access_token"]
        assert new != old  # within 30 s of the first fetch: old= still gets a new token
        # The same old= again: already replaced, so the current token, without a call.
        again = json.loads(urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read())["access_token"]
        assert again == new
        if shutil.which("curl") and shutil.which("bash"):  # the lines as a user pastes them
            out = subprocess.run(["bash", "-c", f"{get_line}\n{force_line}"], capture_output=True, text=True, timeout=20)
            assert out.returncode == 0 and json.loads(out.stdout)["access_token"] not in (old, new)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unusable_embedded_redis_data_dir_is_a_config_error(tmp_path) -> None:
    # Under the systemd unit ./data is read-only: exit 2 (not retried), one line naming the key.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "server: {secret: test-request-secret-0123456789abcdef, port: 12399}\n"
        f"redis: {{data_dir: '{blocker}/data'}}\n"
        "sources: {t: {url: 'https://example.com/t'}}\n"
    )
    cfg.chmod(0o600)
    result = cli("-c", str(cfg))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("config error: redis.data_dir: cannot use")


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_the_event_loop_is_the_one_asked_for(tmp_path, choice) -> None:
    pytest.importorskip(choice)
    proc, port, banner, secret = start_demo(tmp_path, "--loop", choice)
    try:
        assert secret, banner
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/wechat/token?type=access_token",
                                                           headers={"X-Token-Secret": secret}), timeout=10) as resp:
            assert json.load(resp)["access_token"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert f"event loop: {choice}" in (tmp_path / "demo.err").read_text()
