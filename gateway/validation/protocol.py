"""uvicorn's httptools protocol with the head bound applied while the head is still arriving.

uvicorn's httptools parser buffers a request head of any size before the app
sees it: a 64 MiB header line costs the worker about 5 s of CPU (the parser
appends fragment by fragment) and its memory, and only then does
`HeadLimitMiddleware` refuse it. `gateway serve` runs this subclass instead: once a
head still incomplete has passed `server.max_head_bytes`, it answers the same
OpenAI-shaped 431 and closes the connection, so what one connection makes the
server buffer stays under the bound plus one read (uvloop reads up to 256 KiB).

A head that completes within the bound goes on as usual, and the middleware
checks its lines and total precisely (this layer counts raw bytes and leaves
those decisions to it). The bound reaches each worker process through uvicorn's
own `h11_max_incomplete_event_size` setting, which means the same thing for
uvicorn's h11 protocol: the most bytes of a request head not yet complete.
It is the value at start; a config reload changes the middleware's bounds, not this one.

Each response also leaves in one write where uvicorn makes two: its cycle writes
the head and then the body, each a send syscall, the head's the dearer. The cycle
here writes through `OneSend`, which holds the first write until the next one or
the end of the event-loop turn, whichever comes first, so a head and the body sent
right after it go out together, and nothing waits past the turn it was written in.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import HeadTooLarge

DEFAULT_MAX_HEAD_BYTES = 32768
_IN_BODY = -1


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.max_head_bytes: int = config.h11_max_incomplete_event_size or DEFAULT_MAX_HEAD_BYTES
        self.head_bytes = 0  # of the head being read; _IN_BODY once it is complete

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.head_bytes = _IN_BODY
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle:  # a new request's cycle (an upgrade makes none)
            self.cycle.transport = OneSend(self.transport, self.loop)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        in_head = self.head_bytes != _IN_BODY
        super().data_received(data)
        # Counted only when the whole read belongs to one unfinished head (a read where a head
        # begins or ends is not): the bound is approximate by one read, never early.
        if in_head and self.head_bytes != _IN_BODY and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head_bytes:
                self.refuse()

    def refuse(self) -> None:
        error = HeadTooLarge(
            "Request header fields too large: the request head is over the limit of "
            f"{self.max_head_bytes} bytes."
        )
        body = error.body()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"connection: close\r\n"
            b"x-request-id: req_%s\r\n\r\n" % (len(body), os.urandom(8).hex().encode())
        )
        self.transport.write(head + body)
        self.transport.close()


class OneSend:
    """The transport as one response cycle sees it: the cycle's first write is held until its next
    write or close, or else the end of the loop turn, so that a head and its body leave in one send."""

    __slots__ = ("held", "loop", "transport", "writes")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes == 1:
            self.held = data
            self.loop.call_soon(self.release)
        elif self.held:
            held, self.held = self.held, b""
            self.transport.writelines((held, data))  # one writev under uvloop: the body is not copied
        else:
            self.transport.write(data)

    def release(self) -> None:
        # A connection lost meanwhile (the cycle's own close releases first): nowhere to write to.
        if self.held and not self.transport.is_closing():
            data, self.held = self.held, b""
            self.transport.write(data)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
