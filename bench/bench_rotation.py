#!/usr/bin/env python3
"""Rotation benchmark: upstream calls per rotation and reads that got a dead token.

Each scenario starts its own WeChat sandbox (``python -m server.sandbox``, 8-second
tokens), one redis-server and three ``token_server.py`` processes sharing it, then lets
readers hammer ``GET /wechat/token`` round-robin across the processes while tokens rotate
and the scenario's schedule breaks things.  Every token read is checked at the sandbox
right away (``/sandbox/token_status``: 0 means valid; anything else is a dead token).

Scenarios (``--scenario NAME``; the default runs them all, about two and a half minutes):

- ``faults``: busy answers, HTTP 500s, a process restart, a hung call, a garbage body.
- ``slow``: WeChat slower than ``refresh.timeout`` on the classic endpoint for a while.
- ``redis-empty``: redis-server restarted empty, one instance restarted right after.
- ``redis-rollback``: redis-server restarted from an older RDB dump, with and without a
  fetch in the air.

    python bench/bench_rotation.py
    python bench/bench_rotation.py --scenario slow --slow-for 30 --keep

Not a test: nothing asserts; it prints one table per scenario, one row per phase (see
bench/README.md for measured numbers).  A read the restarting process cannot take is
retried on the next process, as nginx's ``proxy_next_upstream`` would, and counted as a
connection error, not as a failed read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import redis.asyncio as aioredis  # noqa: E402
from helpers_procs import SandboxProc, TokenServerProc, get_json, proc_config  # noqa: E402
from redis.exceptions import RedisError  # noqa: E402
from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from server.embedded_redis import EmbeddedRedis  # noqa: E402

TOKEN_PATH = "/cgi-bin/token"

# Outcome of one read, as the readers record it.
OK, DEAD, NO_TOKEN = "ok", "dead", "no_token"


@dataclass
class Phase:
    """One stretch of a scenario: from its mark to the next one (seconds since the scenario's t0)."""

    name: str
    start: float
    stats: dict[str, Any]  # the sandbox's /sandbox/stats at the mark


@dataclass
class Run:
    """What the readers, the Redis watcher and the schedule of one scenario saw."""

    t0: float
    reads: list[tuple[float, str]] = field(default_factory=list)  # (answer time, OK / DEAD / NO_TOKEN)
    status_503: list[float] = field(default_factory=list)  # answer times of 503s (a subset of NO_TOKEN)
    conn_errors: list[float] = field(default_factory=list)  # a process not listening (a restart)
    values: list[tuple[float, str, bool]] = field(default_factory=list)  # (time, prefix, held before) per change in Redis
    phases: list[Phase] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # the first few failed reads, for the log
    paused: set[str] = field(default_factory=set)  # processes the readers leave alone (SIGSTOP)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        self.events.append(f"t={self.now():5.1f}s {what}")


class Cluster:
    """The sandbox, one redis-server and three token servers of one scenario.

    Redis can be crashed (SIGKILL: no save on the way out) and started again on the same
    port and directory, empty or from the RDB dump a ``SAVE`` left there.
    """

    def __init__(self, workdir: str, args: argparse.Namespace, refresh: dict[str, float]) -> None:
        self.workdir = workdir
        self.args = args
        self.refresh = refresh
        self.sandbox = SandboxProc(workdir, "--expires-in", str(args.expires_in), "--overlap", str(args.overlap))
        self.redis_dir = os.path.join(workdir, "redis")
        self.redis = EmbeddedRedis(self.redis_dir, persistent=False)
        self.procs: list[TokenServerProc] = []
        self.sandbox_url = ""

    async def start(self) -> None:
        self.sandbox_url = self.sandbox.start()
        self.redis.start()
        cfg = proc_config(self.redis.url, self.sandbox_url, refresh=self.refresh)
        self.procs = [TokenServerProc(cfg, self.workdir, f"ts{i}") for i in range(3)]
        for p in self.procs:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in self.procs))

    async def stats(self) -> dict[str, Any]:
        _, body = await get_json(f"{self.sandbox_url}/sandbox/stats")
        return body if isinstance(body, dict) else {"calls": {}, "issued": {}}

    async def token_calls(self) -> int:
        return int((await self.stats())["calls"].get(TOKEN_PATH, 0))

    async def fault(self, **fault: Any) -> None:
        status, body = await get_json(f"{self.sandbox_url}/sandbox/faults", method="POST", body=json.dumps(fault).encode())
        if status != 200:
            raise RuntimeError(f"sandbox refused the fault {fault}: {body}")

    async def clear_faults(self) -> None:
        await get_json(f"{self.sandbox_url}/sandbox/faults", method="DELETE")

    async def save_redis(self) -> None:
        """An RDB snapshot of what Redis holds now (``dump.rdb`` in its directory)."""
        r = aioredis.Redis.from_url(self.redis.url)
        try:
            await r.save()
        finally:
            await r.aclose()

    def crash_redis(self) -> None:
        """SIGKILL redis-server: whatever it held and did not dump is gone."""
        process = self.redis.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if process is not None and process.stderr:
            process.stderr.close()

    def start_redis(self, *, empty: bool) -> None:
        """redis-server again on the same port; ``empty`` drops the dump first, else it loads it."""
        if empty:
            try:
                os.remove(os.path.join(self.redis_dir, "dump.rdb"))
            except FileNotFoundError:
                pass
        self.redis = EmbeddedRedis(self.redis_dir, self.redis.port, persistent=False)
        self.redis.start()

    async def restart(self, proc: TokenServerProc) -> int:
        """SIGTERM ``proc``, start it again and wait until it serves; its exit code."""
        code = await proc.stop()
        proc.start()
        await proc.wait_ready()
        return code

    def kill(self) -> None:
        """Everything down, now (also the path taken on Ctrl-C, so no await)."""
        for p in self.procs:
            if p.alive():
                p.send(signal.SIGCONT)  # a paused process would otherwise hold its port until reaped
            p.kill()
        self.redis.stop()
        self.sandbox.kill()


