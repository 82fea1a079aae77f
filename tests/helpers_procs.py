"""Real processes for the multi-process tests and the benchmark.

- :class:`TokenServerProc`: ``python token_server.py -c <yaml> --port N``, its stderr
  (the server's whole log) kept in a file so a test can read it afterwards.
- :class:`SandboxProc`: ``python -m server.sandbox``, driven through its ``/sandbox/*``
  control API (the benchmark uses it so the readers do not share a loop with WeChat).
- :class:`SentinelProc`: ``redis-server <conf> --sentinel`` watching a primary.
- :func:`get_json`: one real HTTP request from the running loop; :func:`wait_until`.
- :func:`proc_config` and the ``token_servers`` fixture (import it into a test module):
  processes started by a test are stopped after it, and their logs checked for secrets.

Every wait polls with a deadline and never blocks the event loop: the tests serve the
sandbox in-process on that same loop, so a blocking wait would starve the servers'
upstream calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server.embedded_redis import find_redis_server, free_port
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def get_json(url: str, *, headers: dict[str, str] | None = None, timeout: float = 10.0,
                   client: AsyncHTTPClient | None = None, method: str = "GET",
                   body: bytes | None = None) -> tuple[int, Any]:
    """``(status, decoded JSON or text)``; status 599 when there was no answer at all."""
    own = client is None
    client = client or AsyncHTTPClient(force_instance=True)
    try:
        req = HTTPRequest(url, method=method, body=body, headers=headers or {}, connect_timeout=timeout,
                          request_timeout=timeout, allow_nonstandard_methods=True)
        try:
            resp = await client.fetch(req, raise_error=False)
        except (HTTPClientError, OSError) as e:
            return 599, str(e)
        text = resp.body.decode("utf-8", "replace") if resp.body else ""
        try:
            return resp.code, json.loads(text)
        except ValueError:
            return resp.code, text
    finally:
        if own:
            client.close()


async def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate()`` (sync or async) until truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def write_config(path: str, cfg: dict[str, Any]) -> str:
    """Write ``cfg`` as YAML, readable by the owner only (the server warns otherwise)."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


