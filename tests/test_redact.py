"""The log filter of server/redact.py: the Redis password given in ``redis.url``'s query."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
import yaml

from server.config_file import parse_config
from server.redact import MASK, config_secrets, install

PASSWORD = "Qu3ry-Passw0rd+x/y"  # what Redis is told (requirepass), and what redis-py sends
SPELLED = "Qu3ry-Passw0rd%2Bx%2Fy"  # the same password as written in the URL's query


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("query", [f"password={SPELLED}", f"db=0&password={SPELLED}", f"socket_timeout=2&Password={SPELLED}"])
def test_a_redis_password_in_the_url_query_never_reaches_a_log_line(query: str) -> None:
    """Mutant: config_secrets without the ``?password=`` of redis.url."""
    raw = {
        "server": {"secret": "a-request-secret-0123456789abcdef"},
        "redis": {"url": f"redis://127.0.0.1:6379/0?{query}"},
        "sources": {"access_token": {"url": "http://127.0.0.1:1/cgi-bin/token"}},
    }
    cfg = parse_config(yaml.safe_dump(raw), env={}, source="test config")
    if query.startswith("password="):  # what redis-py itself makes of the URL
        assert redis.connection.parse_url(cfg.redis.url or "")["password"] == PASSWORD
    assert PASSWORD in config_secrets(cfg)
    logger = logging.getLogger("tests.redact.redis_url")
    logger.propagate = False
    kept = Kept()
    logger.addHandler(kept)
    try:
        install(cfg, logger)
        # A library error repeating the password, decoded or as spelled (outside a URL,
        # whose query the filter masks anyway).
        logger.error("AUTH failed for password %s", PASSWORD)
        logger.error("bad connection argument: password=%s", SPELLED)
    finally:
        logger.removeHandler(kept)
    assert len(kept.lines) == 2
    for line in kept.lines:
        assert MASK in line and "Qu3ry-Passw0rd" not in line, line


def test_other_query_arguments_are_not_taken_for_secrets() -> None:
    raw: dict[str, Any] = {
        "server": {"secret": "a-request-secret-0123456789abcdef"},
        "redis": {"url": "redis://127.0.0.1:6379/0?socket_timeout=2.5&client_name=token-server-1"},
        "sources": {"access_token": {"url": "http://127.0.0.1:1/cgi-bin/token"}},
    }
    cfg = parse_config(yaml.safe_dump(raw), env={}, source="test config")
    assert config_secrets(cfg) == ["a-request-secret-0123456789abcdef"]
