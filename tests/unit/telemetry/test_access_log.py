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