# --- the load ----------------------------------------------------------------------------


async def reader(cluster: Cluster, client: AsyncHTTPClient, run: Run, stop: asyncio.Event, offset: int) -> None:
    procs = cluster.procs
    i = offset
    while not stop.is_set():
        for _attempt in range(len(procs)):
            proc = procs[i % len(procs)]
            i += 1
            if proc.name in run.paused:
                continue  # nginx would have marked it down after its first timeout
            status, body = await proc.get("/wechat/token", client=client, timeout=10, type="access_token")
            when = run.now()
            if status == 599:  # not listening: the process is restarting
                run.conn_errors.append(when)
                continue
            if status != 200:
                run.reads.append((when, NO_TOKEN))
                if status == 503:
                    run.status_503.append(when)
                if len(run.bad) < 12:
                    run.bad.append(f"t={when:5.1f}s {proc.name}: HTTP {status} {body}")
                break
            token = body["access_token"]
            _, check = await get_json(f"{cluster.sandbox_url}/sandbox/token_status?token={token}", client=client)
            dead = not isinstance(check, dict) or check.get("status") != 0
            run.reads.append((when, DEAD if dead else OK))
            if dead and len(run.bad) < 12:
                status_code = check.get("status") if isinstance(check, dict) else check
                run.bad.append(f"t={when:5.1f}s {proc.name}: token {token[:6]}... dead at WeChat ({status_code})")
            break
        else:
            await asyncio.sleep(0.05)  # every process down or paused: do not spin


async def watch_redis(cluster: Cluster, run: Run, stop: asyncio.Event) -> None:
    """Records every value Redis holds under access_token; one held before is an older value back."""
    last: str | None = None
    seen: set[str] = set()
    r = aioredis.Redis.from_url(cluster.redis.url, decode_responses=True, socket_timeout=1)
    try:
        while not stop.is_set():
            try:
                value = str(raw) if (raw := await r.get("access_token")) is not None else None
            except (RedisError, OSError):
                value = None  # Redis is being restarted by the schedule: keep watching
            if value is not None and value != last:
                run.values.append((run.now(), value[:6], value in seen))
                if value in seen:
                    run.note(f"redis holds {value[:6]}... again (an older value back)")
                seen.add(value)
                last = value
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


# --- the scenarios ---------------------------------------------------------------------------

Schedule = Callable[[Cluster, Run, argparse.Namespace], Awaitable[None]]


