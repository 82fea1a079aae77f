"""``wrk`` and ``redis-benchmark`` runs for the benchmarks: requests/s, p50 and p99 in ms."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = float(re.match(r"[\d.]+", text).group()), re.sub(r"[\d.]+", "", text)  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, seconds: float, connections: int, headers: dict[str, str] | None = None) -> Run:
    """One ``wrk -t1`` run; requests per second, p50 and p99 latency, non-2xx and socket errors."""
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", *extra, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Run(rps, p50, p99, errors)


def redis_benchmark(port: int, key: str, requests: int, connections: int) -> Run:
    """``redis-benchmark GET key`` (one thread, as wrk): what a direct reader gets."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", str(connections), "-n", str(requests), "--csv", "GET", key],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    row = rows[-1]
    return Run(float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"]), 0)


def run_bench(main_async: Callable[[argparse.Namespace, str], Awaitable[int]], args: argparse.Namespace, prefix: str,
              tools: dict[str, str]) -> int:
    """Run a benchmark in a temporary directory; exit 2 naming the Debian package of a missing
    tool (``{"wrk": "wrk"}``)."""
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            print(f"needs {tool} (Debian: apt-get install {package})", file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        return asyncio.run(main_async(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
