"""One JSON line per request on the `gateway.access` logger, written after the response.

It reads what the inner layers recorded on the request context, so it wraps
neither `send` nor the stream.
"""

from __future__ import annotations

import logging
import time

import orjson

from gateway.context import RequestContext
from gateway.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("gateway.access")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            ctx: RequestContext | None = scope.get("gateway")
            if ctx is not None and log.isEnabledFor(logging.INFO):
                line = {
                    "request_id": ctx.request_id.decode(),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": ctx.status,
                    "key": ctx.identity or None,
                    "model": ctx.model or None,
                    "deployment": ctx.deployment or None,
                    "latency_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
                }
                if ctx.trace is not None:
                    line["trace_id"] = ctx.trace.trace_id
                    line["span_id"] = ctx.trace.span_id
                log.info(orjson.dumps(line).decode())
