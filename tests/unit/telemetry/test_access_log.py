from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from gateway.errors import AuthenticationError
from gateway.telemetry.access_log import AccessLogMiddleware
from tests.unit.asgi import call, scope


def test_one_json_line_per_request_with_context(caplog: pytest.LogCaptureFixture) -> None:
    async def app(s: Any, receive: Any, send: Any) -> None:
        ctx = s["gateway"]
        ctx.model = "gpt-mini"
        ctx.deployment = "oai/gpt-4o-mini"
        await ctx.send_error(send, AuthenticationError("no"))

    with caplog.at_level(logging.INFO, "gateway.access"):
        asyncio.run(call(AccessLogMiddleware(app), scope(), [b"{}"]))
    (record,) = caplog.records
    line = json.loads(record.getMessage())
    assert line["request_id"] == "req_test" and line["status"] == 401
    assert line["model"] == "gpt-mini" and line["deployment"] == "oai/gpt-4o-mini"
    assert line["path"] == "/v1/chat/completions" and line["key"] is None and line["latency_ms"] >= 0


def test_logged_even_when_the_app_raises(caplog: pytest.LogCaptureFixture) -> None:
    async def app(s: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.INFO, "gateway.access"), pytest.raises(RuntimeError):
        asyncio.run(call(AccessLogMiddleware(app), scope(), [b"{}"]))
    assert json.loads(caplog.records[0].getMessage())["status"] == 0


def test_silent_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    async def app(s: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with caplog.at_level(logging.WARNING, "gateway.access"):
        asyncio.run(call(AccessLogMiddleware(app), scope(), [b"{}"]))
    assert caplog.records == []


TRACE = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _answered(s: Any) -> None:
    ctx = s["gateway"]
    ctx.model, ctx.deployment, ctx.status, ctx.identity = "main", "oai/gpt-x", 200, "team-a"
    ctx.usage = (1000, 500)
    ctx.cache = b"miss"
    ctx.first_byte, ctx.overhead = 0.002, 0.0004
    ctx.attempts = [("oai/gpt-x", "503"), ("oai/gpt-x", "ok")]
    ctx.refused = ""
    ctx.without_store = ("limits",)


def test_the_line_carries_ttfb_tokens_cost_cache_attempts_limits_and_trace(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.context import Admission
    from gateway.telemetry.metrics import Metrics

    metrics = Metrics()
    metrics.configure(key_names=(), max_key_names=10, aliases=["main"], deployments={}, prices={"main": (2.0, 4.0)})

    async def app(s: Any, receive: Any, send: Any) -> None:
        _answered(s)
        s["gateway"].admission = Admission("", 0, 0)
        assert list(metrics.inflight.values()) == [s]  # in flight while it is served

    middleware = AccessLogMiddleware(app, metrics=metrics, operations={"/v1/chat/completions": "chat"})
    with caplog.at_level(logging.INFO, "gateway.access"):
        asyncio.run(call(middleware, scope(headers=[(b"traceparent", TRACE)]), [b"{}"]))
    line = json.loads(caplog.records[0].getMessage())
    assert line["ttfb_ms"] == 2.0 and line["overhead_ms"] == 0.4
    assert line["tokens"] == {"input": 1000, "output": 500} and line["cost_usd"] == 0.004
    assert line["cache"] == "miss" and line["attempts"] == ["oai/gpt-x 503", "oai/gpt-x ok"]
    assert line["limits"] == "admitted" and line["without_store"] == ["limits"]
    assert (line["trace_id"], line["span_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert metrics.inflight == {}
    assert [row[0] for row in metrics.counts.rows.values()] == [1]


@pytest.mark.parametrize(
    "header",
    [b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
     b"00-4bf92f35-00f067aa0ba902b7-01", b"garbage"],
)
def test_a_malformed_traceparent_is_left_out(caplog: pytest.LogCaptureFixture, header: bytes) -> None:
    async def app(s: Any, receive: Any, send: Any) -> None:
        s["gateway"].status = 200

    with caplog.at_level(logging.INFO, "gateway.access"):
        asyncio.run(call(AccessLogMiddleware(app), scope(headers=[(b"traceparent", header)]), [b"{}"]))
    line = json.loads(caplog.records[0].getMessage())
    assert "trace_id" not in line and "span_id" not in line


def test_a_refusal_names_its_limit(caplog: pytest.LogCaptureFixture) -> None:
    async def app(s: Any, receive: Any, send: Any) -> None:
        s["gateway"].refused = "rpm"

    with caplog.at_level(logging.INFO, "gateway.access"):
        asyncio.run(call(AccessLogMiddleware(app), scope(), [b"{}"]))
    assert json.loads(caplog.records[0].getMessage())["limits"] == "refused rpm"


def test_requests_off_the_api_paths_are_not_counted() -> None:
    from gateway.telemetry.metrics import Metrics

    metrics = Metrics()

    async def app(s: Any, receive: Any, send: Any) -> None:
        assert metrics.inflight == {}

    middleware = AccessLogMiddleware(app, access_log=False, metrics=metrics, operations={"/v1/chat/completions": "chat"})
    asyncio.run(call(middleware, scope("/healthz", "GET"), [b""]))
    assert metrics.counts.rows == {}
