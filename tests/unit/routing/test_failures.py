"""How a failed request ends: a JSON error answer, or the stream's final error event."""

from __future__ import annotations

import orjson
import pytest

from gateway.context import RequestContext
from gateway.errors import UpstreamTimeout
from gateway.routing.failures import send_error, send_failure
from gateway.types import Message

pytestmark = pytest.mark.anyio


async def test_before_the_head_a_failure_is_a_json_answer() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    ctx = RequestContext(b"req_1", 0.0)
    await send_error(ctx, send, UpstreamTimeout("upstream timed out"))
    assert sent[0]["status"] == 504 and ctx.status == 504 and ctx.responded
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json" and headers[b"x-request-id"] == b"req_1"
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "upstream_timeout"


async def test_after_the_head_a_failure_is_the_last_sse_event() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    ctx = RequestContext(b"req_2", 0.0)
    ctx.responded, ctx.status = True, 200  # heartbeats sent the head
    body = b'{"error":{"message":"m","type":"server_error","param":null,"code":null}}'
    await send_failure(ctx, send, 500, body, [])
    assert sent == [{"type": "http.response.body", "body": b"event: error\ndata: " + body + b"\n\n"}]
    assert ctx.status == 500  # the access log's status is the failure's
