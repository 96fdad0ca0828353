"""The end of every request: one JSON line on the `gateway.access` logger, and its metrics.

Both read what the inner layers recorded on the request context once the
response is over, so this layer wraps neither `send` nor the stream. Requests
in flight are kept in a set that the metrics count at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import orjson

from gateway.context import RequestContext
from gateway.telemetry import logs
from gateway.telemetry.metrics import LIMIT_KINDS, Metrics
from gateway.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("gateway.access")


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        access_log: bool = True,
        metrics: Metrics | None = None,
        operations: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.metrics = metrics
        self.operations = operations or {}  # path -> operation name: the requests the metrics count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        operation = self.operations.get(scope["path"]) if metrics is not None else None
        if metrics is not None and operation is not None:
            metrics.inflight[id(scope)] = scope
        try:
            await self.app(scope, receive, send)
        finally:
            ctx: RequestContext | None = scope.get("gateway")
            prices = None
            if metrics is not None:
                prices = metrics.prices
                if operation is not None:
                    del metrics.inflight[id(scope)]
            if ctx is not None:
                ended = time.perf_counter()
                if metrics is not None and operation is not None:
                    metrics.record(ctx, operation, ended)
                if self.access_log and log.isEnabledFor(logging.INFO):
                    text = orjson.dumps(line(ctx, scope, ended, prices)).decode()
                    handler = logs.handler()
                    if handler is not None and handler.takes(log):
                        handler.add(log.name, text)  # written with the others of this loop turn
                    else:
                        log.info(text)


def line(
    ctx: RequestContext, scope: Scope, ended: float, prices: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, object]:
    entry: dict[str, object] = {
        "request_id": ctx.request_id.decode(),
        "method": scope["method"],
        "path": scope["path"],
        "status": ctx.status,
        "key": ctx.identity or None,
        "model": ctx.model or None,
        "deployment": ctx.deployment or None,
        "latency_ms": round((ended - ctx.started) * 1000, 3),
    }
    if ctx.first_byte:
        entry["ttfb_ms"] = round((ctx.first_byte - ctx.started) * 1000, 3)
    if ctx.overhead is not None:
        entry["overhead_ms"] = round(ctx.overhead * 1000, 3)
    if ctx.usage is not None:
        entry["tokens"] = {"input": ctx.usage[0], "output": ctx.usage[1]}
        price_in, price_out = (prices or {}).get(ctx.model, (0.0, 0.0))
        if price_in or price_out:
            entry["cost_usd"] = round((ctx.usage[0] * price_in + ctx.usage[1] * price_out) / 1e6, 9)
    if ctx.cache:
        entry["cache"] = "coalesced" if ctx.coalesced else ctx.cache.decode()
    if ctx.attempts:
        entry["attempts"] = [f"{deployment} {outcome}" for deployment, outcome in ctx.attempts]
    if ctx.admission is not None or ctx.refused:
        entry["limits"] = f"refused {LIMIT_KINDS[ctx.refused]}" if ctx.refused else "admitted"
    if ctx.without_store:
        entry["without_store"] = list(ctx.without_store)
    if ctx.trace is not None:  # our server span
        entry["trace_id"], entry["span_id"] = ctx.trace.trace_id, ctx.trace.span_id
    elif (parent := _traceparent(scope)) is not None:  # tracing off: the client's, to correlate
        entry["trace_id"], entry["span_id"] = parent
    return entry


def _traceparent(scope: Scope) -> tuple[str, str] | None:
    """The ids of a well-formed W3C traceparent the client sent."""
    for name, value in scope["headers"]:
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
                trace, span = parts[1].decode("latin-1"), parts[2].decode("latin-1")
                if _hex(trace) and _hex(span) and trace != "0" * 32 and span != "0" * 16:
                    return trace, span
            return None
    return None


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
