"""CPU the metrics add per request at its end, in-process (run pinned: taskset -c 0).

The request-end layer with metrics on against the same layer with them off, around an inner app
that fills the request context as a relayed chat answer does; best of 9 runs of 50,000 each. The
access log is left out (its line is the same either way). A steadier figure than `--metrics` on a
shared machine, but without the forwarding path's own bookkeeping (a few context fields).

.venv/bin/python -m bench.metrics_cpu
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.context import RequestContext
from gateway.telemetry.access_log import AccessLogMiddleware
from gateway.telemetry.metrics import OPERATIONS, Deployment, Metrics

N = 50_000
RUNS = 9


async def inner(scope: Any, receive: Any, send: Any) -> None:
    ctx = scope["gateway"] = RequestContext(b"r", time.perf_counter())
    ctx.identity, ctx.model, ctx.deployment, ctx.status = "bench", "mock-gpt", "mock/up", 200
    ctx.usage = (12, 20)
    ctx.overhead = 0.0001
    ctx.attempts.append(("mock/up", "ok"))


async def run(app: Any) -> float:
    start = time.process_time()
    for _ in range(N):
        scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
        await app(scope, None, None)
    return (time.process_time() - start) / N * 1e6


async def main() -> None:
    metrics = Metrics()
    metrics.configure(
        key_names=(),
        max_key_names=100,
        aliases=["mock-gpt"],
        deployments={"mock/up": Deployment("openai", "up")},
        prices={"mock-gpt": (0.15, 0.6)},
    )
    on = AccessLogMiddleware(inner, access_log=False, metrics=metrics, operations=OPERATIONS)
    off = AccessLogMiddleware(inner, access_log=False)
    best = {"on": float("inf"), "off": float("inf")}
    for _ in range(RUNS):
        best["on"] = min(best["on"], await run(on))
        best["off"] = min(best["off"], await run(off))
    print(
        f"metrics: {best['on'] - best['off']:.2f} us CPU per request added "
        f"(on {best['on']:.2f}, off {best['off']:.2f}; best of {RUNS} x {N:,})"
    )


if __name__ == "__main__":
    asyncio.run(main())
