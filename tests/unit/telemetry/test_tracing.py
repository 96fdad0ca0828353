"""Traces: when they are on, the server span, W3C context in and out, and an exporter that fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import TracingConfig
from gateway.errors import AuthenticationError
from gateway.telemetry.tracing import (
    QuietExporter,
    RequestTrace,
    Tracing,
    TracingMiddleware,
    build,
    env_wants_tracing,
)
from tests.unit.asgi import call, scope

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{PARENT_TRACE}-00f067aa0ba902b7-01".encode()


def traced(sampler: Any = None) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing(exporter, service_name="gw-test", sampler=sampler, schedule_delay_ms=10), exporter


def spans(tracing: Tracing, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    tracing.provider.force_flush()
    return exporter.get_finished_spans()


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_the_standard_environment_switches_tracing_on(env: dict[str, str], on: bool) -> None:
    assert env_wants_tracing(env) is on
    tracing = build(TracingConfig(), env)
    assert (tracing is not None) is on
    if tracing is not None:
        tracing.shutdown()


def test_off_by_default_and_the_sdk_off_switch_beats_the_config() -> None:
    assert build(TracingConfig(), {}) is None
    assert build(TracingConfig(enabled=True), {"OTEL_SDK_DISABLED": "true"}) is None
    tracing = build(TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", protocol="grpc"), {})
    assert tracing is not None
    tracing.shutdown()


def test_config_ratio_unless_the_environment_names_a_sampler() -> None:
    assert Tracing.sampler(None, {}) is None
    assert "0.25" in Tracing.sampler(0.25, {}).get_description()  # type: ignore[union-attr]
    assert Tracing.sampler(0.25, {"OTEL_TRACES_SAMPLER": "always_on"}) is None


async def answer(s: Any, receive: Any, send: Any) -> None:
    ctx = s["gateway"]
    ctx.model, ctx.identity, ctx.usage = "gpt-mini", "team-a", (3, 2)
    ctx.cache, ctx.coalesced, ctx.refused = b"hit", True, ""
    ctx.attempts = [("dead/m", "error"), ("oai/gpt-4o-mini", "ok")]
    await send({"type": "http.response.start", "status": 200, "headers": ctx.headers()})
    await send({"type": "http.response.body", "body": b"{}"})
    ctx.status, ctx.responded, ctx.complete = 200, True, True


def test_a_server_span_per_request_continuing_the_clients_trace() -> None:
    tracing, exporter = traced()
    result = asyncio.run(
        call(
            TracingMiddleware(answer, tracing=tracing),
            scope(headers=[(b"traceparent", TRACEPARENT)]),
            [b"{}"],
        )
    )
    (span,) = spans(tracing, exporter)
    assert span.kind is SpanKind.SERVER and span.name == "POST /v1/chat/completions"
    assert format(span.context.trace_id, "032x") == PARENT_TRACE
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert result.headers[b"x-trace-id"] == PARENT_TRACE.encode()
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 200 and attributes["gen_ai.request.model"] == "gpt-mini"
    assert attributes["gen_ai.usage.input_tokens"] == 3 and attributes["gen_ai.usage.output_tokens"] == 2
    assert span.resource.attributes["service.name"] == "gw-test"
    assert attributes["gateway.cache"] == "coalesced" and "gateway.limits" not in attributes  # no limits here
    assert attributes["gateway.attempts"] == ("dead/m error", "oai/gpt-4o-mini ok")
    tracing.shutdown()


@pytest.mark.parametrize("bad", [b"garbage", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"ff-zz"])
def test_a_malformed_traceparent_starts_a_new_trace(bad: bytes) -> None:
    tracing, exporter = traced()
    result = asyncio.run(
        call(TracingMiddleware(answer, tracing=tracing), scope(headers=[(b"traceparent", bad)]), [b"{}"])
    )
    (span,) = spans(tracing, exporter)
    assert result.status == 200 and span.parent is None
    assert format(span.context.trace_id, "032x") == result.headers[b"x-trace-id"].decode() != "0" * 32
    tracing.shutdown()


def test_errors_and_broken_streams_mark_the_span() -> None:
    async def refuse(s: Any, receive: Any, send: Any) -> None:
        s["gateway"].refused = "rpm"
        await s["gateway"].send_error(send, AuthenticationError("no"))

    async def broken(s: Any, receive: Any, send: Any) -> None:
        ctx = s["gateway"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        ctx.status, ctx.responded, ctx.complete = 200, True, False

    tracing, exporter = traced()
    asyncio.run(call(TracingMiddleware(refuse, tracing=tracing), scope(), [b"{}"]))
    asyncio.run(call(TracingMiddleware(broken, tracing=tracing), scope(), [b"{}"]))
    refused, cut = spans(tracing, exporter)
    assert refused.attributes["http.response.status_code"] == 401  # type: ignore[index]
    assert refused.attributes["gateway.limits"] == "refused rpm"  # type: ignore[index]
    assert refused.status.status_code is StatusCode.UNSET  # the client's mistake, not ours
    assert cut.status.status_code is StatusCode.ERROR
    tracing.shutdown()


def test_attempt_spans_are_children_and_carry_the_genai_attributes() -> None:
    tracing, exporter = traced()
    request = tracing.start_request(scope(headers=[(b"traceparent", TRACEPARENT)]))
    first = request.attempt("chat/completions", "anthropic", "claude/claude-3-5", "claude-3-5", 1)
    headers = dict(request.headers(first))
    RequestTrace.end_attempt(first, 529, "upstream_overloaded")
    second = request.attempt(
        "embeddings", "openai", "oai/text-embedding-3-small", "text-embedding-3-small", 2
    )
    RequestTrace.end_attempt(second, 200, usage=(7, 0))
    request.span.end()
    failed, ok, server = spans(tracing, exporter)
    assert failed.kind is SpanKind.CLIENT and failed.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert failed.name == "chat claude-3-5" and failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["gen_ai.provider.name"] == "anthropic"  # type: ignore[index]
    assert failed.attributes["error.type"] == "upstream_overloaded"  # type: ignore[index]
    assert ok.attributes["gen_ai.operation.name"] == "embeddings"  # type: ignore[index]
    assert ok.attributes["gen_ai.usage.input_tokens"] == 7  # type: ignore[index]
    # The upstream continues the attempt's span, in the client's trace.
    assert headers[b"traceparent"].startswith(b"00-" + PARENT_TRACE.encode() + b"-")
    assert format(failed.context.span_id, "016x").encode() in headers[b"traceparent"]
    tracing.shutdown()


def test_unsampled_requests_make_no_span_but_still_name_their_trace() -> None:
    tracing, exporter = traced(ALWAYS_OFF)
    result = asyncio.run(call(TracingMiddleware(answer, tracing=tracing), scope(), [b"{}"]))
    assert spans(tracing, exporter) == () and len(result.headers[b"x-trace-id"]) == 32
    # The upstream still gets the trace, unsampled, with the server span as its parent.
    request = tracing.start_request(scope(headers=[(b"traceparent", TRACEPARENT[:-2] + b"00")]))
    attempt = request.attempt("chat/completions", "openai", "oai/m", "m", 1)
    assert attempt is None and not request.recording
    (parent,) = request.headers(attempt)
    assert parent == (b"traceparent", f"00-{PARENT_TRACE}-{request.span_id}-00".encode())
    RequestTrace.end_attempt(attempt, 200)  # nothing to end
    tracing.shutdown()


class Failing(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        if self.calls % 2:
            raise ConnectionError("collector down")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_an_unreachable_exporter_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    quiet = QuietExporter(Failing(), every_s=3600)
    with caplog.at_level(logging.WARNING, "gateway.tracing"):
        results = [quiet.export([]) for _ in range(10)]
    assert results == [SpanExportResult.FAILURE] * 10 and quiet.failures == 10
    assert len([r for r in caplog.records if r.name == "gateway.tracing"]) == 1


def test_probes_and_scrapes_are_not_traced() -> None:
    tracing, exporter = traced()
    for path in ("/healthz", "/readyz", "/metrics"):
        result = asyncio.run(call(TracingMiddleware(answer, tracing=tracing), scope(path, "GET"), [b""]))
        assert result.status == 200 and b"x-trace-id" not in result.headers
    assert spans(tracing, exporter) == ()
    tracing.shutdown()
