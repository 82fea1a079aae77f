"""The two commands of the README's first page: the demo runs and answers, then stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import redis

from server.embedded_redis import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_serves_tokens_from_embedded_redis_and_stops_cleanly(tmp_path) -> None:
    port = free_port()
    err_path = tmp_path / "demo.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "token_server.py", "--demo", "--port", str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        banner = ""
        deadline = time.monotonic() + 20
        while "Stop with Ctrl-C" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        secret = re.search(r"Request secret \(generated for this run\): (\S+)", banner).group(1)
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
    assert "cannot start: [Errno 98] Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
