"""The thin forwarding app: alias -> plan of deployments -> upstream call -> response relayed as it comes.

One path serves every operation. The client's headers are not forwarded (the
provider's own credential and a JSON content type are all an upstream needs),
so client credentials and hop-by-hop headers cannot leak; the upstream URL comes
from config alone. Response bytes are relayed untouched (or translated by the
adapter): a JSON answer in one piece, a stream chunk by chunk as read.

Until upstream content goes to the client, a failed attempt (connect error,
timeout, 429, 5xx) tries the same deployment again after a jittered backoff, up
to the alias's `retries`, then (with `failover`) moves on to the plan's next
deployment, fallbacks included, all within the request's total deadline; a
timed-out deployment is never tried twice, and a 4xx ends the request. A provider
with several keys (`gateway/providers/keys.py`) is retried on its next key: after a
429 without backoff, after a 401/403 (the key retired) at once and uncounted.
Deployments whose breaker is open, or whose provider has no usable key left, are
skipped. A streaming request waiting on its upstream gets heartbeats
(`heartbeat.py`); errors after them end the stream with an error event
(`failures.py`). A client that disconnects cancels the upstream call at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol

from gateway.context import RequestContext
from gateway.errors import (
    GatewayError,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    UnsupportedOperation,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.providers import OPERATION_CAPABILITY, Capability, StreamTranslator
from gateway.providers.base import find_usage
from gateway.providers.keys import ProviderKey
from gateway.routing.breaker import Admission, Breakers, Outcome
from gateway.routing.failures import Failed, error_event, read_error, send_error, send_failure
from gateway.routing.heartbeat import SSE_HEADERS, Beat, Pulse
from gateway.routing.router import Route, Router
from gateway.tasks import Disconnect
from gateway.types import Receive, Scope, Send
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway.forward")

# Upstream response headers worth relaying; the rest (hop-by-hop, cookies, the
# provider account's own rate limits and organisation) stay behind.
_RELAYED = frozenset({b"content-type", b"content-length", b"openai-processing-ms", b"openai-version"})


class Quotas(Protocol):
    """Pays a deployment's quota before a failover tries it (`gateway.limits.limiter.Limiter`)."""

    async def charge(self, ctx: RequestContext, route: Route) -> GatewayError | None: ...


class Accounting(Protocol):
    """Counts an answer's usage per key and model (`gateway.limits.usage.UsageRecorder`)."""

    def add(self, key_id: str, alias: str, usage: tuple[int, int] | None) -> None: ...


