"""The heartbeat clock: who gets a `: keep-alive`, when, and that writes never interleave."""

from __future__ import annotations

import asyncio

import pytest

from gateway.context import RequestContext
from gateway.routing.heartbeat import KEEP_ALIVE, Pulse
from gateway.types import Message

pytestmark = pytest.mark.anyio

INTERVAL = 0.01


class Client:
    """A client's side of `send`: the messages in the order written; can be made slow or gone."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.hold: asyncio.Event | None = None
        self.gone = False

    async def send(self, message: Message) -> None:
        if self.gone:
            raise OSError("client gone")
        if self.hold is not None:
            await self.hold.wait()
        self.messages.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]


async def until(condition: object, ticks: int = 200) -> None:
    for _ in range(ticks):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(INTERVAL / 2)
    raise AssertionError("condition not met")


async def test_a_silent_stream_gets_the_head_then_heartbeats() -> None:
    pulse, client, ctx = Pulse(INTERVAL), Client(), RequestContext(b"req_1", 0.0)
    beat = pulse.watch(ctx, client.send, 1.5)
    await until(lambda: client.bodies().count(KEEP_ALIVE) >= 2)
    head = client.messages[0]
    assert head["type"] == "http.response.start" and head["status"] == 200
    headers = dict(head["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream") and headers[b"x-request-id"] == b"req_1"
    assert headers[b"x-gateway-overhead-ms"] == b"1.500"
    assert ctx.responded and ctx.status == 200
    assert [m["type"] for m in client.messages].count("http.response.start") == 1
    pulse.drop(beat)


async def test_a_stream_that_writes_gets_no_heartbeat() -> None:
    pulse, client, ctx = Pulse(0.2), Client(), RequestContext(b"req_2", 0.0)
    beat = pulse.watch(ctx, client.send, 0)
    for i in range(50):  # writes far more often than the interval
        await beat.send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        await asyncio.sleep(0.01)
    pulse.drop(beat)
    assert KEEP_ALIVE not in client.bodies() and not ctx.responded


async def test_no_heartbeat_inside_a_line() -> None:
    pulse, client, ctx = Pulse(INTERVAL), Client(), RequestContext(b"req_7", 0.0)
    beat = pulse.watch(ctx, client.send, 0)
    await beat.send({"type": "http.response.start", "status": 200, "headers": []})
    await beat.send({"type": "http.response.body", "body": b'data: {"cho', "more_body": True})
    await asyncio.sleep(INTERVAL * 5)
    assert KEEP_ALIVE not in client.bodies()  # the upstream's read ended mid-line: no comment may follow
    await beat.send({"type": "http.response.body", "body": b'ices": []}\n\n', "more_body": True})
    await until(lambda: KEEP_ALIVE in client.bodies())
    assert client.bodies()[-1] == KEEP_ALIVE  # a gap after a whole event gets heartbeats
    pulse.drop(beat)


async def test_the_clock_stops_with_the_last_stream_and_restarts() -> None:
    pulse, client = Pulse(INTERVAL), Client()
    beat = pulse.watch(RequestContext(b"req_3", 0.0), client.send, 0)
    assert pulse._timer is not None
    pulse.drop(beat)
    await until(lambda: pulse._timer is None)
    beat = pulse.watch(RequestContext(b"req_4", 0.0), client.send, 0)
    await until(lambda: KEEP_ALIVE in client.bodies())
    pulse.drop(beat)


async def test_the_request_waits_for_a_heartbeat_being_written() -> None:
    pulse, client, ctx = Pulse(INTERVAL), Client(), RequestContext(b"req_5", 0.0)
    client.hold = asyncio.Event()  # a slow client: the heartbeat's head is stuck in send
    beat = pulse.watch(ctx, client.send, 0)
    await until(lambda: beat.pending is not None)
    assert ctx.responded  # marked before the heartbeat runs, so the request sends no head of its own
    write = asyncio.ensure_future(beat.send({"type": "http.response.body", "body": b"data: x\n\n"}))
    await asyncio.sleep(INTERVAL * 3)
    assert not write.done() and client.messages == []
    client.hold.set()
    await write
    assert [m.get("body") for m in client.messages[:3]] == [None, KEEP_ALIVE, b"data: x\n\n"]
    pulse.drop(beat)


async def test_a_failed_heartbeat_fails_the_requests_next_write() -> None:
    pulse, client, ctx = Pulse(INTERVAL), Client(), RequestContext(b"req_6", 0.0)
    client.gone = True
    beat = pulse.watch(ctx, client.send, 0)
    await until(lambda: beat.pending is not None and beat.pending.done())
    await asyncio.sleep(INTERVAL * 3)
    with pytest.raises(OSError, match="client gone"):
        await beat.send({"type": "http.response.body", "body": b"data: x\n\n"})
    pulse.drop(beat)