async def mark(cluster: Cluster, run: Run, name: str) -> None:
    """Start a new phase now: later reads, calls and values count for it."""
    run.phases.append(Phase(name, run.now(), await cluster.stats()))


async def until(run: Run, t: float) -> None:
    await asyncio.sleep(max(0.0, run.t0 + t - time.monotonic()))


async def next_value(run: Run, timeout: float = 15.0) -> None:
    """Until Redis holds a value it did not hold when called (a rotation or a put-back)."""
    count = len(run.values)
    deadline = time.monotonic() + timeout
    while len(run.values) == count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def faults(cluster: Cluster, run: Run, args: argparse.Namespace) -> None:
    """The original schedule, each fault a phase lasting until the next one."""
    d = args.duration
    await mark(cluster, run, "steady")
    await until(run, 0.12 * d)
    await mark(cluster, run, "busy x2")
    await cluster.fault(path=TOKEN_PATH, kind="busy", times=2)
    await until(run, 0.28 * d)
    await mark(cluster, run, "HTTP 500 x2")
    await cluster.fault(path=TOKEN_PATH, kind="http_error", status=500, times=2)
    await until(run, 0.44 * d)
    await mark(cluster, run, "restart ts1")
    code = await cluster.restart(cluster.procs[1])
    run.note(f"ts1 exited {code} on SIGTERM, serving again")
    await until(run, 0.60 * d)
    # Longer than refresh.timeout: the call times out after WeChat issued a token.
    await mark(cluster, run, "hang 1.5 s x1")
    await cluster.fault(path=TOKEN_PATH, kind="hang", delay=1.5, times=1)
    await until(run, 0.76 * d)
    await mark(cluster, run, "busy + garbage")
    await cluster.fault(path=TOKEN_PATH, kind="busy", times=1)
    await cluster.fault(path=TOKEN_PATH, kind="garbage", times=1)
    await until(run, d)


async def slow(cluster: Cluster, run: Run, args: argparse.Namespace) -> None:
    """Every /cgi-bin/token call answers 2.5 s late (refresh.timeout is 1 s) for ``--slow-for`` s.

    The sandbox issues the token when it answers, so each timed-out call still makes
    WeChat issue one: exactly what a slow WeChat does to a client that gave up.
    """
    await mark(cluster, run, "steady")
    await until(run, 4.0)
    await mark(cluster, run, f"slow upstream {args.slow_for:g} s")
    await cluster.fault(path=TOKEN_PATH, kind="hang", delay=2.5, times=None)
    await until(run, 4.0 + args.slow_for)
    await cluster.clear_faults()  # calls already waiting still answer late
    await mark(cluster, run, "after (fast again)")
    await until(run, 4.0 + args.slow_for + 12.0)


async def redis_empty(cluster: Cluster, run: Run, args: argparse.Namespace) -> None:
    """redis-server crashed and started empty (no persistence) while ts2 was down, ts2
    started again right after.

    First with ts0 and ts1 running: they reach the new Redis within a second and may put
    their value back before ts2 is up.  Then with ts0 and ts1 paused (SIGSTOP, as a VM
    pause or a partition from Redis would) until ts2 has fetched a new token into the
    empty Redis: they come back holding an older token in memory, with a higher version
    than the one the emptied Redis restarted from.
    """
    victim = cluster.procs[2]
    others = cluster.procs[:2]
    await mark(cluster, run, "steady")
    await until(run, 3.0)
    for paused in (False, True):
        await next_value(run)  # right after a rotation: the value in memory has its whole life ahead
        await mark(cluster, run, "redis empty, ts2 restarted" + (", ts0/ts1 paused" if paused else ""))
        if paused:
            run.paused.update(p.name for p in others)
            await asyncio.sleep(0.2)  # let reads already sent to them land
            for p in others:
                p.send(signal.SIGSTOP)
        # ts2 goes down first (as on a host running both that reboots): up, it would
        # put its own value back into the empty Redis before its restart.
        code = await victim.stop()
        before = len(run.values)
        cluster.crash_redis()
        cluster.start_redis(empty=True)
        run.note(f"ts2 exited {code} on SIGTERM; redis-server crashed and started again, empty")
        victim.start()
        await victim.wait_ready()
        run.note("ts2 started again and serving")
        if paused:
            deadline = time.monotonic() + 3.0
            while len(run.values) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # until the watcher has seen what ts2's first pass stored
            for p in others:
                p.send(signal.SIGCONT)
            run.paused.clear()
            run.note("ts0, ts1 resumed")
        await until(run, run.now() + 10.0)