class Forward:
    def __init__(
        self,
        router: Router,
        breakers: Breakers,
        usage: Accounting,
        limiter: Quotas,
        *,
        total_s: float,
        backoff_s: float,
        backoff_max_s: float,
        route_headers: bool = True,
        heartbeat_s: float = 0,
    ) -> None:
        self.router = router
        self.breakers = breakers
        self.usage = usage
        self.limiter = limiter
        self.pulse = Pulse(heartbeat_s) if heartbeat_s else None
        self.total_s = total_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.route_headers = route_headers

    def resolve(self, ctx: RequestContext) -> list[Route]:
        alias = ctx.model
        if alias not in self.router.aliases or ctx.policy is None:
            raise NotFound(
                f"The model `{alias}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if alias not in ctx.policy.models:
            raise PermissionDenied(f"This API key is not allowed to use the model `{alias}`.", param="model")
        op = ctx.operation
        assert op is not None
        needed = [OPERATION_CAPABILITY[op]]
        if ctx.body.get("stream") is True:
            needed.append(Capability.streaming)
        if ctx.body.get("tools") or ctx.body.get("functions"):
            needed.append(Capability.tools)
        plan = self.router.plan(alias, needed)
        if not plan:
            first = self.router.aliases[alias].routes[0].adapter
            lacking = next(c for c in needed if not first.config.supports(c))
            raise UnsupportedOperation(
                f"Provider '{first.name}' ({first.config.__struct_config__.tag}) behind model "
                f"`{alias}` does not support {lacking.value}.",
                param="model",
            )
        return plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["gateway"]
        try:
            plan = ctx.plan or self.resolve(ctx)
        except GatewayError as exc:
            await send_error(ctx, send, exc)
            return

        plan, counted = await self.router.acquire(ctx.model, plan)
        pulse = self.pulse if ctx.body.get("stream") is True else None
        beat: Beat | None = None
        if pulse is not None:
            beat = pulse.watch(ctx, send, (time.perf_counter() - ctx.started) * 1000)
            send = beat.send
        try:
            # A client going away while we wait on the upstream or stream to it ends the exchange.
            with Disconnect(receive):
                await self.exchange(ctx, plan, send)
        finally:
            if pulse is not None and beat is not None:
                pulse.drop(beat)
            if counted is not None:
                await self.router.release(counted)

    async def exchange(self, ctx: RequestContext, plan: list[Route], send: Send) -> None:
        op = ctx.operation
        assert op is not None
        alias = self.router.aliases[ctx.model]
        deadline = ctx.started + self.total_s
        attempts = 0
        admission = ctx.admission
        skip: set[Route] = set(admission.skipped) if admission is not None else set()  # timed out, no quota
        last: GatewayError | Failed | None = None  # None: no deployment was even tried
        index = 0  # where the plan's walk goes on
        route: Route | None = None
        retried = 0  # retries of `route` so far
        key: ProviderKey | None = None  # the last attempt's provider key
        key_refused = False  # the last attempt's key was refused and retired, and its provider has another
        while time.perf_counter() < deadline:
            probe = False
            if (
                route is not None
                and route not in skip
                and (key_refused or retried < alias.retries)
                and route.adapter.keys.current is not None
            ):
                admitted = await self.breakers.admit(route.id)  # the breaker may have opened meanwhile
                if admitted is Admission.REJECT:
                    skip.add(route)
                    continue
                probe = admitted is Admission.PROBE
                if key_refused:
                    key_refused = False  # a revoked key is no fault of the request: not one of its retries
                else:
                    retried += 1
                if route.adapter.keys.current is key:
                    # The same deployment and key again: back off (full jitter), within the deadline.
                    # A 429 moved the key on: the next one's limit has not been met, so go at once.
                    delay = random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** (retried - 1)))
                    if time.perf_counter() + delay >= deadline:
                        break
                    await asyncio.sleep(delay)
            else:
                if attempts and not alias.failover:
                    break
                route, probe = await self.next_route(plan, index, skip)
                if route is None:
                    break
                index = plan.index(route) + 1
                retried, key_refused = 0, False
            if route.quota:
                if admission is not None and admission.prepaid is route:
                    admission.prepaid = None  # paid by the admission, for this first attempt
                elif (refused := await self.limiter.charge(ctx, route)) is not None:
                    skip.add(route)
                    if not attempts:  # else the failure already met is the answer
                        last = refused
                    continue
                admission = ctx.admission
            adapter = route.adapter
            key = adapter.keys.current
            if key is None:  # its last key was retired by another request since the walk chose it
                skip.add(route)
                continue
            attempts += 1
            ctx.deployment = route.id
            try:
                payload = adapter.encode_body(op, ctx.body, route.target)
            except GatewayError as exc:
                ctx.attempts.append((route.id, "invalid"))
                if attempts == 1:
                    await send_error(ctx, send, exc)  # the client's request: no other deployment changes that
                    return
                skip.add(route)
                last = exc
                continue
            headers, trace, span = key.headers, ctx.trace, None
            if trace is not None:
                kind = str(type(adapter.config).__struct_config__.tag)
                span = trace.attempt(op.value, kind, route.id, route.target.model, attempts)
                headers = [*headers, *trace.headers(span)]
            sent = time.perf_counter()
            try:
                path = adapter.target(op, route.target)
                response = await route.pool.request(b"POST", path, headers, payload)
            except UpstreamError as exc:
                rid = ctx.request_id.decode()
                log.warning("upstream %s failed (request %s): %s", route.id, rid, exc.message)
                ctx.attempts.append((route.id, "timeout" if isinstance(exc, UpstreamTimeout) else "error"))
                self.breakers.note_error(route.id, exc.message)
                self.breakers.record(route.id, Outcome.FAILURE, probe=probe)
                if trace is not None and span is not None:
                    trace.end_attempt(span, None, type(exc).__name__)
                if isinstance(exc, UpstreamTimeout):
                    skip.add(route)
                last = exc
                continue
            del payload  # written: orjson's output holds a 4 KiB buffer, not to be kept for a whole stream
            waited = time.perf_counter() - sent
            route.observe(waited)
            try:
                if response.status < 400:
                    ctx.attempts.append((route.id, "ok"))
                    self.breakers.record(route.id, Outcome.SUCCESS, probe=probe)
                    await self.relay(ctx, route, response, send, waited, attempts)
                    return
                failed = await read_error(ctx, route, response)
            finally:
                await response.aclose()
                if trace is not None and span is not None:
                    trace.end_attempt(span, response.status, usage=ctx.usage)
            ctx.attempts.append((route.id, str(failed.status)))
            outcome = Outcome.of_status(failed.status)
            self.breakers.record(route.id, outcome, probe=probe)
            last = failed
            if response.status in adapter.refused_key_statuses and adapter.keys.several:
                # The provider refused the key, not the request: retire it, then the same deployment
                # on its next key, or (none left) the plan's next deployment.
                adapter.keys.retire(key)
                if adapter.keys.current is not None:
                    key_refused = True
                else:
                    skip.add(route)
                    last = unavailable(ctx.model, [route])
                continue
            if outcome is Outcome.CLIENT_ERROR:
                break  # the request itself is wrong: another deployment would say the same
            if outcome is Outcome.RATE_LIMITED:
                adapter.keys.rotate(key)  # this key's limit is met: the next request (and retry) on the next
            self.breakers.note_error(route.id, f"HTTP {failed.status}")
        if isinstance(last, Failed):
            headers = [*last.headers, *ctx.headers(), *self.route_info(last.route, attempts)]
            await send_failure(ctx, send, last.status, last.body, headers)
            return
        await send_error(ctx, send, last or unavailable(ctx.model, plan))

    async def next_route(self, plan: list[Route], start: int, skip: set[Route]) -> tuple[Route | None, bool]:
        """The first deployment from `start` on that has a usable key and the breaker admits, and
        whether it is a probe."""
        for route in plan[start:]:
            if route in skip or route.adapter.keys.current is None:
                continue
            admission = await self.breakers.admit(route.id)
            if admission is not Admission.REJECT:
                return route, admission is Admission.PROBE
        return None, False

    def route_info(self, route: Route, attempts: int) -> list[tuple[bytes, bytes]]:
        if not self.route_headers:
            return []
        return [(b"x-gateway-deployment", route.id.encode()), (b"x-gateway-attempts", b"%d" % attempts)]

    async def relay(
        self,
        ctx: RequestContext,
        route: Route,
        response: UpstreamResponse,
        send: Send,
        waited: float,
        attempts: int,
    ) -> None:
        op = ctx.operation
        assert op is not None
        adapter = route.adapter
        headers = [(k, v) for k, v in response.headers if k in _RELAYED]
        translator = adapter.stream_translator(op, ctx.body) if ctx.body.get("stream") is True else None
        body = None
        if translator is not None:
            headers = list(SSE_HEADERS)
        elif adapter.translates or any(k == b"content-length" for k, _ in headers):
            try:
                body = await response.read()
                if adapter.translates:  # may raise: a provider can report a failure inside a 200
                    body = adapter.translate_response(op, ctx.body, body)
                    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            except GatewayError as exc:
                await send_error(ctx, send, exc)
                return
        now = time.perf_counter()
        ctx.overhead = now - ctx.started - waited
        if not ctx.responded:  # else heartbeats sent the head (and nothing awaits between check and send)
            headers += ctx.headers()
            headers += self.route_info(route, attempts)
            headers.append((b"x-gateway-overhead-ms", b"%.3f" % (ctx.overhead * 1000)))
            ctx.responded = True
            ctx.status = response.status
            ctx.first_byte = now
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if body is not None:
            self.count(ctx, find_usage(body))  # before the end goes out: a client that saw it sees it counted
            await send({"type": "http.response.body", "body": body})
            ctx.complete = True
            return
        previous = last = b""
        events = 0
        try:
            async for chunk in response:
                if translator is not None:
                    chunk = translator.feed(chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if not events:
                    ctx.first_token = time.perf_counter()
                events += chunk.count(b"data:")
                previous, last = last, chunk
        except UpstreamError as exc:
            # Too late for a status code or another deployment: end the stream with an error event.
            rid = ctx.request_id.decode()
            log.warning("upstream %s stream broke (request %s): %s", route.id, rid, exc.message)
            self.breakers.record(route.id, Outcome.FAILURE)
            self.count(ctx, seen_usage(translator, previous + last))  # its tokens, if the usage came first
            await send({"type": "http.response.body", "body": error_event(exc.body())})
            return
        except asyncio.CancelledError:
            # The client went away: often just after `[DONE]`, before the upstream's own end came,
            # so the usage event it asked for (or the gateway did) may well be in already.
            self.count(ctx, seen_usage(translator, previous + last))
            raise
        finally:
            ctx.streamed = events  # also when the client went away (cancelled) mid-stream
        end = translator.finish() if translator else b""
        self.count(ctx, seen_usage(translator, previous + last + end))
        await send({"type": "http.response.body", "body": end})
        # An error event (ours, a translator's, or the upstream's own) means the answer is not whole.
        ctx.complete = b'"error"' not in last + end

    def count(self, ctx: RequestContext, usage: tuple[int, int] | None) -> None:
        if usage is not None:
            ctx.usage = usage
            ctx.tokens = usage[0] + usage[1]
        if ctx.policy is not None:
            self.usage.add(ctx.policy.key_id, ctx.model, usage)


def unavailable(alias: str, plan: list[Route]) -> ServiceUnavailable:
    """The answer when no deployment could be tried: breakers open, or providers without a usable key."""
    keyless = sorted({r.adapter.name for r in plan if r.adapter.keys.current is None})
    if not keyless:
        return ServiceUnavailable(
            f"Every deployment of model `{alias}` is unavailable (circuit open); try again shortly.",
            code="deployments_unavailable",
        )
    names = ", ".join(f"'{name}'" for name in keyless)
    which = f"provider {names} has" if len(keyless) == 1 else f"providers {names} have"
    every = len(keyless) == len({r.adapter.name for r in plan})
    rest = "" if every else ", and the others' circuits are open"
    return ServiceUnavailable(
        f"Every deployment of model `{alias}` is unavailable: {which} no usable API key left "
        f"(the upstream refused every one){rest}.",
        code="provider_keys_exhausted",
    )


def seen_usage(translator: StreamTranslator | None, tail: bytes) -> tuple[int, int] | None:
    """A stream's usage so far: its translator's count (it may have kept the usage event from the
    client), else the usage event in the stream's last reads."""
    usage = translator.usage if translator is not None else None
    return usage or find_usage(tail)
