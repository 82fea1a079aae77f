"""logging.format: json (one JSON object a line, redacted like text) and logging.file (survives logrotate)."""

from __future__ import annotations

import json
import logging
import os

import pytest
from helpers_procs import PROC_SECRET, proc_config

from server.config import LoggingConfig
from server.logformat import JsonFormatter, build_handler
from server.redact import RedactFilter, Redactor
from server.sandbox import DEFAULT_APPSECRET


def test_json_lines_are_one_object_each_and_redacted() -> None:
    record = logging.LogRecord("server.upstream", logging.ERROR, __file__, 1, "upstream said %s\nsecond line", (f"secret={DEFAULT_APPSECRET}",), None)
    try:
        raise ValueError(f"boom {DEFAULT_APPSECRET}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactFilter(Redactor([DEFAULT_APPSECRET])).filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["logger"] == "server.upstream"
    assert obj["message"] == "upstream said secret=***\nsecond line"
    assert "ValueError: boom ***" in obj["exception"]
    assert obj["time"].endswith("+00:00")
    assert DEFAULT_APPSECRET not in line


def test_an_unopenable_log_file_is_a_config_error(tmp_path) -> None:
    from server.config import ConfigError

    with pytest.raises(ConfigError, match=r"^logging.file: cannot open .*/nodir/x.log \(No such file or directory\); create its directory"):
        build_handler(LoggingConfig(file=str(tmp_path / "nodir" / "x.log")))


@pytest.mark.gen_test(timeout=60)
async def test_json_log_file_is_reopened_after_logrotate_moves_it(token_servers, sandbox_url, redis_url, tmp_path):
    log_file = tmp_path / "server.log"
    cfg = proc_config(redis_url, sandbox_url, logging={"format": "json", "file": str(log_file)})
    srv = token_servers(cfg, "ts").start()
    await srv.wait_ready()
    token = await srv.token()
    # What logrotate's default (create) mode does: rename, then a new file appears on the next write.
    os.rename(log_file, tmp_path / "server.log.1")
    await srv.token()
    status, _ = await srv.get("/wechat/token", type="nope")
    assert status == 404
    assert await srv.stop() == 0
    before = (tmp_path / "server.log.1").read_text().splitlines()
    after = log_file.read_text().splitlines()
    assert any("listening on" in json.loads(line)["message"] for line in before)
    messages = [json.loads(line)["message"] for line in after]  # every line one JSON object
    assert any(m.startswith("404 GET /wechat/token ") for m in messages), messages
    assert any(m == "stopped" for m in messages)
    for text in before + after:
        assert PROC_SECRET not in text and DEFAULT_APPSECRET not in text and token not in text
    assert "listening on" not in srv.log()  # stderr has nothing once the file is open


def test_check_does_not_create_the_log_file(tmp_path) -> None:
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "c.yaml"
    log_file = tmp_path / "server.log"
    path.write_text(f"server: {{secret: {PROC_SECRET}}}\nsources: {{t: {{url: 'http://x/a'}}}}\nlogging: {{file: '{log_file}'}}\n")
    path.chmod(0o600)
    result = subprocess.run([sys.executable, "token_server.py", "--check", "-c", str(path)], cwd=root, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not log_file.exists()  # created by root at --check, the service user could not write it later
