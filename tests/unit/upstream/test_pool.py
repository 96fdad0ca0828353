"""UpstreamPool against small raw-bytes servers on loopback, on asyncio and on uvloop.

Each test builds its server's behaviour inline (a `Route`), so every edge case of
framing, keep-alive, timeouts and failure is spelled out in bytes. Tests that make
something fail end with `assert_capacity`: all slots still work at once, so a leaked
slot fails the test instead of starving a later one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import pytest

import gateway.upstream
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.upstream import Timeouts, UpstreamPool, UpstreamResponse
from gateway.upstream.connection import HIGH_WATER, Connection

pytestmark = pytest.mark.anyio

# Generous: only tests that want a timeout set short ones; a loaded CI machine once took 0.3 s to connect.
FAST = Timeouts(connect_s=2, first_byte_s=2, idle_s=2, total_s=4)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- a raw loopback upstream


@dataclass
class Request:
    method: bytes
    target: bytes
    raw: bytes


Reader: TypeAlias = asyncio.StreamReader
Writer: TypeAlias = asyncio.StreamWriter
Route = Callable[["Upstream", Reader, Writer], Awaitable[bool]]


@dataclass
class Upstream:
    """Answers /ok and /hold itself and every other target with `route` (False: close)."""

    route: Route | None
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    connections: int = 0  # accepted so far
    open: int = 0
    max_open: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    barrier: asyncio.Barrier | None = None
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def targets(self, target: bytes) -> int:
        return sum(r.target == target for r in self.requests)

    async def until_client_closes(self, reader: Reader) -> None:
        with suppress(ConnectionError):
            await reader.read()
        self.client_closed.set()

    async def serve(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                self.received.set()
                if request.target == b"/ok":
                    writer.write(OK)
                elif request.target == b"/hold":  # answered once `barrier` requests are in
                    assert self.barrier is not None
                    await self.barrier.wait()
                    writer.write(OK)
                else:
                    assert self.route is not None
                    if not await self.route(self, reader, writer):
                        break
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()
            self.tasks.discard(task)


async def read_request(reader: Reader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    method, target, _ = head.split(b" ", 2)
    body = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            body = await reader.readexactly(int(value))
    return Request(method, target, head + body)


@asynccontextmanager
async def harness(
    route: Route | None = None,
    *,
    server_ssl: ssl.SSLContext | None = None,
    scheme: str = "http",
    **options: object,
) -> AsyncIterator[tuple[Upstream, UpstreamPool]]:
    upstream = Upstream(route)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, ssl=server_ssl)
    upstream.port = server.sockets[0].getsockname()[1]
    options.setdefault("timeouts", FAST)
    options.setdefault("max_connections", 2)
    pool = UpstreamPool(f"{scheme}://127.0.0.1:{upstream.port}/v1", **options)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):  # a hang fails the test instead of the suite
            yield upstream, pool
    finally:
        await pool.aclose()
        server.close()
        if upstream.tasks:  # they end on the client's EOF; cancelling makes asyncio 3.11 log noise
            _, stuck = await asyncio.wait(upstream.tasks, timeout=1)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await server.wait_closed()


async def get(pool: UpstreamPool, target: bytes = b"/ok", method: bytes = b"GET") -> UpstreamResponse:
    return await pool.request(method, target, [])


async def assert_capacity(upstream: Upstream, pool: UpstreamPool, n: int = 2) -> None:
    """All `n` slots serve at once (a leaked slot makes one wait, then time out)."""
    upstream.barrier = asyncio.Barrier(n)
    responses = await asyncio.gather(*(get(pool, b"/hold") for _ in range(n)))
    assert [await r.read() for r in responses] == [b"ok"] * n
    assert pool.in_use == 0


# -- routes


def reply(raw: bytes, keep_open: bool = True) -> Route:
    async def route(up: Upstream, r: Reader, w: Writer) -> bool:
        w.write(raw)
        return keep_open

    return route


async def hang(up: Upstream, reader: Reader, w: Writer) -> bool:
    await up.until_client_closes(reader)
    return False


async def stall_mid_body(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
    await up.until_client_closes(r)
    return False


async def drop(up: Upstream, r: Reader, w: Writer) -> bool:
    return False


# -- surface and wire format


def test_exported_members() -> None:
    assert gateway.upstream.__all__ == ["Timeouts", "UpstreamPool", "UpstreamResponse"]
    for name in gateway.upstream.__all__:
        assert hasattr(gateway.upstream, name)


@pytest.mark.parametrize(
    ("url", "base_path", "host_header"),
    [
        ("https://api.openai.com/v1", "/v1", b"api.openai.com"),
        ("http://127.0.0.1:9000/v1/", "/v1", b"127.0.0.1:9000"),
        ("https://api.anthropic.com", "", b"api.anthropic.com"),
        ("http://Example.com:80/", "", b"example.com"),
        ("https://example.com:8443/a/b", "/a/b", b"example.com:8443"),
        ("http://[::1]:8080/v1", "/v1", b"[::1]:8080"),
    ],
)
def test_base_url(url: str, base_path: str, host_header: bytes) -> None:
    pool = UpstreamPool(url)
    assert (pool.base_path, pool.host_header) == (base_path, host_header)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("ftp://example.com", {}),
        ("http://", {}),
        ("/v1", {}),
        ("https://user:secret@example.com", {}),
        ("http://example.com/v1?x=1", {}),
        ("http://example.com", {"max_connections": 0}),
    ],
)
def test_bad_base_url_or_options(url: str, options: dict[str, int]) -> None:
    with pytest.raises(ValueError) as info:
        UpstreamPool(url, **options)  # type: ignore[arg-type]
    assert "secret" not in str(info.value)


async def test_request_bytes_on_the_wire() -> None:
    async with harness(reply(OK)) as (up, pool):
        headers = [(b"authorization", b"Bearer sk-1"), (b"content-type", b"application/json")]
        await (await pool.request(b"POST", b"/v1/chat?x=1", headers, b'{"a":1}')).read()
        await (await pool.request(b"POST", b"/v1/empty", [])).read()
        await (await pool.request(b"GET", b"/v1/models", [(b"accept", b"*/*")])).read()
    host = b"host: 127.0.0.1:%d\r\n" % up.port
    assert [r.raw for r in up.requests] == [
        b"POST /v1/chat?x=1 HTTP/1.1\r\n" + host + b"authorization: Bearer sk-1\r\n"
        b'content-type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}',
        b"POST /v1/empty HTTP/1.1\r\n" + host + b"content-length: 0\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n" + host + b"accept: */*\r\n\r\n",
    ]


# -- body framing


async def test_content_length_body_and_headers() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-Thing: A\r\nx-thing: B\r\nContent-Length: 5\r\n\r\nhello"
    async with harness(reply(raw)) as (_up, pool):
        response = await get(pool, b"/x")
        assert response.status == 201
        assert response.headers == [
            (b"content-type", b"text/plain"),
            (b"x-thing", b"A"),
            (b"x-thing", b"B"),
            (b"content-length", b"5"),
        ]
        assert await response.read() == b"hello"
        await response.aclose()  # after the end: a no-op, the connection stays pooled
        assert (pool.idle, pool.in_use) == (1, 0)


async def test_chunked_body() -> None:
    raw = CHUNKED_HEAD + chunk(b"hello ") + b"5;ext=1\r\nworld\r\n" + chunk(b"!") + b"0\r\n\r\n"
    async with harness(reply(raw)) as (up, pool):
        assert await (await get(pool, b"/x")).read() == b"hello world!"
        assert await (await get(pool, b"/x")).read() == b"hello world!"
    assert up.connections == 1


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
async def test_body_delimited_by_close(version: bytes) -> None:
    async with harness(reply(version + b" 200 OK\r\n\r\nuntil the end", keep_open=False)) as (up, pool):
        assert await (await get(pool, b"/x")).read() == b"until the end"
        assert (pool.idle, pool.in_use) == (0, 0)
        await assert_capacity(up, pool)


@pytest.mark.parametrize(
    ("method", "raw", "reused"),
    [
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n", True),
        (b"HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", False),
    ],
)
async def test_responses_without_body(method: bytes, raw: bytes, reused: bool) -> None:
    async with harness(reply(raw)) as (up, pool):
        response = await get(pool, b"/x", method)
        assert await response.read() == b""
        assert [piece async for piece in response] == []
        assert await (await get(pool)).read() == b"ok"
    assert up.connections == (1 if reused else 2)


async def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    async with harness(reply(raw)) as (_up, pool):
        response = await get(pool, b"/x")
        assert (response.status, response.headers) == (200, [(b"content-length", b"2")])
        assert await response.read() == b"hi"


# -- keep-alive


async def test_sequential_requests_reuse_one_connection() -> None:
    async with harness() as (up, pool):
        for _ in range(5):
            assert await (await get(pool)).read() == b"ok"
        assert (pool.idle, pool.in_use) == (1, 0)
    assert up.connections == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ],
)
async def test_not_reused_when_the_upstream_says_close(raw: bytes) -> None:
    async with harness(reply(raw, keep_open=False)) as (up, pool):
        for _ in range(2):
            assert await (await get(pool, b"/x")).read() == b"ok"
            assert (pool.idle, pool.in_use) == (0, 0)
    assert up.connections == 2


async def test_connection_closed_by_the_upstream_while_idle_is_replaced() -> None:
    async with harness(reply(OK, keep_open=False)) as (up, pool):
        assert await (await get(pool, b"/bye")).read() == b"ok"
        while pool.idle:  # until the EOF is seen
            await asyncio.sleep(0.005)
        assert await (await get(pool)).read() == b"ok"
        assert up.connections == 2
        await assert_capacity(up, pool)


async def test_connection_found_closing_is_not_used() -> None:
    async with harness() as (up, pool):
        await (await get(pool)).read()
        assert pool.idle == 1
        pool._idle[0].transport.close()  # as when EOF was just read: connection_lost is still to come
        assert await (await get(pool)).read() == b"ok"
        assert up.connections == 2
        await assert_capacity(up, pool)


async def test_expired_keepalive_connections_are_closed() -> None:
    async with harness(keepalive_expiry_s=0.2) as (up, pool):
        first = await asyncio.gather(get(pool), get(pool))  # two pooled connections, A and B
        for response in first:
            await response.read()
        assert pool.idle == 2
        await asyncio.sleep(0.12)
        await (await get(pool)).read()  # takes the newest, B
        await asyncio.sleep(0.12)
        await (await get(pool)).read()  # B again; A expired meanwhile and is shed on release
        assert (pool.idle, up.connections) == (1, 2)
        await asyncio.sleep(0.25)
        await (await get(pool)).read()  # B expired too: a fresh connection
        assert (pool.idle, up.connections) == (1, 3)
        while up.open > 1:
            await asyncio.sleep(0.005)


async def data_when_idle(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(OK)
    await asyncio.sleep(0.05)
    w.write(b"HTTP/1.1 200 OK\r\n")
    return True


@pytest.mark.parametrize(
    "route",
    [reply(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno"), reply(OK + b"junk"), data_when_idle],
)
async def test_unsolicited_data_drops_the_connection(route: Route) -> None:
    async with harness(route) as (up, pool):
        assert await (await get(pool, b"/x")).read() == b"ok"
        while pool.idle:
            await asyncio.sleep(0.005)
        await assert_capacity(up, pool)


# -- slots


async def slow(up: Upstream, r: Reader, w: Writer) -> bool:
    await asyncio.sleep(0.02)
    w.write(OK)
    return True


async def test_requests_wait_for_a_free_slot() -> None:
    async with harness(slow) as (up, pool):
        responses = await asyncio.gather(*(get(pool, b"/slow") for _ in range(8)))
        assert [await r.read() for r in responses] == [b"ok"] * 8
        assert (up.connections, up.max_open, pool.idle) == (2, 2, 2)


async def test_waiting_for_a_slot_is_bounded_by_connect_s() -> None:
    async with harness(hang, max_connections=1, timeouts=Timeouts(connect_s=0.1, first_byte_s=2)) as (
        up,
        pool,
    ):
        holder = asyncio.create_task(get(pool, b"/hang"))
        await up.received.wait()
        with pytest.raises(UpstreamTimeout, match=r"waiting for a free connection \(0.1s\)"):
            await get(pool)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await assert_capacity(up, pool, 1)


async def test_cancelled_just_after_being_handed_a_slot() -> None:
    async with harness(stall_mid_body, max_connections=1) as (up, pool):
        first = await get(pool, b"/stall")
        waiting = asyncio.create_task(get(pool))
        await asyncio.sleep(0.02)
        await first.aclose()  # frees the slot: handed to `waiting`, which is not yet running
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.in_use == 0
        await assert_capacity(up, pool, 1)


async def test_a_slot_freed_by_a_failure_goes_to_a_waiter() -> None:
    async with harness(stall_mid_body, max_connections=1) as (up, pool):
        first = await get(pool, b"/stall")
        waiting = asyncio.create_task(get(pool))
        await asyncio.sleep(0.02)
        await first.aclose()
        assert await (await waiting).read() == b"ok"
        assert up.connections == 2


async def ok_then_junk(up: Upstream, r: Reader, w: Writer) -> bool:
    await asyncio.sleep(0.05)  # until another request waits for the slot
    w.write(OK + b"junk")  # one segment: the connection is handed over, then found broken
    return True


async def test_a_connection_that_dies_on_its_way_to_a_waiter_is_replaced() -> None:
    async with harness(ok_then_junk, max_connections=1) as (up, pool):
        first = asyncio.create_task(get(pool, b"/junk"))
        await up.received.wait()
        second = asyncio.create_task(get(pool))
        assert await (await first).read() == b"ok"
        assert await (await second).read() == b"ok"
        assert up.connections == 2
        await assert_capacity(up, pool, 1)


# -- failures


async def test_connect_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}", timeouts=FAST)
    with pytest.raises(UpstreamConnectError) as info:
        await get(pool)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert pool.in_use == 0
    await pool.aclose()


async def test_upstream_that_hangs_up_on_accept() -> None:
    async def hang_up(reader: Reader, writer: Writer) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    pool = UpstreamPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeouts=FAST)
    for _ in range(4):  # whether the hang-up is seen before or after the request was written
        with pytest.raises(UpstreamError, match="closed the connection"):
            await get(pool)
        assert pool.in_use == 0
    await pool.aclose()
    server.close()
    await server.wait_closed()


async def test_connection_lost_before_the_first_write(monkeypatch: pytest.MonkeyPatch) -> None:
    made = Connection.connection_made

    def made_then_lost(self: Connection, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        transport.close()  # as if the upstream hung up before create_connection returned

    monkeypatch.setattr(Connection, "connection_made", made_then_lost)
    async with harness() as (up, pool):
        with pytest.raises(UpstreamConnectError, match="closed the connection on connect"):
            await get(pool)
        assert pool.in_use == 0
        monkeypatch.undo()
        await assert_capacity(up, pool)


async def test_drop_after_the_request_was_written_is_not_resent() -> None:
    async with harness(drop) as (up, pool):
        for _ in range(2):  # on a fresh connection, then on a reused one
            await (await get(pool)).read()
            with pytest.raises(UpstreamError, match="closed the connection before responding") as info:
                await pool.request(b"POST", b"/drop", [], b"{}")
            assert type(info.value) is UpstreamError
        assert up.targets(b"/drop") == 2
        await assert_capacity(up, pool)


async def rst_mid_body(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
    await w.drain()
    await asyncio.sleep(0.05)
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()  # linger 0: an RST, not a FIN
    return False


@pytest.mark.parametrize(
    "route",
    [
        reply(CHUNKED_HEAD + chunk(b"data: 1\n\n"), keep_open=False),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ndata: 1\n\n", keep_open=False),
        rst_mid_body,
    ],
    ids=["fin-chunked", "fin-content-length", "rst"],
)
async def test_upstream_breaks_mid_body(route: Route) -> None:
    async with harness(route) as (up, pool):
        response = await get(pool, b"/x")
        pieces = []
        with pytest.raises(UpstreamError, match="closed the connection mid-body"):
            async for piece in response:
                pieces.append(piece)
        assert pieces == [b"data: 1\n\n"]
        with pytest.raises(UpstreamError):
            await response.read()
        assert pool.in_use == 0
        await assert_capacity(up, pool)


@pytest.mark.parametrize(
    "raw",
    [
        b"hello\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ],
)
async def test_malformed_response(raw: bytes) -> None:
    async with harness(reply(raw)) as (up, pool):
        with pytest.raises(UpstreamError, match="malformed upstream response") as info:
            await get(pool, b"/x")
        assert type(info.value.__cause__).__name__ in ("HttpParserError", "HttpParserUpgrade")
        await assert_capacity(up, pool)


# -- timeouts


async def test_first_byte_timeout() -> None:
    async with harness(hang, timeouts=Timeouts(first_byte_s=0.1)) as (up, pool):
        with pytest.raises(UpstreamTimeout, match=r"waiting for the first byte \(0.1s\)"):
            await get(pool, b"/hang")
        await up.client_closed.wait()
        await assert_capacity(up, pool)


async def test_idle_timeout_between_chunks() -> None:
    async with harness(stall_mid_body, timeouts=Timeouts(idle_s=0.1)) as (up, pool):
        response = await get(pool, b"/stall")
        assert await response.__anext__() == b"data: 1\n\n"
        with pytest.raises(UpstreamTimeout, match=r"between body chunks \(0.1s\)"):
            await response.__anext__()
        await up.client_closed.wait()
        await assert_capacity(up, pool)


async def two_parts(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(CHUNKED_HEAD + chunk(b"one "))
    await up.go.wait()
    w.write(chunk(b"two") + b"0\r\n\r\n")
    return True


async def test_a_busy_consumer_is_not_an_idle_upstream() -> None:
    async with harness(two_parts, timeouts=Timeouts(first_byte_s=0.05, idle_s=0.05)) as (up, pool):
        response = await get(pool, b"/two")
        await asyncio.sleep(0.15)  # the wait timers fire meanwhile, with nobody waiting
        assert await response.__anext__() == b"one "
        up.go.set()
        assert await response.read() == b"two"


async def trickle(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(CHUNKED_HEAD)
    gone = asyncio.ensure_future(up.until_client_closes(r))
    while not gone.done():
        await asyncio.sleep(0.03)
        with suppress(RuntimeError):  # uvloop's, for a write after the client reset
            w.write(chunk(b"."))
    return False


async def test_total_timeout_bounds_a_trickling_stream() -> None:
    async with harness(trickle, timeouts=Timeouts(idle_s=0.1, total_s=0.3)) as (up, pool):
        response = await get(pool, b"/trickle")
        with pytest.raises(UpstreamTimeout, match=r"on the whole exchange \(0.3s\)"):
            async for _ in response:
                pass
        await assert_capacity(up, pool)


async def test_total_timeout_bounds_a_consumer_that_never_reads() -> None:
    # 0.6 s: short for the stall, yet room for the capacity check on a loaded machine (0.2 s flaked).
    async with harness(stall_mid_body, timeouts=Timeouts(total_s=0.6)) as (up, pool):
        response = await get(pool, b"/stall")
        await up.client_closed.wait()  # closed while nobody was waiting on the response
        assert pool.in_use == 0
        with pytest.raises(UpstreamTimeout, match="whole exchange"):
            await response.read()
        await assert_capacity(up, pool)


async def test_tls_handshake_that_never_completes_times_out() -> None:
    async with harness(scheme="https", timeouts=Timeouts(connect_s=0.2)) as (_up, pool):
        with pytest.raises(UpstreamTimeout, match=r"connecting \(0.2s\)"):
            await get(pool)  # the plain-HTTP server waits for a request, never a ClientHello reply
        assert pool.in_use == 0


async def test_cancel_while_connecting_frees_the_slot() -> None:
    async with harness(scheme="https") as (_up, pool):
        task = asyncio.create_task(get(pool))
        await asyncio.sleep(0.05)  # stuck in the TLS handshake: the server waits for a request
        assert pool.in_use == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.in_use == 0


async def test_aclose_while_connecting() -> None:
    async with harness() as (up, pool):
        task = asyncio.create_task(get(pool))
        await asyncio.sleep(0)  # the task is now inside create_connection
        await pool.aclose()
        with pytest.raises(UpstreamConnectError, match="pool is closed"):
            await task
        assert pool.in_use == 0
        while up.open:
            await asyncio.sleep(0.005)


# -- cancellation


async def test_cancel_while_waiting_for_the_head() -> None:
    async with harness(hang) as (up, pool):
        task = asyncio.create_task(get(pool, b"/hang"))
        await up.received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.in_use == 0  # freed at once, not when the close completes
        await up.client_closed.wait()
        await assert_capacity(up, pool)


async def test_cancel_while_iterating_the_body() -> None:
    async with harness(stall_mid_body) as (up, pool):
        pieces: list[bytes] = []

        async def consume() -> None:
            async for piece in await get(pool, b"/stall"):
                pieces.append(piece)

        task = asyncio.create_task(consume())
        while not pieces:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.in_use == 0
        await up.client_closed.wait()
        await assert_capacity(up, pool)


async def test_aclose_of_an_unfinished_response_closes_the_connection() -> None:
    async with harness(stall_mid_body) as (up, pool):
        response = await get(pool, b"/stall")
        await response.aclose()
        await response.aclose()
        assert (pool.in_use, pool.idle) == (0, 0)
        await up.client_closed.wait()
        await assert_capacity(up, pool)


# -- streaming and flow control


async def sse(up: Upstream, r: Reader, w: Writer) -> bool:
    w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
    await up.go.wait()  # the rest only once the client has the first event
    for n in (b"2", b"3", b"[DONE]"):
        await asyncio.sleep(0.02)
        w.write(chunk(b"data: " + n + b"\n\n"))
    w.write(b"0\r\n\r\n")
    return True


async def test_stream_yields_each_piece_as_it_arrives() -> None:
    async with harness(sse) as (up, pool):
        pieces = []
        async for piece in await get(pool, b"/sse"):
            pieces.append(piece)
            up.go.set()
        assert pieces[0] == b"data: 1\n\n"  # yielded before the server sent the rest
        assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n"
        assert (pool.idle, pool.in_use) == (1, 0)


BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB


async def test_slow_consumer_pauses_reading() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BIG) + BIG
    async with harness(reply(raw)) as (up, pool):
        response = await get(pool, b"/big")
        conn = response._conn
        assert conn is not None
        while not conn.paused:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert not conn.transport.is_reading()
        assert response._buffered <= HIGH_WATER + 256 * 1024  # plus at most one socket read
        assert await response.read() == BIG
        assert (pool.idle, up.connections) == (1, 1)
        assert await (await get(pool)).read() == b"ok"


async def high_water_at_the_end(up: Upstream, r: Reader, w: Writer) -> bool:
    body = BIG[: HIGH_WATER + 10]
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body[:-20])
    await w.drain()
    await asyncio.sleep(0.05)
    w.write(body[-20:])  # crosses the high-water mark and completes the body in one read
    return True


async def test_connection_returns_to_the_pool_when_the_body_has_arrived_unread() -> None:
    body = BIG[: HIGH_WATER + 10]
    async with harness(high_water_at_the_end) as (up, pool):
        response = await get(pool, b"/big")
        while not pool.idle:
            await asyncio.sleep(0.005)
        assert pool.in_use == 0
        assert pool._idle[0].transport.is_reading()
        assert await response.read() == body
        assert await (await get(pool)).read() == b"ok"
        assert up.connections == 1


# -- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


async def test_tls_with_a_trusted_certificate(certificate: tuple[Path, Path]) -> None:
    client = ssl.create_default_context(cafile=str(certificate[0]))
    async with harness(server_ssl=server_context(certificate), scheme="https", ssl_context=client) as (
        up,
        pool,
    ):
        assert pool.host_header == b"127.0.0.1:%d" % up.port
        for _ in range(3):
            assert await (await get(pool)).read() == b"ok"
        assert up.connections == 1
        await assert_capacity(up, pool)


async def test_tls_default_context_refuses_a_self_signed_certificate(certificate: tuple[Path, Path]) -> None:
    async with harness(server_ssl=server_context(certificate), scheme="https") as (_up, pool):
        with pytest.raises(UpstreamConnectError) as info:
            await get(pool)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert pool.in_use == 0


# -- closing the pool


async def test_aclose_closes_connections_and_refuses_requests() -> None:
    async with harness(hang, max_connections=1) as (up, pool):
        await (await get(pool)).read()
        assert pool.idle == 1
        await pool.aclose()
        assert (pool.idle, pool.in_use) == (0, 0)
        with pytest.raises(UpstreamConnectError, match="closed"):
            await get(pool)
        while up.open:
            await asyncio.sleep(0.005)


async def test_aclose_fails_exchanges_and_waiters() -> None:
    async with harness(hang, max_connections=1) as (up, pool):
        busy = asyncio.create_task(get(pool, b"/hang"))
        await up.received.wait()
        waiting = asyncio.create_task(get(pool))
        await asyncio.sleep(0.02)
        await pool.aclose()
        with pytest.raises(UpstreamError, match="pool closed"):
            await busy
        with pytest.raises(UpstreamConnectError, match="pool is closed"):
            await waiting
        await up.client_closed.wait()
        assert pool.in_use == 0
