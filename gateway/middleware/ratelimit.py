"""Per-key rate limits on the hot routes: admit (one store round trip) or 429, then reconcile tokens.

The answer carries OpenAI's x-ratelimit-* headers; a 429 also carries Retry-After
and names the limit. Token estimates are corrected after the answer has gone
out: to its real usage, to 0 for an error or a cache hit. A stream whose usage is
unknown (cut short by the upstream or the client before its usage event, or from a
provider that sends none) is charged the prompt's estimate plus one token per event
relayed (OpenAI-family streams send about one token per chunk), never more than was
charged on admission; any other answer without usage keeps its estimate.
"""

from __future__ import annotations

import math

from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.limits import Limiter, estimate_prompt_tokens
from gateway.types import ASGIApp, Receive, Scope, Send

_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute", "rpd": "requests per day"}


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext | None = scope.get("gateway")
        if scope["type"] != "http" or ctx is None or ctx.operation is None or ctx.policy is None:
            await self.app(scope, receive, send)
            return
        policy = ctx.policy
        decision = await self.limiter.admit(policy.key_id, policy.limits, ctx.body)
        if decision is None:
            await self.app(scope, receive, send)
            return
        ctx.extra_headers += decision.headers
        if not decision.admitted:
            limit = getattr(policy.limits, decision.refused)
            wait = math.ceil(decision.retry_after_s)
            error = RateLimited(
                f"Rate limit reached for {_NAMES[decision.refused]} ({decision.refused}) on this key: "
                f"limit {limit}. Please try again in {decision.retry_after_s:.1f}s.",
                headers=[(b"retry-after", b"%d" % wait)],
            )
            await ctx.send_error(send, error)
            return
        await self.app(scope, receive, send)
        if decision.estimate:
            actual = ctx.tokens if ctx.status == 200 and ctx.cache != b"hit" else 0
            if actual is None and ctx.streamed is not None:
                actual = min(decision.estimate, estimate_prompt_tokens(ctx.body) + ctx.streamed)
            if actual is not None:
                await self.limiter.reconcile(policy.key_id, decision, actual)
