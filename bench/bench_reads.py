#!/usr/bin/env python3
"""Reads: how close `/wechat/token` comes to the floor Tornado allows, and what more cores give.

Starts one redis-server, the WeChat sandbox and these, then measures them in one run, in
alternating rounds (so a load spike hits every side), with ``wrk -t1`` (Debian's ``wrk``):

- **bare**: a bare Tornado handler returning the same JSON (``{"access_token": ..., "expires_in": ...}``),
  encoded per request: the floor this framework allows (bench/bare_handler.py);
- **token**: ``GET /wechat/token?type=access_token`` with the secret in the header, one process
  on asyncio's own loop (``--loop asyncio``);
- **token x2**: the same with ``--workers 2``;
- **uvloop**, **uvloop x2**: the same two on uvloop (``--loop uvloop``, when it is installed);
- **face**: the face's ``GET /cgi-bin/token?grant_type=client_credential&appid=...&secret=...``;
- **proxy**: ``GET /cgi-bin/getcallbackip?access_token=T`` through the API proxy to the sandbox;
- **redis GET**: ``redis-benchmark GET access_token`` on the plain key (direct readers).

It prints requests/s, p50/p99 (medians over the rounds), the ratio to the bare handler and
the peak RSS (VmHWM) of each server process.  Not a test: nothing asserts.

    python bench/bench_reads.py
    python bench/bench_reads.py --seconds 5 --rounds 3 --connections 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

from helpers_procs import SandboxProc, TokenServerProc, children_running, free_port, get_json, proc_config  # noqa: E402
from wrklib import Run, redis_benchmark, run_bench, wrk  # noqa: E402

from server.embedded_redis import EmbeddedRedis  # noqa: E402
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main_async(args: argparse.Namespace, workdir: str) -> int:
    redis = EmbeddedRedis(os.path.join(workdir, "redis"), persistent=False)
    sandbox = SandboxProc(workdir)
    servers: list[TokenServerProc] = []
    bare: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        sandbox_url = sandbox.start()
        account = {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "api_base": sandbox_url}
        cfg = proc_config(redis.url, sandbox_url, sources={}, accounts={"main": account}, face=True,
                          refresh={"interval": 60})
        def server(name: str, *extra: str) -> TokenServerProc:
            proc = TokenServerProc(cfg, workdir, name)
            proc.extra_args = list(extra)
            servers.append(proc.start())
            return proc

        one = server("one", "--loop", "asyncio")
        two = server("two", "--loop", "asyncio", "--workers", "2")
        uv = uv2 = None
        if args.uvloop:  # the same servers on uvloop, to measure whether it helps
            uv = server("uvloop", "--loop", "uvloop")
            uv2 = server("uvloop2", "--loop", "uvloop", "--workers", "2")
        for proc in servers:
            await proc.wait_ready()
        token = await one.token()
        status, body = await one.get("/wechat/token", type="access_token")
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, os.path.join(HERE, "bare_handler.py"), str(bare_port), token, str(body["expires_in"])],
                                stdin=subprocess.DEVNULL)
        while (await get_json(f"http://127.0.0.1:{bare_port}/"))[0] != 200:
            await asyncio.sleep(0.05)
        secret = {"X-Token-Secret": one.secret}
        targets = {
            "bare": (f"http://127.0.0.1:{bare_port}/", {}),
            "token": (f"{one.base}/wechat/token?type=access_token", secret),
            "token x2": (f"{two.base}/wechat/token?type=access_token", secret),
            **({"uvloop": (f"{uv.base}/wechat/token?type=access_token", secret)} if uv is not None else {}),
            **({"uvloop x2": (f"{uv2.base}/wechat/token?type=access_token", secret)} if uv2 is not None else {}),
            "face": (f"{one.base}/cgi-bin/token?grant_type=client_credential&appid={DEFAULT_APPID}&secret={DEFAULT_APPSECRET}", {}),
            "proxy": (f"{one.base}/cgi-bin/getcallbackip?access_token={token}", {}),
        }
        for url, headers in targets.values():  # warm up, and check that every side answers 200
            run = wrk(url, 1, args.connections, headers)
            assert run.errors == 0, f"{url}: {run.errors} errors"
        runs: dict[str, list[Run]] = {name: [] for name in [*targets, "redis GET"]}
        for _ in range(args.rounds):
            for name, (url, headers) in targets.items():
                runs[name].append(wrk(url, args.seconds, args.connections, headers))
            runs["redis GET"].append(redis_benchmark(redis.port, "access_token", 200_000, args.connections))
        rss = {"token": [peak_rss_mb(one.pid)], "token x2": [peak_rss_mb(p) for p in children_running(two.pid, b"token_server.py")],
               "bare": [peak_rss_mb(bare.pid)]}
        rss["face"] = rss["proxy"] = rss["token"]
        if uv is not None and uv2 is not None:
            rss["uvloop"] = [peak_rss_mb(uv.pid)]
            rss["uvloop x2"] = [peak_rss_mb(p) for p in children_running(uv2.pid, b"token_server.py")]
        report(runs, rss, args)
    finally:
        for server in servers:
            await server.stop()
        if bare is not None:
            bare.terminate()
            bare.wait(5)
        sandbox.kill()
        redis.stop()
    return 0


def report(runs: dict[str, list[Run]], rss: dict[str, list[float]], args: argparse.Namespace) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs[name])

    floor = med("bare", "rps")
    print(f"\nwrk -t1 -c{args.connections} -d{args.seconds:g}s (redis-benchmark -c{args.connections}), "
          f"{args.rounds} alternating rounds, medians; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"{'':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x bare':>7} {'errors':>7}  peak RSS MB")
    for name in runs:
        errors = sum(r.errors for r in runs[name])
        memory = " ".join(f"{m:.0f}" for m in rss.get(name, [])) or "-"
        print(f"{name:10} {med(name, 'rps'):9.0f} {med(name, 'p50_ms'):8.2f} {med(name, 'p99_ms'):8.2f} "
              f"{med(name, 'rps') / floor:7.2f} {errors:7d}  {memory}")
    print(f"p99 token / bare: {med('token', 'p99_ms') / med('bare', 'p99_ms'):.2f}; "
          f"token x2 / token: {med('token x2', 'rps') / med('token', 'rps'):.2f}")
    if "uvloop" in runs:
        print(f"uvloop / token: {med('uvloop', 'rps') / med('token', 'rps'):.2f}; "
              f"uvloop x2 / uvloop: {med('uvloop x2', 'rps') / med('uvloop', 'rps'):.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--connections", type=int, default=50, help="connections (default 50)")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="skip the uvloop row (needs pip install uvloop)")
    args = p.parse_args()
    if args.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("uvloop not installed: no uvloop row (pip install uvloop)", file=sys.stderr)
            args.uvloop = False
    return run_bench(main_async, args, "bench-reads-", {"wrk": "wrk", "redis-benchmark": "redis-tools"})


if __name__ == "__main__":
    sys.exit(main())
