"""CPU the traces add per request, in-process (run pinned: taskset -c 0).

Per request: the tracing layer (server span, the client's traceparent continued, x-trace-id) around
an inner app that makes one upstream-attempt span with its traceparent header and ends it, as the
forwarder does; against the same inner app without tracing. Spans go to a batching processor whose
exporter encodes each batch as OTLP protobuf and drops it, so the export thread's CPU counts too
(process time), and none is dropped on the way. Sampled 100% and 1% (parent-based ratio, new
traces: most clients send no traceparent). Best of 5 runs of 20,000 each.

.venv/bin/python -m bench.tracing_cpu
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from gateway.context import RequestContext
from gateway.telemetry.tracing import Tracing, TracingMiddleware

N = 20_000
RUNS = 5
# A queue that holds a whole run: the SDK's default (2,048) drops spans at this synthetic rate, and
# a dropped span's export would go uncounted.
os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(2 * N + 1000))


class Encoding(SpanExporter):
    """What an OTLP exporter does before the network: encode the batch as protobuf."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


async def inner(scope: Any, receive: Any, send: Any) -> None:
    ctx: RequestContext = scope["gateway"]
    ctx.identity, ctx.model, ctx.deployment, ctx.status = "bench", "mock-gpt", "mock/up", 200
    ctx.usage = (12, 20)
    trace = ctx.trace
    if trace is not None:
        span = trace.attempt("chat/completions", "openai", "mock/up", "up", 1)
        trace.headers(span)
        trace.end_attempt(span, 200, usage=ctx.usage)


async def run(app: Any) -> float:
    start = time.process_time()
    for _ in range(N):  # a scope and context per request, as RequestIdMiddleware makes them
        ctx = RequestContext(b"r", time.perf_counter())
        scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
        scope["gateway"] = ctx
        await app(scope, None, None)
    return (time.process_time() - start) / N * 1e6


async def main() -> None:
    results: dict[str, float] = {}
    for label, ratio in (("100%", 1.0), ("1%", 0.01)):
        tracing = Tracing(Encoding(), service_name="bench", sampler=Tracing.sampler(ratio, {}))
        on, best = TracingMiddleware(inner, tracing=tracing), float("inf")
        for _ in range(RUNS):
            best = min(best, await run(on))
            tracing.provider.force_flush()  # the run's exports are its CPU too
        tracing.shutdown()
        results[label] = best
    off = min([await run(inner) for _ in range(RUNS)])
    for label, on_us in results.items():
        added = on_us - off
        print(f"tracing sampled {label}: +{added:.2f} us CPU per request (on {on_us:.2f}, off {off:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