async def redis_rollback(cluster: Cluster, run: Run, args: argparse.Namespace) -> None:
    """redis-server restarted from a dump taken one rotation earlier.

    First just after a rotation, then while the next fetch is in the air (a 0.7 s late
    answer, within refresh.timeout, so the fetch succeeds after Redis went back).
    """
    await mark(cluster, run, "steady")
    await until(run, 2.0)
    for in_air in (False, True):
        await next_value(run)
        await cluster.save_redis()
        run.note("SAVE: dump.rdb holds the current token")
        await next_value(run)  # one rotation later: the dumped token is now the previous one
        await mark(cluster, run, "rollback" + (", fetch in the air" if in_air else " after a rotation"))
        if in_air:
            calls = await cluster.token_calls()
            await cluster.fault(path=TOKEN_PATH, kind="hang", delay=0.7, times=1)
            deadline = time.monotonic() + 10.0
            while await cluster.token_calls() == calls and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            run.note("the next token call is in the air")
        cluster.crash_redis()
        cluster.start_redis(empty=False)
        run.note("redis-server crashed and started again from the dump")
        await until(run, run.now() + 10.0)


SCENARIOS: dict[str, Schedule] = {
    "faults": faults,
    "slow": slow,
    "redis-empty": redis_empty,
    "redis-rollback": redis_rollback,
}


def refresh_config(name: str, args: argparse.Namespace) -> dict[str, float]:
    life = float(args.expires_in)
    # ahead half the life: rotations every 4 s with 8 s tokens.  The rollback needs a dump
    # that still holds a live key when the fetch after next runs: with ahead at half the
    # life the dumped key expires exactly then, so there it is 5/8 (rotations every 3 s,
    # the dumped key 2 s from expiry when the fetch after next starts).
    ahead = life * (0.625 if name == "redis-rollback" else 0.5)
    # The server knows WeChat's overlap (300 s); here it is the sandbox's.
    return {"interval": 0.5, "ahead": ahead, "max_ttl": 7000, "timeout": 1, "backoff_max": 2, "overlap": args.overlap}


# --- the report ----------------------------------------------------------------------------


@dataclass
class Row:
    phase: str
    seconds: float
    reads: int
    dead: int
    no_token: int  # non-200 answers
    status_503: int
    conn_errors: int
    calls: int
    issued: int
    new_values: int
    older_back: int  # Redis took a value it had held before (a rollback or a put-back)
    window_ms: float | None  # the longest run of dead reads: first to last, no other answer between


def rows_of(run: Run, end: float, end_stats: dict[str, Any]) -> list[Row]:
    rows = []
    bounds = [(p, run.phases[i + 1].start if i + 1 < len(run.phases) else end,
               run.phases[i + 1].stats if i + 1 < len(run.phases) else end_stats)
              for i, p in enumerate(run.phases)]
    for phase, stop, stats in bounds:
        def inside(t: float, lo: float = phase.start, hi: float = stop) -> bool:
            return lo <= t < hi

        outcomes = [o for t, o in run.reads if inside(t)]
        dead_times = [t for t, o in run.reads if o == DEAD and inside(t)]
        window: float | None = None
        start: float | None = None
        for t, o in sorted((t, o) for t, o in run.reads if inside(t)):
            if o == DEAD:
                start = t if start is None else start
                window = max(window or 0.0, t - start)
            else:
                start = None
        changes = [seen for t, _, seen in run.values if inside(t)]

        def delta(key: str, stats: dict[str, Any] = stats, phase: Phase = phase) -> int:
            return int(stats[key].get(TOKEN_PATH, 0)) - int(phase.stats[key].get(TOKEN_PATH, 0))

        rows.append(Row(
            phase=phase.name, seconds=stop - phase.start, reads=len(outcomes),
            dead=len(dead_times), no_token=outcomes.count(NO_TOKEN),
            status_503=sum(1 for t in run.status_503 if inside(t)),
            conn_errors=sum(1 for t in run.conn_errors if inside(t)),
            calls=delta("calls"), issued=delta("issued"),
            new_values=changes.count(False), older_back=changes.count(True),
            window_ms=window * 1000 if window is not None else None,
        ))
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    head = ["phase", "s", "reads", "dead", "503", "non-200", "conn err", "calls", "issued", "new", "older back",
            "dead window"]
    body = [[r.phase, f"{r.seconds:.1f}", str(r.reads), str(r.dead), str(r.status_503), str(r.no_token),
             str(r.conn_errors), str(r.calls), str(r.issued), str(r.new_values), str(r.older_back),
             "-" if r.window_ms is None else f"{r.window_ms:.0f} ms"] for r in rows]
    total = [
        "total", f"{sum(r.seconds for r in rows):.1f}",
        *(str(sum(getattr(r, k) for r in rows)) for k in
          ("reads", "dead", "status_503", "no_token", "conn_errors", "calls", "issued", "new_values", "older_back")),
        "",
    ]
    table = [head, *body, total]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    print(f"\n== {title}")
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)))
        if n == 0 or n == len(body):
            print("  ".join("-" * w for w in widths))


