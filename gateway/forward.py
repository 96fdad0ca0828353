"""The thin forwarding app: alias -> deployment -> upstream call -> response relayed as it comes.

One path serves every operation. The client's headers are not forwarded (the
provider's own credential and a JSON content type are all an upstream needs),
so client credentials and hop-by-hop headers cannot leak; the upstream URL comes
from config alone. Response bytes are relayed untouched: a JSON answer in one
piece, a stream chunk by chunk as read. A client that disconnects cancels the
upstream call at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from gateway.context import RequestContext
from gateway.errors import (
    GatewayError,
    NotFound,
    PermissionDenied,
    UnsupportedOperation,
    UpstreamError,
)
from gateway.providers import OPERATION_CAPABILITY, Adapter, Capability, Target
from gateway.types import Receive, Scope, Send
from gateway.upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger("gateway.forward")

# Upstream response headers worth relaying; the rest (hop-by-hop, cookies, the
# provider account's own rate limits and organisation) stay behind.
_RELAYED = frozenset({b"content-type", b"content-length", b"openai-processing-ms", b"openai-version"})
_SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
_ERROR_BODY_LIMIT = 65536
_RETRY_HEADERS = frozenset({b"retry-after", b"retry-after-ms"})  # the SDKs honour both


class Route:
    """One deployment of an alias: where to send it and as which model."""

    __slots__ = ("adapter", "pool", "target")

    def __init__(self, adapter: Adapter, pool: UpstreamPool, target: Target) -> None:
        self.adapter = adapter
        self.pool = pool
        self.target = target


class Forward:
    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = routes

    def resolve(self, ctx: RequestContext) -> Route:
        alias = ctx.model
        route = self.routes.get(alias)
        if route is None or ctx.policy is None:
            raise NotFound(
                f"The model `{alias}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if alias not in ctx.policy.models:
            raise PermissionDenied(f"This API key is not allowed to use the model `{alias}`.", param="model")
        op = ctx.operation
        assert op is not None
        provider = route.adapter.config
        needed = [OPERATION_CAPABILITY[op]]
        if ctx.body.get("stream") is True:
            needed.append(Capability.streaming)
        if ctx.body.get("tools") or ctx.body.get("functions"):
            needed.append(Capability.tools)
        for capability in needed:
            if not provider.supports(capability):
                raise UnsupportedOperation(
                    f"Provider '{route.adapter.name}' ({provider.__struct_config__.tag}) behind model "
                    f"`{alias}` does not support {capability.value}.",
                    param="model",
                )
        ctx.deployment = f"{route.adapter.name}/{route.target.model}"
        return route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["gateway"]
        try:
            route = self.resolve(ctx)
        except GatewayError as exc:
            await ctx.send_error(send, exc)
            return

        # Watch for the client going away while we wait on the upstream or stream to it.
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(receive())
        state = {"active": True, "gone": False}

        def on_message(fut: asyncio.Future[Any]) -> None:
            if (
                state["active"]
                and not fut.cancelled()
                and fut.exception() is None
                and fut.result()["type"] == "http.disconnect"
            ):
                state["gone"] = True
                task.cancel()

        watcher.add_done_callback(on_message)
        try:
            await self.exchange(ctx, route, send)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()
        finally:
            state["active"] = False
            watcher.cancel()

    async def exchange(self, ctx: RequestContext, route: Route, send: Send) -> None:
        op = ctx.operation
        assert op is not None
        adapter = route.adapter
        try:
            payload = adapter.encode_body(op, ctx.body, route.target)
            sent = time.perf_counter()
            response = await route.pool.request(
                b"POST", adapter.target(op, route.target), adapter.request_headers, payload
            )
        except GatewayError as exc:
            if isinstance(exc, UpstreamError):
                log.warning("upstream %s failed: %s", adapter.name, exc.message)
            await ctx.send_error(send, exc)
            return
        waited = time.perf_counter() - sent
        try:
            if response.status >= 400:
                await self.relay_error(ctx, adapter, response, send)
            else:
                await self.relay(ctx, adapter, response, send, waited)
        finally:
            await response.aclose()

    async def relay(
        self, ctx: RequestContext, adapter: Adapter, response: UpstreamResponse, send: Send, waited: float
    ) -> None:
        op = ctx.operation
        assert op is not None
        headers = [(k, v) for k, v in response.headers if k in _RELAYED]
        translator = adapter.stream_translator(op, ctx.body) if ctx.body.get("stream") is True else None
        body = None
        if translator is not None:
            headers = list(_SSE_HEADERS)
        elif adapter.translates or any(k == b"content-length" for k, _ in headers):
            try:
                body = await response.read()
                if adapter.translates:  # may raise: a provider can report a failure inside a 200
                    body = adapter.translate_response(op, ctx.body, body)
                    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            except GatewayError as exc:
                await ctx.send_error(send, exc)
                return
        overhead_ms = (time.perf_counter() - ctx.started - waited) * 1000
        headers += ctx.headers()
        headers.append((b"x-gateway-overhead-ms", b"%.3f" % overhead_ms))
        ctx.responded = True
        ctx.status = response.status
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if body is not None:
            await send({"type": "http.response.body", "body": body})
            return
        try:
            async for chunk in response:
                if translator is not None:
                    chunk = translator.feed(chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            # Too late for a status code: end the stream with an error event the SDKs raise.
            log.warning("upstream stream broke: %s", exc.message)
            await send({"type": "http.response.body", "body": b"event: error\ndata: " + exc.body() + b"\n\n"})
            return
        await send({"type": "http.response.body", "body": translator.finish() if translator else b""})

    async def relay_error(
        self, ctx: RequestContext, adapter: Adapter, response: UpstreamResponse, send: Send
    ) -> None:
        """Upstream errors keep their status and message, in OpenAI's shape, with the provider key masked."""
        raw = b""
        async for chunk in response:
            raw += chunk
            if len(raw) > _ERROR_BODY_LIMIT:
                break
        key = adapter.config.api_key.encode()
        if key:
            raw = raw.replace(key, b"***")
        status, body = adapter.translate_error(response.status, raw)
        ctx.responded = True
        ctx.status = status
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k, v) for k, v in response.headers if k in _RETRY_HEADERS]
        headers += ctx.headers()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
