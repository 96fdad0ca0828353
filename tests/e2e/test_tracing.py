"""Traces from a real gateway process, configured by the standard OpenTelemetry environment alone,
received over OTLP/HTTP and decoded from protobuf as a collector would."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.mock_openai import MockOpenAI
from tests.otlp_receiver import OTLPReceiver

from .conftest import TEAM_B_KEY, GatewayFactory, default_config, free_port

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SERVER, CLIENT = 2, 3  # the protobuf's SpanKind values


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


def test_spans_reach_the_collector_and_the_trace_reaches_the_upstream(
    gateway_factory: GatewayFactory, mock_upstream: MockOpenAI, receiver: OTLPReceiver
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "gw-e2e"}
    gw = gateway_factory(default_config(mock_upstream), env=env)
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    client = gw.client(default_headers={"traceparent": traceparent, "tracestate": "vendor=1"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-mini", messages=[{"role": "user", "content": f"trace me {uuid.uuid4().hex}"}]
    )
    assert raw.headers["x-trace-id"] == CLIENT_TRACE
    stream = client.chat.completions.create(
        model="gpt-mini", messages=[{"role": "user", "content": "stream me"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # A malformed traceparent is ignored: a trace of its own, and a normal answer.
    bad = gw.client(default_headers={"traceparent": "00-zzzz"}).chat.completions.with_raw_response.create(
        model="gpt-mini", messages=[{"role": "user", "content": "bad parent"}]
    )
    assert bad.http_response.status_code == 200 and len(bad.headers["x-trace-id"]) == 32
    assert bad.headers["x-trace-id"] != CLIENT_TRACE

    spans = receiver.wait_for(6)
    servers = [s for s in spans if s.kind == SERVER and s.trace_id == CLIENT_TRACE]
    attempts = [s for s in spans if s.kind == CLIENT and s.trace_id == CLIENT_TRACE]
    assert len(servers) == 2 and len(attempts) == 2, spans
    for server, attempt in zip(servers, attempts, strict=True):
        assert server.parent_span_id == CLIENT_SPAN and server.name == "POST /v1/chat/completions"
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["gen_ai.request.model"] == "gpt-mini"
        assert server.attributes["gateway.key"] == "team-a"
        assert server.resource["service.name"] == "gw-e2e"
        assert attempt.parent_span_id == server.span_id
        assert attempt.name == "chat mock-gpt-upstream"
        assert attempt.attributes["gen_ai.operation.name"] == "chat"
        assert attempt.attributes["gen_ai.provider.name"] == "openai"
        assert attempt.attributes["gen_ai.request.model"] == "mock-gpt-upstream"
        assert attempt.attributes["gen_ai.usage.input_tokens"] > 0
        assert attempt.attributes["http.response.status_code"] == 200
    # The upstream continued each attempt's span, in the client's trace; the client's tracestate too.
    sent = [r for r in mock_upstream.requests if r.path == "/v1/chat/completions"][:2]
    assert [r.header("traceparent") for r in sent] == [f"00-{CLIENT_TRACE}-{a.span_id}-01" for a in attempts]
    assert all(r.header("tracestate") == "vendor=1" for r in sent)
    # The access log names the trace and the server span.
    lines = [
        json.loads(line[line.index("{") :])
        for line in gw.log_text().splitlines()
        if "gateway.access:" in line
    ]
    assert {(line.get("trace_id"), line.get("span_id")) for line in lines} >= {
        (CLIENT_TRACE, s.span_id) for s in servers
    }


def test_a_failed_attempt_is_an_error_span_and_the_failover_a_second_one(
    gateway_factory: GatewayFactory, mock_upstream: MockOpenAI, receiver: OTLPReceiver
) -> None:
    config = default_config(mock_upstream)
    config["models"].append(
        {
            "name": "gpt-failover",
            "deployments": [
                {"provider": "dead", "model": "dead-model"},
                {"provider": "mock", "model": "mock-gpt-upstream"},
            ],
        }
    )
    config["router"].update(retries=0, failover=True)
    config["telemetry"] = {"tracing": {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 1.0}}
    gw = gateway_factory(config)
    raw = gw.client(TEAM_B_KEY).chat.completions.with_raw_response.create(
        model="gpt-failover", messages=[{"role": "user", "content": "fail over"}]
    )
    trace_id = raw.headers["x-trace-id"]
    spans = [s for s in receiver.wait_for(3) if s.trace_id == trace_id]
    (server,) = [s for s in spans if s.kind == SERVER]
    dead, ok = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.attributes["gateway.attempt"])
    assert dead.attributes["gateway.deployment"] == "dead/dead-model" and dead.status_code == 2
    assert dead.attributes["error.type"]
    assert ok.attributes["gateway.deployment"] == "mock/mock-gpt-upstream" and ok.status_code != 2
    assert dead.parent_span_id == ok.parent_span_id == server.span_id


def test_an_unreachable_collector_costs_the_requests_nothing(
    gateway_factory: GatewayFactory, mock_upstream: MockOpenAI
) -> None:
    config = default_config(mock_upstream)
    endpoint = f"http://127.0.0.1:{free_port()}"
    config["telemetry"] = {"tracing": {"enabled": True, "endpoint": endpoint, "timeout_s": 0.5}}
    gw = gateway_factory(config)
    client = gw.client()
    for i in range(20):
        answer = client.chat.completions.create(
            model="gpt-mini", messages=[{"role": "user", "content": f"n{i}"}]
        )
        assert answer.choices[0].message.content
    deadline = time.monotonic() + 10
    while "tracing: spans not exported" not in gw.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # more failed batches may come: they are not logged again within the minute
    log = gw.log_text()
    assert log.count("tracing: spans not exported") == 1 and "Transient error" not in log