async def run_scenario(name: str, args: argparse.Namespace, workdir: str) -> list[Row]:
    cluster = Cluster(os.path.join(workdir, name), args, refresh_config(name, args))
    os.makedirs(cluster.workdir, exist_ok=True)
    client = AsyncHTTPClient(force_instance=True, max_clients=2 * args.readers + 8)
    try:
        await cluster.start()
        run = Run(t0=time.monotonic())
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(reader(cluster, client, run, stop, i)) for i in range(args.readers)]
        tasks.append(asyncio.ensure_future(watch_redis(cluster, run, stop)))
        try:
            await SCENARIOS[name](cluster, run, args)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        end = run.now()
        end_stats = await cluster.stats()
        codes = await asyncio.gather(*(p.stop() for p in cluster.procs))
    finally:
        client.close()
        cluster.kill()

    rows = rows_of(run, end, end_stats)
    refresh = cluster.refresh
    print_table(f"{name}: 3 processes, {args.readers} readers, tokens live {args.expires_in} s "
                f"(previous valid {args.overlap:g} s more), refresh ahead {refresh['ahead']:g} s, "
                f"timeout {refresh['timeout']:g} s; exit codes {' '.join(map(str, codes))}", rows)
    print("events:")
    for e in run.events:
        print("  " + e)
    if run.bad:
        print("first failed reads:")
        for b in run.bad:
            print("  " + b)
    return rows


async def run_all(args: argparse.Namespace, workdir: str) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        await run_scenario(name, args, workdir)
    print("\ncolumns: reads answered in the phase; dead = a 200 whose token WeChat rejected when checked right away;"
          "\n503 and non-200 = reads with no token; calls / issued = /cgi-bin/token calls and tokens WeChat issued;"
          "\nnew / older back = values Redis took that were new / that it had held before (a rollback or a put-back);"
          "\ndead window = the longest run of dead reads in the phase (first to last, no other answer between).")
    if args.keep:
        print(f"\nlogs kept in {workdir}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scenario", choices=["all", *SCENARIOS], default="all", help="run one scenario alone (default all)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of the faults scenario (default 40)")
    p.add_argument("--slow-for", type=float, default=30.0, help="seconds WeChat stays slow in the slow scenario (default 30)")
    p.add_argument("--readers", type=int, default=16, help="concurrent readers (default 16)")
    p.add_argument("--expires-in", type=int, default=8, help="token life at the sandbox, seconds (default 8)")
    # WeChat keeps the previous token 300 s, a small part of the 6600 s a token serves
    # before its refresh: a superseded token that is served again dies long before the
    # server would refresh it.  Scaled to 8 s tokens refreshed 3-4 s before expiry, 1 s
    # keeps that order (the sandbox's own default, 300 s, would let every superseded token
    # live to its expiry and hide those reads), yet leaves a reader's check, made within
    # milliseconds of the read, far from a rotation's overlap.
    p.add_argument("--overlap", type=float, default=1.0,
                   help="seconds the previous token stays valid at the sandbox (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-rotation-")
    try:
        return asyncio.run(run_all(args, workdir))
    except KeyboardInterrupt:
        # asyncio.run has cancelled the scenario; its finally blocks killed every process.
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
