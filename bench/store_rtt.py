"""CPU per store round trip on Redis: redis.asyncio vs the lean RESP client, at concurrency 32.

taskset -c 0 .venv/bin/python -m bench.store_rtt [--uvloop] [--url redis://127.0.0.1:6379/0]

Without --url it starts its own redis-server pinned to CPU 1 (no persistence) and
stops it afterwards. Each variant runs 32 coroutines looping over the same call;
the figure is process CPU (time.process_time) per call, the median of 3 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator

from redis.asyncio import BlockingConnectionPool, Redis

from bench.harness import free_port
from gateway.store import RedisStore, Script

CONCURRENCY = 32
CALLS = 40_000
ROUNDS = 3

# A small limiter-like script: one INCR with an expiry, as a request's admission does.
SCRIPT = Script(
    "bench.incr",
    "local n = redis.call('INCR', KEYS[1])\n"
    "if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end\n"
    "return n",
    lambda ops, keys, args: None,  # Redis only
)

READ = Script("bench.get", "return redis.call('GET', KEYS[1])", lambda ops, keys, args: None)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        ["taskset", "-c", "1", executable, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def cpu_per_call(call: Callable[[], Awaitable[object]]) -> float:
    """Median over rounds of CPU milliseconds per call, CONCURRENCY callers at once."""
    per_worker = CALLS // CONCURRENCY

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    for _ in range(200):  # warm up: connections open, script loaded
        await call()
    rounds = []
    for _ in range(ROUNDS):
        start = time.process_time()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        rounds.append((time.process_time() - start) * 1000 / (per_worker * CONCURRENCY))
    return statistics.median(rounds)


async def measure(url: str) -> None:
    for attempt in range(100):  # a fresh server may need a moment
        try:
            async with RedisStore.from_url(url) as probe:
                await probe.ping()
            break
        except Exception:
            if attempt == 99:
                raise
            await asyncio.sleep(0.05)
    pooled = RedisStore(Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=50)))
    lean = RedisStore.from_url(url)
    async with pooled, lean:
        await lean.set("cached", b"x" * 200)
        args = [60_000]
        two = [(SCRIPT, ["n"], args), (READ, ["cached"], [])]  # run_many of two scripts, as a request may
        rows = [
            ("EVALSHA, redis.asyncio (pool)", lambda: pooled.run(SCRIPT, ["n"], args)),
            ("EVALSHA, lean client", lambda: lean.run(SCRIPT, ["n"], args)),
            ("2 EVALSHAs, redis.asyncio pipeline", lambda: pooled.run_many(two)),
            ("2 EVALSHAs, lean client", lambda: lean.run_many(two)),
            ("GET, redis.asyncio (pool)", lambda: pooled.get("cached")),
            ("GET, lean client", lambda: lean.get("cached")),
        ]
        print(f"CPU per call at concurrency {CONCURRENCY}, median of {ROUNDS} rounds of {CALLS} calls")
        for name, call in rows:
            print(f"  {name:40s} {await cpu_per_call(call):.4f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis (default: start one on CPU 1)")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, as the gateway serves")
    args = parser.parse_args()
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(redis_server())
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(measure(url))


if __name__ == "__main__":
    main()
