"""One upstream HTTP/1.1 connection, and the response it carries.

`Connection` is an asyncio Protocol that feeds every byte it receives to one httptools
parser, kept for the connection's life (llhttp resets itself between keep-alive
messages). The parser's callbacks fill the current `UpstreamResponse`, whose consumer
waits on a single future that those callbacks resolve: no queue, no task.

Timeouts use one timer handle per connection, re-armed lazily, instead of a new timer
for every wait: a wait only records its deadline, and a timer that finds the deadline
moved on (or nobody waiting) schedules itself again. A busy connection thus touches
the timer heap about once per `first_byte_s`, not once per request or chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from gateway.errors import UpstreamError, UpstreamTimeout

# Stop reading the socket while this much body waits for a slow consumer; a read takes
# everything buffered and resumes it, so memory stays near this plus one socket read.
HIGH_WATER = 256 * 1024
# uvloop's clock and timers have millisecond resolution: a timer may fire this much early.
_SLACK = 0.001
_FRAMING_HEADERS = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0  # TCP+TLS connect, and also the bound on waiting for a free pool slot
    first_byte_s: float = 60.0  # from the request written to the response head parsed
    idle_s: float = 60.0  # max gap between body chunks
    total_s: float = 600.0  # whole exchange, request start to end of body


class Owner(Protocol):
    """What a connection needs of its pool (`UpstreamPool`)."""

    timeouts: Timeouts

    def _release(self, conn: Connection) -> None: ...

    def _forget(self, conn: Connection) -> None: ...


def timed_out(what: str, seconds: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"upstream timed out {what} ({seconds:g}s)")


class Connection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "deadline",
        "expires_at",
        "idle",
        "keep_alive",
        "loop",
        "parser",
        "paused",
        "pool",
        "response",
        "timer",
        "timer_at",
        "transport",
        "until_eof",
        "wait_at",
        "wait_s",
        "wait_what",
    )

    transport: asyncio.Transport

    def __init__(self, pool: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None  # the exchange under way, if any
        self.idle = False  # sitting in the pool's idle deque
        self.expires_at = 0.0
        self.closed = False
        self.paused = False
        self.keep_alive = False
        self.until_eof = False  # the body is delimited by the upstream closing the connection
        self.deadline = 0.0  # end of the exchange (total_s)
        self.wait_at = 0.0  # end of the current wait (first byte, or gap between chunks)
        self.wait_s = 0.0
        self.wait_what = ""
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    async def send(self, payload: bytes, head_only: bool, deadline: float) -> UpstreamResponse:
        """Write one whole request and return once the response head is parsed."""
        response = UpstreamResponse(self, head_only)
        self.response = response
        self.deadline = deadline
        self.transport.write(payload)
        while not response.status:
            await response._wait(first_byte=True)
        return response

    def close(self, abort: bool = False) -> None:
        """Close the transport and give the slot back to the pool (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if abort:
            self.transport.abort()
        else:
            self.transport.close()
        self.pool._forget(self)

    def fail(self, error: UpstreamError, cause: BaseException | None) -> None:
        """End the exchange (if any) with `error` and drop the connection."""
        response = self.response
        if response is not None:
            error.__cause__ = cause
            response._error = error
            response._conn = None
            self.response = None
            response._wake()
        self.close(abort=True)

    def resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()

    def _finish(self, response: UpstreamResponse, keep_alive: bool) -> None:
        response._done = True
        response._conn = None
        self.response = None
        response._wake()
        if not keep_alive:
            self.close()
            return
        if self.paused:
            self.resume()
        self.pool._release(self)

    # -- timeouts

    def arm(self, seconds: float, what: str) -> None:
        """Bound the wait that starts now by `seconds` (and by the exchange's total deadline)."""
        at = self.loop.time() + seconds
        self.wait_at, self.wait_s, self.wait_what = at, seconds, what
        at = min(at, self.deadline)
        if self.timer is None or self.timer_at > at:
            self._schedule(at)

    def _schedule(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        response = self.response
        if response is None:
            return  # idle: the next exchange arms it again
        now = self.loop.time() + _SLACK
        if now >= self.deadline:
            self.fail(timed_out("on the whole exchange", self.pool.timeouts.total_s), None)
        elif response._waiter is None:
            # The consumer is busy elsewhere (or paused us): only the total limit applies.
            self._schedule(self.deadline)
        elif now >= self.wait_at:
            self.fail(timed_out(self.wait_what, self.wait_s), None)
        else:
            self._schedule(min(self.wait_at, self.deadline))

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            # httptools' parse errors, and our callbacks refusing data. Not matched by class:
            # if httptools is ever re-imported (coverage's module lookup does it), its C
            # parser keeps raising the first import's error classes.
            self.fail(UpstreamError("malformed upstream response"), exc)

    def connection_lost(self, exc: Exception | None) -> None:
        response = self.response
        if response is not None:
            if response.status and self.until_eof and exc is None:
                self._finish(response, keep_alive=False)
            else:
                where = "mid-body" if response.status else "before responding"
                self.fail(UpstreamError(f"upstream closed the connection {where}"), exc)
        self.close(abort=True)  # the upstream closed first: free the slot

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.response is None:
            # Bytes nobody asked for (while idle, or after a complete response): the
            # framing can no longer be trusted, so the connection is dropped.
            raise UpstreamError("unsolicited upstream data")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None  # on_message_begin refused data without an exchange
        response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:
            response.headers.clear()  # an interim (1xx) response: the real one follows
            return
        response.status = status
        self.keep_alive = keep_alive = self.parser.should_keep_alive()
        self.until_eof = not keep_alive and not any(n in _FRAMING_HEADERS for n, _ in response.headers)
        if response._head_only:
            # llhttp can't be told that a response to HEAD has no body and would wait for
            # one: end the exchange here, and don't reuse the connection.
            self._finish(response, keep_alive=False)
        else:
            response._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None  # None after a HEAD response: its body is refused
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and response.status:  # no status: the end of a 1xx response
            self._finish(response, self.keep_alive)


class UpstreamResponse:
    """An upstream response whose head has arrived; the body streams in behind it.

    Consume it with `read()` or `async for`, or `aclose()` it: until then it holds
    a pool slot (bounded by the total timeout). The connection goes back to the pool
    as soon as the body has fully arrived, even if it is not read yet.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_head_only",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: Connection, head_only: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased, in order received
        self._conn: Connection | None = conn  # until the body has ended or failed
        self._head_only = head_only
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while True:
            if self._chunks:
                parts.append(self._take())
            elif self._done:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            else:
                await self._wait(first_byte=False)

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """The body as it arrives: everything buffered since the last piece, de-chunked."""
        while not self._chunks:
            if self._done:
                raise StopAsyncIteration
            await self._wait(first_byte=False)
        return self._take()

    async def aclose(self) -> None:
        """Drop the connection if the body has not fully arrived (idempotent)."""
        self._abandon()

    def _abandon(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.fail(UpstreamError("upstream response abandoned"), None)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def _wait(self, first_byte: bool) -> None:
        """Wait until the connection has news: head, body, end or failure."""
        if self._error is not None:
            raise self._error
        conn = self._conn
        assert conn is not None  # attached until failed (above) or done (callers check)
        timeouts = conn.pool.timeouts
        if first_byte:
            conn.arm(timeouts.first_byte_s, "waiting for the first byte")
        else:
            conn.arm(timeouts.idle_s, "between body chunks")
        self._waiter = waiter = conn.loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            # The consumer is gone (its client disconnected): the exchange can't be
            # resumed, so close the connection now (the upstream sees it) and free its slot.
            self._waiter = None
            self._abandon()
            raise

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
