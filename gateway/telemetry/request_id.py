"""Outermost layer: gives each request its context and id, and turns a bug into a clean 500.

The id is the client's `x-request-id` when it is well-formed, else a per-process
random prefix plus a counter: as unique as a fresh random id, without a syscall
per request.

Hot routes add `ctx.headers()` to their own responses, so their stream chunks
pass through no wrapper here; other routes get a `send` wrapper that adds them.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Container

from gateway.context import RequestContext
from gateway.errors import ServerError
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.request")

_WELL_FORMED = re.compile(rb"[A-Za-z0-9._:\-]{1,128}").fullmatch


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, *, hot_paths: Container[str]) -> None:
        self.app = app
        self.hot_paths = hot_paths
        self.prefix = b"req_" + os.urandom(8).hex().encode()
        self.counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _WELL_FORMED(value):
                    request_id = value
                break
        if request_id is None:
            request_id = b"%s%x" % (self.prefix, next(self.counter))
        ctx = scope["gateway"] = RequestContext(request_id, time.perf_counter())

        if scope["path"] not in self.hot_paths:
            server_send = send

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    ctx.responded = True
                    ctx.status = message["status"]
                    headers = list(message.get("headers", ()))
                    if not any(name == b"x-request-id" for name, _ in headers):  # errors add it themselves
                        message["headers"] = headers + ctx.headers()
                await server_send(message)

            send = send_with_id
        try:
            await self.app(scope, receive, send)
        except Exception:
            # A bug, not an expected error: those are GatewayErrors answered where they arise.
            log.exception("unhandled error in request %s", request_id.decode())
            if not ctx.responded:
                await ctx.send_error(send, ServerError("The server had an error processing your request."))
