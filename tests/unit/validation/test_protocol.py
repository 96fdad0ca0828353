"""The uvicorn protocol stops a head past the bound while it arrives; a head within it goes on."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.validation.protocol import DEFAULT_MAX_HEAD_BYTES, BoundedHttpToolsProtocol

pytestmark = pytest.mark.anyio

BOUND = 1000


class Transport:
    """What the protocol writes, and whether it closed; reads never pause in a test."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def connect(bound: int | None = BOUND) -> tuple[BoundedHttpToolsProtocol, Transport]:
    config = Config(app=ok_app, h11_max_incomplete_event_size=bound, log_config=None, lifespan="off")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def refusal(transport: Transport) -> dict[str, Any]:
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head and b"x-request-id: req_" in head
    assert transport.closed
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
    return error


async def test_a_head_still_arriving_past_the_bound_is_431_and_closed() -> None:
    protocol, transport = connect()
    first = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: "
    protocol.data_received(first)
    for _ in range((BOUND - len(first)) // 100):
        protocol.data_received(b"a" * 100)
    assert transport.written == b"" and not transport.closed  # at the bound, not past it
    protocol.data_received(b"a" * 100)
    assert f"limit of {BOUND} bytes" in refusal(transport)["message"]


async def test_a_head_within_the_bound_reaches_the_app() -> None:
    protocol, transport = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n")
    protocol.data_received(b"x-pad: " + b"a" * 500 + b"\r\n\r\n")
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed


async def test_a_large_head_arriving_at_once_is_left_to_the_middleware() -> None:
    # A read holding a whole head is not this layer's business: the middleware checks its lines.
    protocol, transport = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (2 * BOUND) + b"\r\n\r\n")
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 200 ")


async def test_a_large_body_after_a_small_head_is_not_counted() -> None:
    protocol, transport = connect()
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
    for _ in range(5):
        protocol.data_received(b"x" * 1000)
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 200 ")


async def test_the_next_request_on_the_connection_is_bounded_again() -> None:
    protocol, transport = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    transport.written = b""
    protocol.data_received(b"GET / HTTP/1.1\r\nx-big: ")  # a new head begins: not counted in this read
    for _ in range(BOUND // 100 + 1):
        protocol.data_received(b"a" * 100)
    refusal(transport)


@pytest.mark.parametrize("bound", [None, 0])
async def test_no_bound_configured_means_the_default(bound: int | None) -> None:
    protocol, _ = connect(bound)
    assert protocol.max_head_bytes == DEFAULT_MAX_HEAD_BYTES



class CountingTransport(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def counted(app: Any) -> tuple[BoundedHttpToolsProtocol, CountingTransport]:
    config = Config(app=app, log_config=None, lifespan="off")
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = CountingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def test_a_head_and_the_body_sent_after_it_leave_in_one_write() -> None:
    protocol, transport = counted(ok_app)
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.01)
    (written,) = transport.writes
    assert written.startswith(b"HTTP/1.1 200 ") and written.endswith(b"\r\n\r\nok")
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # and so does the next response
    await asyncio.sleep(0.01)
    assert len(transport.writes) == 2 and transport.writes[1] == written


async def test_a_head_whose_body_comes_later_is_written_at_the_end_of_its_loop_turn() -> None:
    body = asyncio.Event()

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await body.wait()
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    protocol, transport = counted(stream)
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    for _ in range(3):  # the task starts, sends the head, the turn ends
        await asyncio.sleep(0)
    assert len(transport.writes) == 1 and transport.written.startswith(b"HTTP/1.1 200 ")
    assert transport.written.endswith(b"transfer-encoding: chunked\r\n\r\n")
    body.set()
    await asyncio.sleep(0.01)
    assert transport.writes[1:] == [b"4\r\nlate\r\n0\r\n\r\n"]


async def test_a_held_head_is_written_before_the_cycle_closes_the_connection() -> None:
    async def closing(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b""})

    protocol, transport = counted(closing)
    protocol.data_received(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 204 ") and transport.closed
