"""Limits on the hot routes: resolve the deployments, admit (one store round trip) or 429, then settle.

The plan of deployments is resolved here, before anything is charged, so an
unknown or forbidden model is refused without touching a counter, and the
admission can pick a deployment with quota left. A cacheable request's lookup
is planned here too and pipelined with the admission: one round trip for both. Every answer carries OpenAI's
x-ratelimit-* headers; a 429 also carries Retry-After and names the limit. The
settling (real token counts, cost, the concurrency lease) runs once the answer
has gone out, and also when the client went away or the request failed.
"""

from __future__ import annotations

from gateway.cache.middleware import ResponseCache
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.limits.limiter import Limiter
from gateway.routing.forward import Forward
from gateway.types import ASGIApp, Receive, Scope, Send


class RateLimitMiddleware:
    def __init__(
        self, app: ASGIApp, *, limiter: Limiter, forward: Forward, cache: ResponseCache | None = None
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.forward = forward
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext | None = scope.get("gateway")
        if scope["type"] != "http" or ctx is None or ctx.operation is None or ctx.policy is None:
            await self.app(scope, receive, send)
            return
        try:
            ctx.plan = self.forward.resolve(ctx)
            if self.cache is not None:
                ctx.lookup = self.cache.plan(scope, ctx)
            ctx.admission = await self.limiter.admit(ctx, ctx.plan, ctx.lookup)
        except GatewayError as exc:
            if ctx.lookup is not None and self.cache is not None:
                self.cache.abandon(ctx.lookup)  # refused: it will not lead a flight
            await ctx.send_error(send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if ctx.admission is not None:  # also set by a failover that paid a deployment's quota
                await self.limiter.settle(ctx)