class TokenServerProc:
    """One ``token_server.py`` process on 127.0.0.1:``port`` with config ``cfg`` (a dict).

    ``log_path`` collects its stdout and stderr; ``secret`` is the request secret the
    helpers send as ``X-Token-Secret``.
    """

    def __init__(self, cfg: dict[str, Any], workdir: str, name: str, port: int | None = None) -> None:
        self.cfg = cfg
        self.name = name
        self.port = port or free_port()
        self.secret = cfg["server"]["secret"]
        self.config_path = write_config(os.path.join(workdir, f"{name}.yaml"), cfg)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.extra_env: dict[str, str] = {}  # e.g. libfaketime's, for a process with a clock of its own
        self.extra_args: list[str] = []  # e.g. ["--workers", "2"]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> TokenServerProc:
        """Launch the process (returns at once; see ``wait_ready``).  A restart appends to the log."""
        self.starts += 1
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("LOG_LEVEL", None)
        env.update(self.extra_env)
        try:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "token_server.py"), "-c", self.config_path, "--port", str(self.port), *self.extra_args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until ``/healthz`` answers 200 (the first refresh pass is done by then)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.process.returncode if self.process else None} "
                                     f"before it was ready:\n{self.log_tail()}")
            status, _ = await get_json(f"{self.base}/healthz", timeout=1.0)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout:g}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def get(self, path: str, timeout: float = 10.0, client: AsyncHTTPClient | None = None,
                  **params: str) -> tuple[int, Any]:
        """An authenticated GET of ``path`` with ``params`` as the query."""
        from urllib.parse import urlencode

        qs = urlencode(params)
        return await get_json(f"{self.base}{path}" + (f"?{qs}" if qs else ""), headers={"X-Token-Secret": self.secret},
                              timeout=timeout, client=client)

    async def token(self, name: str = "access_token") -> str:
        """The value this process serves for ``name`` (AssertionError unless 200)."""
        status, body = await self.get("/wechat/token", type=name)
        assert status == 200, f"{self.name}: GET /wechat/token?type={name} -> {status} {body}"
        field = "ticket" if "ticket" in body else "access_token"
        return str(body[field])

    def send(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code; AssertionError (and a kill) when the process outlives ``timeout`` s."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} still running {timeout:g}s after the signal:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.send(sig)
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the process and its children (an embedded redis-server would outlive it)."""
        if self.alive():
            assert self.process is not None
            children = child_pids(self.process.pid)
            self.process.kill()
            self.process.wait(5)
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def pids_with_cwd(path: str) -> list[int]:
    """Processes whose working directory is ``path`` (redis-server chdirs to its --dir)."""
    path = os.path.realpath(path)
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == path and pid_running(int(entry)):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def leaked(text: str, values: set[str]) -> list[str]:
    """Lines of ``text`` that contain any of ``values`` (secrets, whole tokens)."""
    values = {v for v in values if v}
    return [line for line in text.splitlines() if any(v in line for v in values)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_running(pid: int, program: bytes) -> list[int]:
    """Direct children of ``pid`` whose command line holds ``program`` (b"redis-server")."""
    found = []
    for child in child_pids(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                if program in fh.read():
                    found.append(child)
        except OSError:
            pass
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SandboxProc:
    """``python -m server.sandbox`` on a free port; ``url`` once started."""

    def __init__(self, workdir: str, *extra: str) -> None:
        self.extra = list(extra)
        self.log_path = os.path.join(workdir, "sandbox.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "server.sandbox", "--port", "0", *self.extra],
                                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        finally:
            log.close()
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode().strip()
            if line.startswith("SANDBOX_URL="):
                self.url = line.split("=", 1)[1]
                return self.url
            if not line and self.process.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"sandbox did not start; see {self.log_path}")

    def kill(self) -> None:
        stop_process(self.process)


class SentinelProc:
    """One ``redis-server --sentinel`` monitoring ``127.0.0.1:master_port`` as ``service``."""

    def __init__(self, workdir: str, master_port: int, service: str = "mymaster", *,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.port = free_port()
        self.service = service
        os.makedirs(workdir, exist_ok=True)
        self.conf = os.path.join(workdir, "sentinel.conf")  # sentinel rewrites it: it must be writable
        with open(self.conf, "w") as fh:
            fh.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f"dir {workdir}\n"
                f"logfile {os.path.join(workdir, 'sentinel.log')}\n"
                f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen([find_redis_server(), self.conf, "--sentinel"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server --sentinel exited with {self.process.returncode}: {err.strip()}")
            try:
                self.client().ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"sentinel did not answer on port {self.port} within {timeout:g}s")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=1)

    def master_port(self) -> int:
        _host, port = self.client().sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def stop(self) -> None:
        stop_process(self.process)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()


# --- config and a fixture owning the processes --------------------------------------------

PROC_SECRET = "proc-request-secret-0123456789abcdef"


def sandbox_sources(sandbox_url: str) -> dict[str, Any]:
    """The two sources every test config uses: access_token and its jsapi ticket from the sandbox."""
    return {
        "access_token": {
            "url": f"{sandbox_url}/cgi-bin/token",
            "args": {"grant_type": "client_credential", "appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET},
        },
        "ticket": {
            "url": f"{sandbox_url}/cgi-bin/ticket/getticket",
            "args": {"type": "jsapi", "access_token": "<<access_token>>"},
        },
    }


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (``sources`` is replaced whole)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "sources" else v
    return out


def proc_config(redis_url: str | None, sandbox_url: str, **sections: Any) -> dict[str, Any]:
    """A token_server.py config: access_token and its jsapi ticket from the sandbox."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 12123, "secret": PROC_SECRET, "shutdown_timeout": 5},
        "redis": {"url": redis_url} if redis_url else {},
        "refresh": {"interval": 0.5, "ahead": 600, "max_ttl": 7000, "timeout": 3},
        "sources": sandbox_sources(sandbox_url),
    }
    return merge(base, sections)


@pytest.fixture
def token_servers(tmp_path: Any, io_loop: Any, sandbox: Any) -> Any:
    """``token_servers(cfg, name)`` -> a TokenServerProc (not started yet).

    After the test: every process still running gets SIGTERM (the loop keeps serving the
    in-process sandbox meanwhile), then SIGKILL; then every process's log is checked for
    the request secret, the appsecret and every whole token or ticket the sandbox issued.
    """
    procs: list[TokenServerProc] = []

    def make(cfg: dict[str, Any], name: str | None = None, port: int | None = None) -> TokenServerProc:
        proc = TokenServerProc(cfg, str(tmp_path), name or f"ts{len(procs)}", port)
        procs.append(proc)
        return proc

    yield make

    async def stop_all() -> None:
        for p in procs:
            p.send(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    if any(p.alive() for p in procs):
        io_loop.run_sync(stop_all, timeout=10)
    for p in procs:
        p.kill()
    values = {PROC_SECRET, DEFAULT_APPSECRET, *sandbox.issued_values()}
    for p in procs:
        bad = leaked(p.log(), values)
        assert not bad, f"{p.name}'s log holds a secret or a whole token in {len(bad)} line(s), first: {bad[0][:160]!r}"
