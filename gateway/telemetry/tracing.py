"""OpenTelemetry traces: a server span per request, a client span per upstream attempt.

Off unless `telemetry.tracing.enabled`, or the standard OpenTelemetry environment asks for it
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, `OTEL_SDK_DISABLED` not
true, `OTEL_TRACES_EXPORTER` not `none`). When off, `TracingMiddleware` is not in the stack and
`ctx.trace` stays None: the hot path pays one attribute test in the forwarder, nothing else.

When on, the W3C `traceparent`/`tracestate` of the client is continued (a malformed one is
ignored: a new trace starts), sampling is parent-based with a ratio (`sample_ratio`, or
`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`), spans go out in batches from the SDK's own thread
over OTLP (http/protobuf or grpc), and an exporter that fails is reported once per interval in the
log, never per request. The trace id goes back to the client as `x-trace-id` and into the access
log. Prompts and answers never go into spans: the gateway does not parse what it relays.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TracingConfig
from gateway.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("gateway.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
_WARN_EVERY_S = 60.0
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes, every few seconds
# OpenTelemetry GenAI semantic conventions: the operation names, by our operation's path.
_OPERATION = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "images/generations": "generate_content",
}
# ... and the provider names, by our provider kind (the kind itself where the convention has none).
_PROVIDER = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "anthropic": "anthropic",
    "cohere": "cohere",
}


def env_wants_tracing(env: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry environment alone switches tracing on."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class QuietExporter(SpanExporter):
    """The OTLP exporter, its failures logged once per interval (they happen on the SDK's thread)."""

    def __init__(self, inner: SpanExporter, every_s: float = _WARN_EVERY_S) -> None:
        self.inner = inner
        self.every_s = every_s
        self.failures = 0
        self._logged = -every_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            log.debug("span export raised", exc_info=exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.FAILURE:
            self.failures += 1
            now = time.monotonic()
            if now - self._logged >= self.every_s:
                self._logged = now
                log.warning(
                    "tracing: spans not exported (%d failed batches so far); is the OTLP endpoint up?",
                    self.failures,
                )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def otlp_exporter(protocol: str, endpoint: str, timeout_s: float) -> SpanExporter:
    """The OTLP span exporter for `protocol`; an empty `endpoint` leaves it to the OTEL_* environment."""
    options: dict[str, Any] = {"timeout": timeout_s}
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc(endpoint=endpoint or None, **options)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # as OTEL_EXPORTER_OTLP_ENDPOINT is read
    return Http(endpoint=endpoint or None, **options)


class Tracing:
    """The tracer provider of one gateway process and the spans it makes."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        service_name: str = "",
        sampler: Sampler | None = None,
        schedule_delay_ms: int = 1000,
    ) -> None:
        attributes = {"service.name": service_name} if service_name else {}
        # The exporters log every failed batch and retry; QuietExporter says it once a minute instead.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        self.exporter = QuietExporter(exporter)
        # sampler None: the SDK reads OTEL_TRACES_SAMPLER (default parent-based, always on).
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        self.provider.add_span_processor(
            BatchSpanProcessor(self.exporter, schedule_delay_millis=schedule_delay_ms)
        )
        self.tracer = self.provider.get_tracer("gateway")

    @staticmethod
    def sampler(ratio: float | None, env: Mapping[str, str]) -> Sampler | None:
        """Parent-based ratio sampling from config, unless OTEL_TRACES_SAMPLER names another."""
        if ratio is None or env.get("OTEL_TRACES_SAMPLER"):
            return None
        return ParentBased(TraceIdRatioBased(ratio))

    def start_request(self, scope: Scope) -> RequestTrace:
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode()] = value.decode("latin-1")
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"{scope['method']} {scope['path']}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        )
        return RequestTrace(self.tracer, span)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's server span, the parent of its attempt spans (`ctx.trace`)."""

    __slots__ = ("recording", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self.tracer = tracer
        self.span = span
        self.recording = span.is_recording()  # sampled: only then are attributes and children worth making

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.span.get_span_context().span_id, "016x")

    def attempt(
        self, operation: str, provider_kind: str, deployment: str, model: str, attempt: int
    ) -> Span | None:
        """A client span for one upstream attempt, with the GenAI attributes known before it; None
        when the request is not sampled (its upstream still gets the trace, naming the server span)."""
        if not self.recording:
            return None
        name = _OPERATION.get(operation, operation)
        return self.tracer.start_span(
            f"{name} {model}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": name,
                "gen_ai.provider.name": _PROVIDER.get(provider_kind, provider_kind),
                "gen_ai.request.model": model,
                "gateway.deployment": deployment,
                "gateway.attempt": attempt,
            },
        )

    def store_call(self, scripts: str) -> Span | None:
        """A client span for one store round trip before the upstream call (`scripts`: what it runs)."""
        if not self.recording:
            return None
        return self.tracer.start_span(
            "store " + scripts,
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={"db.operation.name": "EVALSHA", "gateway.scripts": scripts},
        )

    @staticmethod
    def end_store(span: Span | None, error: BaseException | None) -> None:
        if span is None:
            return
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def headers(self, span: Span | None) -> list[tuple[bytes, bytes]]:
        """W3C `traceparent` (and `tracestate`) for the upstream request: the attempt's span, else
        the server's. Written here: the SDK's propagator costs several µs per call."""
        context = (span or self.span).get_span_context()
        parent = b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags)
        headers = [(b"traceparent", parent)]
        if context.trace_state:
            headers.append((b"tracestate", context.trace_state.to_header().encode()))
        return headers

    @staticmethod
    def end_attempt(
        span: Span | None, status: int | None, error: str = "", usage: tuple[int, int] | None = None
    ) -> None:
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage[0])
            span.set_attribute("gen_ai.usage.output_tokens", usage[1])
        if error or (status is not None and status >= 400):
            span.set_attribute("error.type", error or str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class TracingMiddleware:
    """Starts each HTTP request's server span and ends it once the answer has gone out."""

    def __init__(self, app: ASGIApp, *, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = scope.get("gateway")
        if scope["type"] != "http" or ctx is None or scope["path"] in _UNTRACED:
            await self.app(scope, receive, send)
            return
        request = ctx.trace = self.tracing.start_request(scope)
        ctx.extra_headers.append((b"x-trace-id", request.trace_id.encode()))
        try:
            await self.app(scope, receive, send)
        finally:
            if request.recording:
                self.describe(request.span, ctx)
            request.span.end()

    @staticmethod
    def describe(span: Span, ctx: Any) -> None:  # ctx: RequestContext (context.py imports this module)
        """The request's outcome and decisions, as attributes of its server span."""
        span.set_attribute("http.response.status_code", ctx.status)
        for name, value in (("gen_ai.request.model", ctx.model), ("gateway.key", ctx.identity)):
            if value:
                span.set_attribute(name, value)
        if ctx.cache:
            span.set_attribute("gateway.cache", "coalesced" if ctx.coalesced else ctx.cache.decode())
        if ctx.admission is not None or ctx.refused:  # the limits' decision
            span.set_attribute("gateway.limits", f"refused {ctx.refused}" if ctx.refused else "admitted")
        if ctx.attempts:  # the breaker's and the router's: where each attempt went, and how it ended
            span.set_attribute("gateway.attempts", [f"{d} {outcome}" for d, outcome in ctx.attempts])
        if ctx.without_store:
            span.set_attribute("gateway.without_store", list(ctx.without_store))
        if ctx.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ctx.usage[0])
            span.set_attribute("gen_ai.usage.output_tokens", ctx.usage[1])
        if ctx.status >= 500 or (ctx.status == 200 and not ctx.complete and ctx.responded):
            span.set_status(Status(StatusCode.ERROR))


def build(settings: TracingConfig, env: Mapping[str, str] | None = None) -> Tracing | None:
    """The process's tracing from `telemetry.tracing` and the environment; None when it is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None  # the standard off switch wins over the config too
    if not (settings.enabled or env_wants_tracing(env)):
        return None
    protocol = settings.protocol or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    exporter = otlp_exporter(protocol, settings.endpoint, settings.timeout_s)
    return Tracing(
        exporter,
        service_name=settings.service_name or env.get("OTEL_SERVICE_NAME", "") or "gateway",
        sampler=Tracing.sampler(settings.sample_ratio, env),
    )
