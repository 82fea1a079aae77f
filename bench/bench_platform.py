#!/usr/bin/env python3
"""Third-party platform benchmark: N authorizers kept fresh by several instances.

Starts one redis-server, the sandbox (``python -m server.sandbox``, tokens of ``--life``
seconds, a superseded token valid ``--overlap`` seconds more) and ``--instances``
``token_server.py`` processes sharing Redis, all configured with the sandbox's platform.  Then:

1. a verify ticket is pushed (encrypted, as WeChat does) and the component token fetched;
2. ``--authorizers`` accounts authorise the platform: the sandbox makes the codes, the
   operator's ``POST /wechat/component/authorizers`` exchanges them, spread over the instances;
3. for ``--duration`` seconds the instances keep every token fresh while ``--readers`` readers
   ask ``/wechat/token?type=access_token&appid=...`` (round-robin over the instances) and check
   each token at the sandbox right away (dead: not valid there);
4. every instance is stopped and started again with the tokens in Redis: how long until all
   are ready, and the calls in the seconds after (only the authorizers that fall due meanwhile
   should be refreshed).

Printed: upstream calls per rotation (calls to api_authorizer_token / tokens stored), the
shortest time between two calls for one authorizer (a double refresh shows as ~0), dead reads,
peak RSS per instance, CPU per 1,000 rotations, the most refreshes in flight at once, and the
capacity this suggests.  Not a test: nothing asserts.

    python bench/bench_platform.py                      # 10,000 authorizers, 3 instances
    python bench/bench_platform.py --authorizers 2000 --duration 60 --instances 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from helpers_procs import SandboxProc, TokenServerProc, cpu_seconds, get_json, proc_config  # noqa: E402
from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from server.embedded_redis import EmbeddedRedis  # noqa: E402
from server.sandbox.component import (  # noqa: E402
    DEFAULT_AES_KEY,
    DEFAULT_COMPONENT_APPID,
    DEFAULT_COMPONENT_SECRET,
    DEFAULT_MSG_TOKEN,
)

AUTHORIZER_TOKEN_PATH = "/cgi-bin/component/api_authorizer_token"
COMPONENT_TOKEN_PATH = "/cgi-bin/component/api_component_token"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.client = AsyncHTTPClient(force_instance=True, max_clients=200)
        self.servers: list[TokenServerProc] = []
        self.sandbox = SandboxProc(workdir, "--expires-in", str(args.life), "--overlap", str(args.overlap))
        self.redis = EmbeddedRedis(os.path.join(workdir, "redis"), persistent=True)
        self.reads = {"ok": 0, "dead": 0, "error": 0}
        self.peak_claimed = 0

    async def sandbox_json(self, path: str, body: Any = None) -> Any:
        status, answer = await get_json(self.sandbox.url + path, client=self.client, timeout=60,
                                        method="POST" if body is not None else "GET",
                                        body=json.dumps(body).encode() if body is not None else None)
        assert status == 200, (path, status, answer)
        return answer

    def config(self, redis_url: str) -> dict[str, Any]:
        a = self.args
        return proc_config(
            redis_url, self.sandbox.url,
            refresh={"interval": 1, "ahead": a.life / 4, "max_ttl": 7000, "timeout": 5, "overlap": a.overlap},
            server={"shutdown_timeout": 5},
            accounts={"myplatform": {"kind": "component", "appid": DEFAULT_COMPONENT_APPID, "secret": DEFAULT_COMPONENT_SECRET,
                                     "msg_token": DEFAULT_MSG_TOKEN, "aes_key": DEFAULT_AES_KEY, "api_base": self.sandbox.url}},
            platform={"tick": 0.5, "batch": a.batch, "concurrency": a.concurrency, "lease": 30},
        )

    async def start_servers(self, ready: bool = True) -> float:
        """Start every instance; seconds until all answer /readyz 200 (``ready``) or /healthz."""
        started = time.monotonic()
        for s in self.servers:
            s.start()
        for s in self.servers:
            await s.wait_ready(60)
        while ready:  # ready: /readyz says so on every instance
            states = [await get_json(f"{s.base}/readyz", client=self.client, timeout=5) for s in self.servers]
            if all(st == 200 for st, _ in states):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    async def status(self, server: TokenServerProc) -> dict[str, Any]:
        st, body = await get_json(f"{server.base}/wechat/component/status?count=1", client=self.client, timeout=30,
                                  headers={"X-Token-Secret": server.secret})
        assert st == 200, body
        return body  # type: ignore[no-any-return]

    async def authorise(self, appids: list[str]) -> None:
        codes: dict[str, str] = {}
        for i in range(0, len(appids), 1000):
            codes.update((await self.sandbox_json("/sandbox/component/authorize", {"authorizers": appids[i:i + 1000]}))["codes"])
        queue = list(codes.values())
        done = 0

        async def worker(k: int) -> None:
            nonlocal done
            while queue:
                code = queue.pop()
                server = self.servers[k % len(self.servers)]
                st, body = await get_json(f"{server.base}/wechat/component/authorizers", client=self.client, timeout=30, method="POST",
                                          headers={"X-Token-Secret": server.secret}, body=json.dumps({"authorization_code": code}).encode())
                assert st == 200, body
                done += 1

        await asyncio.gather(*(worker(k) for k in range(20)))

    async def reader(self, appids: list[str], until: float, k: int) -> None:
        i = k
        while time.monotonic() < until:
            server = self.servers[i % len(self.servers)]
            i += 1
            st, body = await get_json(f"{server.base}/wechat/token?type=access_token&appid={random.choice(appids)}", client=self.client,
                                      timeout=10, headers={"X-Token-Secret": server.secret})
            if st != 200:
                self.reads["error"] += 1
                continue
            st, check = await get_json(f"{self.sandbox.url}/sandbox/token_status?token={body['access_token']}", client=self.client, timeout=10)
            self.reads["ok" if st == 200 and check["status"] == 0 else "dead"] += 1
            await asyncio.sleep(self.args.read_interval)

    async def watch(self, until: float, samples: dict[str, list[float]]) -> None:
        while time.monotonic() < until:
            for s in self.servers:
                rss, hwm = rss_kib(s.pid)
                samples.setdefault(s.name, []).append(hwm / 1024)
            try:
                self.peak_claimed = max(self.peak_claimed, (await self.status(self.servers[0]))["claimed"])
            except AssertionError:
                pass
            await asyncio.sleep(1)

    async def run(self) -> None:
        a = self.args
        redis_url = self.redis.start()
        self.sandbox.start()
        cfg = self.config(redis_url)
        self.servers = [TokenServerProc(cfg, self.workdir, f"ts{i}") for i in range(a.instances)]
        await self.start_servers(ready=False)  # not ready before the first verify ticket
        push = await self.sandbox_json("/sandbox/component/push", {"url": f"{self.servers[0].base}/wechat/component/events",
                                                                   "info_type": "component_verify_ticket"})
        print(f"verify ticket pushed: {push}")
        while (await self.sandbox_json("/sandbox/stats"))["calls"].get(COMPONENT_TOKEN_PATH, 0) < 1:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # every instance reads the component token
        appids = [f"wxbench{i:010d}" for i in range(a.authorizers)]
        t0 = time.monotonic()
        await self.authorise(appids)
        print(f"{a.authorizers} authorizers authorised in {time.monotonic() - t0:.1f}s")

        # Calls and rotations read at the same moment (concurrently): the two counts cover one window.
        first, *statuses = await asyncio.gather(self.sandbox_json("/sandbox/stats"), *(self.status(s) for s in self.servers))
        before_calls = first["calls"].get(AUTHORIZER_TOKEN_PATH, 0)
        comp_before = first["calls"].get(COMPONENT_TOKEN_PATH, 0)
        before_rot = [st["this_instance"]["rotations"] for st in statuses]
        before_cpu = [cpu_seconds(s.pid) for s in self.servers]
        until = time.monotonic() + a.duration
        samples: dict[str, list[float]] = {}
        await asyncio.gather(self.watch(until, samples), *(self.reader(appids, until, k) for k in range(a.readers)))
        stats, *status = await asyncio.gather(self.sandbox_json("/sandbox/stats"), *(self.status(s) for s in self.servers))
        calls = stats["calls"].get(AUTHORIZER_TOKEN_PATH, 0) - before_calls
        rotations = [st["this_instance"]["rotations"] - b for st, b in zip(status, before_rot, strict=True)]
        cpu = [cpu_seconds(s.pid) - c for s, c in zip(self.servers, before_cpu, strict=True)]
        comp = await self.sandbox_json("/sandbox/component/stats")
        total_rot = sum(rotations)
        print()
        print(f"authorizers {a.authorizers}, instances {a.instances}, token life {a.life}s, overlap {a.overlap}s, measured {a.duration}s")
        print(f"  api_authorizer_token calls      {calls}")
        print(f"  tokens stored (rotations)       {total_rot}  per instance {rotations}")
        print(f"  calls per rotation              {calls / total_rot:.3f}" if total_rot else "  no rotation")
        print(f"  shortest gap, one authorizer    {comp['min_gap']:.1f}s (a double refresh would be ~0)" if comp["min_gap"] is not None else "")
        print(f"  component token calls           {stats['calls'].get(COMPONENT_TOKEN_PATH, 0) - comp_before} (token life {a.life}s)")
        print(f"  reads ok / dead / errors        {self.reads['ok']} / {self.reads['dead']} / {self.reads['error']}")
        print(f"  peak RSS per instance (MiB)     {[round(max(v), 1) for v in samples.values()]}")
        print(f"  CPU seconds per instance        {[round(c, 1) for c in cpu]}")
        if total_rot:
            per_k = sum(cpu) / total_rot * 1000
            print(f"  CPU per 1,000 rotations         {per_k:.2f}s")
            print(f"  refresh rate needed             {a.authorizers / (a.life * 0.8):.1f}/s for {a.authorizers} authorizers of {a.life}s")
            print(f"  one instance, one core, 7200s tokens: about {int(1000 / per_k * 6300):,} authorizers by CPU alone")
        print(f"  most refreshes in flight        {self.peak_claimed} claimed at once (all instances); per instance peak "
              f"{[st['this_instance']['peak_in_flight'] for st in status]}")

        # restart every instance with the tokens in Redis
        for s in self.servers:
            s.send()
        for s in self.servers:
            await s.wait_exit(30)
        stopped_calls = (await self.sandbox_json("/sandbox/stats"))["calls"]
        ready_in = await self.start_servers()
        await asyncio.sleep(5)
        after = (await self.sandbox_json("/sandbox/stats"))["calls"]
        due_rate = calls / a.duration
        print(f"  restart of all instances: ready in {ready_in:.1f}s; calls in the next {5 + ready_in:.0f}s: "
              f"{after.get(AUTHORIZER_TOKEN_PATH, 0) - stopped_calls.get(AUTHORIZER_TOKEN_PATH, 0)} authorizer "
              f"(steady rate {due_rate:.1f}/s: the ones falling due), "
              f"{after.get(COMPONENT_TOKEN_PATH, 0) - stopped_calls.get(COMPONENT_TOKEN_PATH, 0)} component, "
              f"{after.get('/cgi-bin/component/api_query_auth', 0) - stopped_calls.get('/cgi-bin/component/api_query_auth', 0)} query_auth")

    async def close(self) -> None:
        for s in self.servers:
            s.kill()
        self.sandbox.kill()
        self.redis.stop()
        self.client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authorizers", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--life", type=int, default=120, help="token life at the sandbox, seconds")
    parser.add_argument("--overlap", type=float, default=5.0, help="seconds a superseded token stays valid")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds measured")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--read-interval", type=float, default=0.02, help="seconds each reader waits between reads")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-platform-")
    bench = Bench(args, workdir)
    try:
        await bench.run()
    finally:
        await bench.close()
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
