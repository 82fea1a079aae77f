#!/usr/bin/env python3
"""Proxy overhead: the same WeChat API call straight to the sandbox, and through this server.

Starts the WeChat sandbox (``python -m server.sandbox``), one redis-server and one
``token_server.py`` whose account points its ``api_base`` at the sandbox, takes the token the
server holds, then runs ``wrk`` (Debian's ``wrk``; 1 thread, 10 connections by default)
against ``GET /cgi-bin/getcallbackip?access_token=T``:

- **direct**: at the sandbox, as an SDK would call WeChat;
- **through**: at the server, which checks that it issued T, puts its current token in the
  query, forwards the call to the sandbox and passes the answer back.

Rounds alternate direct and through (so a load spike hits both), and the table shows each
side's median over the rounds and the ratio through / direct.  Not a test: nothing asserts.

Two WeChats are measured (``--latencies``): one that answers at once (the sandbox on the same
2 cores: the ratio is then the CPU the proxy costs next to the CPU of the upstream itself), and
one that takes 20 ms to answer, as WeChat's API does seen from a server in China (a sandbox
``hang`` fault on the path, which delays without using CPU).

    python bench/bench_proxy.py
    python bench/bench_proxy.py --seconds 10 --rounds 5 --connections 10 --latencies 0,0.05
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

from helpers_procs import SandboxProc, TokenServerProc, get_json, proc_config  # noqa: E402
from wrklib import Run, run_bench, wrk  # noqa: E402

from server.embedded_redis import EmbeddedRedis  # noqa: E402
from server.sandbox import DEFAULT_APPID, DEFAULT_APPSECRET  # noqa: E402

PATH = "/cgi-bin/getcallbackip"


async def main_async(args: argparse.Namespace, workdir: str) -> int:
    redis = EmbeddedRedis(os.path.join(workdir, "redis"), persistent=False)
    sandbox = SandboxProc(workdir)
    server: TokenServerProc | None = None
    try:
        redis.start()
        sandbox_url = sandbox.start()
        account = {"appid": DEFAULT_APPID, "secret": DEFAULT_APPSECRET, "token": "classic", "api_base": sandbox_url}
        cfg = proc_config(redis.url, sandbox_url, sources={}, accounts={"main": account})
        server = TokenServerProc(cfg, workdir, "ts").start()
        await server.wait_ready()
        token = await server.token()
        direct, through = f"{sandbox_url}{PATH}?access_token={token}", f"{server.base}{PATH}?access_token={token}"
        for latency in args.latencies:
            await get_json(f"{sandbox_url}/sandbox/faults", method="DELETE")
            if latency > 0:
                fault = {"path": PATH, "kind": "hang", "times": None, "delay": latency}
                await get_json(f"{sandbox_url}/sandbox/faults", method="POST", body=json.dumps(fault).encode())
            for url in (direct, through):  # warm up, and check that both answer
                wrk(url, 1, args.connections)
            runs: dict[str, list[Run]] = {"direct": [], "through": []}
            for _ in range(args.rounds):
                runs["direct"].append(wrk(direct, args.seconds, args.connections))
                runs["through"].append(wrk(through, args.seconds, args.connections))
            report(runs, latency, args)
    finally:
        if server is not None:
            await server.stop()
        sandbox.kill()
        redis.stop()
    return 0


def report(runs: dict[str, list[Run]], latency: float, args: argparse.Namespace) -> None:
    def med(side: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs[side])

    print(f"\nGET {PATH}, WeChat answering after {latency * 1000:.0f} ms: wrk -t1 -c{args.connections} -d{args.seconds:g}s, "
          f"{args.rounds} alternating rounds, medians")
    print(f"{'':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for side in ("direct", "through"):
        errors = sum(r.errors for r in runs[side])
        print(f"{side:10} {med(side, 'rps'):9.0f} {med(side, 'p50_ms'):8.2f} {med(side, 'p99_ms'):8.2f} {errors:7d}")
    print(f"ratio through/direct: {med('through', 'rps') / med('direct', 'rps'):.2f}")
    print("rounds (req/s): " + "; ".join(f"{d.rps:.0f} / {t.rps:.0f}" for d, t in zip(runs["direct"], runs["through"], strict=True)))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--connections", type=int, default=10, help="wrk connections (default 10)")
    p.add_argument("--latencies", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.02],
                   help="seconds WeChat takes to answer, comma-separated (default 0,0.02)")
    args = p.parse_args()
    return run_bench(main_async, args, "bench-proxy-", {"wrk": "wrk"})


if __name__ == "__main__":
    sys.exit(main())
