"""SSE comment heartbeats for streams that wait: on the first token, or in a long gap.

Proxies (nginx, cloud load balancers) cut a connection that stays silent past their read
timeout, often 60 s, and a reasoning model may think longer than that before its first
token. A streaming request therefore gets `: keep-alive` comments, which SSE clients (the
official SDKs included) ignore, whenever it has been silent for a whole interval.

One timer serves the whole process, not one per request: `Pulse` ticks every `interval_s`
while any stream is watched, and gives a heartbeat to each stream that sent nothing since the
previous tick. A stream is silent for at most two intervals, and one answered within an
interval never gets a heartbeat. The first heartbeat sends the response head (200, SSE), so
from then on the request's errors must go out as an SSE error event (`failures.send_failure`).

A heartbeat is written by a task of its own (the request's task is waiting on its upstream);
`Beat.send` keeps the request's writes and the heartbeats from interleaving.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.context import RequestContext
from gateway.types import Message, Send

log = logging.getLogger("gateway.forward")

KEEP_ALIVE = b": keep-alive\n\n"
SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
_KEEP_ALIVE_MESSAGE = {"type": "http.response.body", "body": KEEP_ALIVE, "more_body": True}


class Beat:
    """One watched stream; once watched, the request writes through `send`."""

    __slots__ = ("_send", "busy", "ctx", "line_end", "overhead_ms", "pending", "quiet")

    def __init__(self, ctx: RequestContext, send: Send, overhead_ms: float) -> None:
        self.ctx = ctx
        self._send = send
        self.overhead_ms = overhead_ms  # the gateway's time before the upstream call, for the head
        self.quiet = False  # nothing was sent since the last tick
        self.busy = False  # the request is writing
        self.line_end = True  # what went out so far ends a line: a comment line may follow
        self.pending: asyncio.Task[None] | None = None  # a heartbeat being written

    async def send(self, message: Message) -> None:
        self.busy = True
        try:
            pending = self.pending
            if pending is not None:
                self.pending = None
                await pending  # its failure (the client gone) is the request's too
            await self._send(message)
            body = message.get("body")
            if body:
                # A relayed read may end inside an SSE line; a comment there would corrupt it.
                self.line_end = body.endswith(b"\n")
        finally:
            self.busy = False
            self.quiet = False

    async def beat(self, head: bool) -> None:
        if head:
            overhead = (b"x-gateway-overhead-ms", b"%.3f" % self.overhead_ms)
            headers = [*SSE_HEADERS, *self.ctx.headers(), overhead]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send(dict(_KEEP_ALIVE_MESSAGE))

    def idle(self) -> bool:
        """No heartbeat is being written, and none failed (a failed one waits for the request to see it)."""
        pending = self.pending
        return pending is None or (pending.done() and (pending.cancelled() or pending.exception() is None))


class Pulse:
    """The process's heartbeat clock (`router.heartbeat_s`)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._beats: set[Beat] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, ctx: RequestContext, send: Send, overhead_ms: float) -> Beat:
        beat = Beat(ctx, send, overhead_ms)
        self._beats.add(beat)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)
        return beat

    def drop(self, beat: Beat) -> None:
        """Stop watching `beat` (its request has ended); a heartbeat still being written is cancelled."""
        self._beats.discard(beat)
        pending, beat.pending = beat.pending, None
        if pending is None:
            return
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled() and pending.exception() is not None:
            # The request ended without writing again: its client is gone, which it has seen itself.
            rid = beat.ctx.request_id.decode()
            log.info("heartbeat of request %s not written: %r", rid, pending.exception())

    def _tick(self) -> None:
        self._timer = None
        if not self._beats:
            return  # the next watch starts the clock again
        loop = asyncio.get_running_loop()
        for beat in self._beats:
            if beat.quiet and beat.line_end and not beat.busy and beat.idle():
                ctx = beat.ctx
                head = not ctx.responded
                if head:  # marked now, not when the task runs: the request must not send a head of its own
                    ctx.responded = True
                    ctx.status = 200
                beat.pending = loop.create_task(beat.beat(head))
            beat.quiet = True
        self._timer = loop.call_later(self.interval_s, self._tick)
