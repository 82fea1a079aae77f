#!/usr/bin/env python3
"""Rotation benchmark: upstream calls per rotation and reads without a valid token.

Starts the WeChat sandbox (``python -m server.sandbox``, short-lived tokens), one
redis-server and three ``token_server.py`` processes sharing it, then lets readers
hammer ``GET /wechat/token`` round-robin across the processes while tokens rotate,
transient faults are injected at the sandbox (busy, HTTP 500, a hang longer than
``refresh.timeout``, a garbage body) and one process is restarted.  Every token read is
checked at the sandbox right away (``/sandbox/token_status``: 0 means valid).

    python bench/bench_rotation.py                 # 50 s, 16 readers, 8 s tokens
    python bench/bench_rotation.py --duration 60 --readers 32 --keep

Not a test: it prints a table (see bench/README.md for measured numbers).  A read the
restarting process cannot take is retried on the next process, as nginx's
``proxy_next_upstream`` would, and counted as a connection error, not as a failed read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import redis.asyncio as aioredis  # noqa: E402
from helpers_procs import SandboxProc, TokenServerProc, get_json, proc_config  # noqa: E402
from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from server.embedded_redis import EmbeddedRedis  # noqa: E402

TOKEN_PATH = "/cgi-bin/token"


@dataclass
class Results:
    reads: int = 0
    no_token: int = 0  # 503 or another non-200 answer
    rejected: int = 0  # a token the sandbox says is not valid
    conn_errors: int = 0  # a process not listening (the restart)
    latencies: list[float] = field(default_factory=list)  # seconds, answered reads
    bad: list[str] = field(default_factory=list)  # the first few failures, for the log
    rotations: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, value prefix)
    events: list[str] = field(default_factory=list)
    faults: int = 0  # token calls the chaos schedule made fail


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


async def reader(procs: list[TokenServerProc], sandbox_url: str, client: AsyncHTTPClient, res: Results,
                 stop: asyncio.Event, offset: int, t0: float) -> None:
    i = offset
    while not stop.is_set():
        for _attempt in range(len(procs)):
            proc = procs[i % len(procs)]
            i += 1
            started = time.monotonic()
            status, body = await proc.get("/wechat/token", client=client, timeout=10, type="access_token")
            if status == 599:  # not listening: the process is restarting
                res.conn_errors += 1
                continue
            res.latencies.append(time.monotonic() - started)
            res.reads += 1
            when = time.monotonic() - t0
            if status != 200:
                res.no_token += 1
                if len(res.bad) < 10:
                    res.bad.append(f"t={when:5.1f}s {proc.name}: HTTP {status} {body}")
                break
            token = body["access_token"]
            _, check = await get_json(f"{sandbox_url}/sandbox/token_status?token={token}", client=client)
            if check.get("status") != 0:
                res.rejected += 1
                if len(res.bad) < 10:
                    res.bad.append(f"t={when:5.1f}s {proc.name}: token {token[:8]}... rejected by WeChat ({check.get('status')})")
            break
        else:
            await asyncio.sleep(0.05)  # every process down: do not spin


async def watch_redis(url: str, res: Results, stop: asyncio.Event, t0: float) -> None:
    """Records every value Redis holds under access_token (each new one is a rotation)."""
    r = aioredis.Redis.from_url(url, decode_responses=True)
    last = None
    try:
        while not stop.is_set():
            value = await r.get("access_token")
            if value is not None and value != last:
                res.rotations.append((time.monotonic() - t0, value[:8]))
                last = value
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def inject(sandbox_url: str, res: Results, **fault: Any) -> None:
    status, body = await get_json(f"{sandbox_url}/sandbox/faults", method="POST", body=json.dumps(fault).encode())
    assert status == 200, body
    res.faults += fault.get("times", 1)


async def chaos(procs: list[TokenServerProc], sandbox_url: str, res: Results, t0: float, duration: float) -> None:
    """Faults and a restart, spread over the run."""

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, t0 + fraction * duration - time.monotonic()))

    def note(what: str) -> None:
        res.events.append(f"t={time.monotonic() - t0:5.1f}s {what}")

    await at(0.12)
    await inject(sandbox_url, res, path=TOKEN_PATH, kind="busy", times=2)
    note("fault: next 2 token calls answer errcode -1 (busy)")
    await at(0.28)
    await inject(sandbox_url, res, path=TOKEN_PATH, kind="http_error", status=500, times=2)
    note("fault: next 2 token calls answer HTTP 500")
    await at(0.44)
    victim = procs[1]
    note(f"restart {victim.name}: SIGTERM")
    code = await victim.stop()
    victim.start()
    await victim.wait_ready()
    note(f"restart {victim.name}: exited {code}, serving again")
    await at(0.60)
    await inject(sandbox_url, res, path=TOKEN_PATH, kind="hang", delay=1.5, times=1)
    note("fault: next token call hangs 1.5 s (refresh.timeout is 1 s)")
    await at(0.76)
    await inject(sandbox_url, res, path=TOKEN_PATH, kind="busy", times=1)
    await inject(sandbox_url, res, path=TOKEN_PATH, kind="garbage", times=1)
    note("fault: next token calls answer busy, then a truncated JSON body")


async def run(args: argparse.Namespace, workdir: str) -> int:
    sandbox = SandboxProc(workdir, "--expires-in", str(args.expires_in))
    sandbox_url = sandbox.start()
    redis_server = EmbeddedRedis(os.path.join(workdir, "redis"), persistent=False)
    redis_server.start()
    procs: list[TokenServerProc] = []
    try:
        cfg = proc_config(
            redis_server.url, sandbox_url,
            refresh={"interval": 0.5, "ahead": args.expires_in / 2, "max_ttl": 7000, "timeout": 1, "backoff_max": 2},
        )
        procs = [TokenServerProc(cfg, workdir, f"ts{i}") for i in range(3)]
        for p in procs:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs))
        _, before = await get_json(f"{sandbox_url}/sandbox/stats")

        res = Results()
        stop = asyncio.Event()
        client = AsyncHTTPClient(force_instance=True, max_clients=2 * args.readers + 8)
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(reader(procs, sandbox_url, client, res, stop, i, t0)) for i in range(args.readers)]
        tasks.append(asyncio.ensure_future(watch_redis(redis_server.url, res, stop, t0)))
        await chaos(procs, sandbox_url, res, t0, args.duration)
        await asyncio.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        client.close()
        _, after = await get_json(f"{sandbox_url}/sandbox/stats")
        codes = await asyncio.gather(*(p.stop() for p in procs))
    finally:
        for p in procs:
            p.kill()
        redis_server.stop()
        sandbox.kill()

    calls = after["calls"].get(TOKEN_PATH, 0) - before["calls"].get(TOKEN_PATH, 0)
    issued = after["issued"].get(TOKEN_PATH, 0) - before["issued"].get(TOKEN_PATH, 0)
    rotations = max(0, len(res.rotations) - 1)  # the first value was there before the run
    per = (lambda n: f"{n / rotations:.2f}") if rotations else (lambda n: "-")
    rows = [
        ("run", f"{elapsed:.1f} s, 3 processes, {args.readers} readers, tokens live {args.expires_in} s"),
        ("rotations (new values in Redis)", f"{rotations}"),
        ("upstream /cgi-bin/token calls", f"{calls}  ({per(calls)} per rotation, the {res.faults} faulted ones included)"),
        ("calls not faulted", f"{calls - res.faults}  ({per(calls - res.faults)} per rotation)"),
        ("tokens WeChat issued", f"{issued}  ({per(issued)} per rotation)"),
        ("reads", f"{res.reads}  ({res.reads / elapsed:.0f}/s)"),
        ("reads with no valid token", f"{res.no_token + res.rejected}  (non-200: {res.no_token}, rejected token: {res.rejected})"),
        ("connection errors (restart)", f"{res.conn_errors}  (retried on the next process)"),
        ("read latency p50 / p99", f"{percentile(res.latencies, 0.5) * 1000:.1f} ms / {percentile(res.latencies, 0.99) * 1000:.1f} ms"),
        ("exit codes", " ".join(str(c) for c in codes)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\nevents:")
    for e in res.events:
        print("  " + e)
    if res.bad:
        print("\nfirst failed reads:")
        for b in res.bad:
            print("  " + b)
    if args.keep:
        print(f"\nlogs kept in {workdir}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=50.0, help="seconds of reading (default 50)")
    p.add_argument("--readers", type=int, default=16, help="concurrent readers (default 16)")
    p.add_argument("--expires-in", type=int, default=8, help="token life at the sandbox, seconds (default 8)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-rotation-")
    try:
        return asyncio.run(run(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
