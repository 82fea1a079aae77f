"""Put on PYTHONPATH by bench/bench_reads.py to run a server on uvloop, unchanged otherwise."""

import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
