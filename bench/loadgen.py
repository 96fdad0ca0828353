"""Closed-loop HTTP/1.1 load generator of the benchmark.

`concurrency` workers, each on its own keep-alive connection, send one prebuilt request back to
back: a worker sends again as soon as its previous answer is complete. Per request it keeps the
total latency (send -> last byte) and the time to first body byte (for a stream: its first SSE
event). The measured window opens after the warm-up; CPU probes are read at its two edges and the
edges are the instants of those reads, so CPU time and completed requests cover the same interval
(the probes are read in order at the opening and in reverse at the closing).
Raw asyncio + uvloop + httptools keep the client's own cost at tens of µs per request.

  python -m bench.loadgen http://127.0.0.1:8000/v1/chat/completions -c 32 -H 'Authorization: Bearer k'
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

# (status, body) -> None when the answer is right, else a short error kind
Validator = Callable[[int, bytes], str | None]
Probe = Callable[[], float]  # cumulative CPU seconds of something
# Per request: perf_counter_ns() at its end (CLOCK_MONOTONIC, as the mock's timestamps), its error kind
# or None, and the deployment that answered (the gateway's x-gateway-deployment header, else "").
TraceEntry = tuple[int, str | None, str]


def build_request(
    method: str, host: str, port: int, path: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    head = {"Host": f"{host}:{port}", "Accept": "*/*", **headers}
    if method == "POST":
        head |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return (
        f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    ).encode() + body


def chat_validator(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"status_{status}"
    try:
        doc = orjson.loads(body)
        ok = doc["object"] == "chat.completion" and bool(doc["choices"][0]["message"]["content"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        ok = False
    return None if ok else "bad_json_body"


def sse_validator(events: int) -> Validator:
    """A stream must carry exactly `events` data events (incl. the final one) and end with [DONE]."""

    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"status_{status}"
        if not body.endswith(b"data: [DONE]\n\n"):
            return "stream_without_done"
        if body.count(b"\ndata:") + body.startswith(b"data:") != events:
            return "stream_event_count"
        return None

    return check


def chunks_validator(contents: int) -> Validator:
    """Parses every event: OpenAI chat.completion.chunk events, `contents` of them with content, one
    more each side (role, finish), then [DONE]. For streams a gateway translated from another API."""

    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"status_{status}"
        events = body.split(b"\n\n")
        if events[-2:] != [b"data: [DONE]", b""]:
            return "stream_without_done"
        if len(events) != contents + 4:
            return "stream_event_count"
        with_content = 0
        for event in events[:-2]:
            try:
                chunk = orjson.loads(event.removeprefix(b"data: "))
                if chunk["object"] != "chat.completion.chunk":
                    return "not_a_chunk"
                with_content += bool(chunk["choices"][0]["delta"].get("content"))
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                return "bad_chunk"
        return None if with_content == contents else "stream_content_count"

    return check


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = True
        self.t_send = self.t_first = self.t_end = 0
        self.deployment = ""  # filled by _TracedConn only

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError(f"connection lost: {exc!r}"))

    def send(self, request: bytes, waiter: asyncio.Future[None]) -> None:
        assert self.transport is not None
        self.waiter, self.body, self.t_first = waiter, [], 0
        self.t_send = time.perf_counter_ns()
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter_ns()
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.t_end = time.perf_counter_ns()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class TimedConn(_Conn):
    """Also keeps when each piece of the body arrived (perf_counter seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def on_message_begin(self) -> None:
        self.arrivals = []

    def on_body(self, body: bytes) -> None:
        self.arrivals.append(time.perf_counter())
        super().on_body(body)


class _TracedConn(_Conn):
    """Also reads the headers (httptools calls on_header only where it exists: not on the plain one)."""

    def on_message_begin(self) -> None:
        self.deployment = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-gateway-deployment":
            self.deployment = value.decode()


C = TypeVar("C", bound=_Conn)


async def exchange(host: str, port: int, request: bytes, timeout: float, protocol: type[C]) -> C:
    """One request on a fresh connection; returns the closed connection, its answer read."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(protocol, host, port), timeout)
    try:
        waiter = loop.create_future()
        conn.send(request, waiter)
        await asyncio.wait_for(waiter, timeout)
        return conn
    finally:
        conn.close()


async def fetch(host: str, port: int, request: bytes, timeout: float) -> tuple[int, bytes]:
    """One request on a fresh connection (readiness and sanity checks)."""
    conn = await exchange(host, port, request, timeout, _Conn)
    return conn.status, b"".join(conn.body)


def percentile(sorted_ns: list[int], p: float) -> float | None:
    """Nearest rank, in ms."""
    if not sorted_ns:
        return None
    rank = max(1, -(-len(sorted_ns) * p // 100))
    return round(sorted_ns[int(rank) - 1] / 1e6, 4)


@dataclass
class LoadResult:
    window_s: float = 0.0
    latency_ns: array[int] = field(default_factory=lambda: array("q"))
    ttfb_ns: array[int] = field(default_factory=lambda: array("q"))
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    reconnects: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:300]}")

    def summary(self) -> dict[str, Any]:
        n = len(self.latency_ns)
        lat, ttfb = sorted(self.latency_ns), sorted(self.ttfb_ns)
        return {
            "requests": n,
            "window_s": round(self.window_s, 4),
            "rps": round(n / self.window_s, 1) if self.window_s else 0.0,
            "latency_ms": {f"p{p}": percentile(lat, p) for p in (50, 90, 99, 100)},
            "ttfb_ms": {f"p{p}": percentile(ttfb, p) for p in (50, 99)},
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
            "cpu_ms_per_request": {k: round(v * 1000 / n, 4) if n else None for k, v in self.cpu_s.items()},
            "cpu_pct": {
                k: round(v * 100 / self.window_s, 1) if self.window_s else None for k, v in self.cpu_s.items()
            },
            "errors": self.errors,
            "error_examples": self.error_examples,
            "reconnects": self.reconnects,
        }


async def run_load(
    host: str,
    port: int,
    request: bytes,
    validate: Validator,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    timeout: float = 10.0,
    probes: dict[str, Probe] | None = None,
    trace: list[TraceEntry] | None = None,
) -> LoadResult:
    """Bounded: warm-up + duration, then at most `timeout` to drain the requests in flight.
    With `trace`, every request (warm-up and drain included) is appended to it."""
    loop = asyncio.get_running_loop()
    probes = probes or {}
    res = LoadResult()
    conns: list[_Conn | None] = [None] * concurrency
    t_open = t_close = 1 << 62  # nothing counts until the window opens
    stopping = False
    cpu0: dict[str, float] = {}

    def open_window() -> None:
        nonlocal t_open
        cpu0.update((k, p()) for k, p in probes.items())
        t_open = time.perf_counter_ns()

    def close_window() -> None:
        nonlocal t_close, stopping
        t_close, stopping = time.perf_counter_ns(), True
        res.cpu_s = {k: p() - cpu0[k] for k, p in reversed(probes.items())}
        res.window_s = (t_close - t_open) / 1e9

    async def watchdog() -> None:
        # One timer for all workers instead of a wait_for per request (cheaper on the load core).
        while True:
            await asyncio.sleep(0.2)
            limit = time.perf_counter_ns() - int(timeout * 1e9)
            for c in conns:
                if c is not None and c.waiter is not None and not c.waiter.done() and c.t_send < limit:
                    c._fail(TimeoutError(f"no complete answer within {timeout} s"))

    async def connect() -> _Conn:
        protocol = _Conn if trace is None else _TracedConn
        _, conn = await asyncio.wait_for(loop.create_connection(protocol, host, port), timeout)
        return conn

    async def worker(slot: int) -> None:
        conn: _Conn | None = None
        while not stopping:
            try:
                if conn is None or conn.transport is None:
                    if conn is not None:
                        res.reconnects += 1
                    conn = conns[slot] = await connect()
                waiter = loop.create_future()
                conn.send(request, waiter)
                await waiter
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                res.error(type(exc).__name__, repr(exc))
                if trace is not None:
                    trace.append((time.perf_counter_ns(), type(exc).__name__, ""))
                if conn is not None:
                    conn.close()
                conn = conns[slot] = None
                await asyncio.sleep(0.05)  # a refused or dead server must not make this spin
                continue
            kind = validate(conn.status, b"".join(conn.body))
            if trace is not None:
                trace.append((conn.t_end, kind, conn.deployment))
            if kind is not None:
                body = b"".join(conn.body)
                res.error(kind, repr(body if len(body) <= 300 else body[:150] + b" ... " + body[-150:]))
            elif t_open <= conn.t_end <= t_close:
                res.latency_ns.append(conn.t_end - conn.t_send)
                res.ttfb_ns.append((conn.t_first or conn.t_end) - conn.t_send)
            if not conn.keep_alive:
                conn.close()

    # Collections would pause this process at random; the client should cost the same every request.
    gc.disable()
    timers = [loop.call_later(warmup, open_window), loop.call_later(warmup + duration, close_window)]
    dog = asyncio.ensure_future(watchdog())
    workers = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    try:
        done, pending = await asyncio.wait(workers, timeout=warmup + duration + timeout + 1)
        for w in pending:
            w.cancel()
            res.error("drain_timeout", "worker still busy after the window + timeout")
        for w in done:
            if w.exception() is not None:
                res.error("worker_crash", repr(w.exception()))
    finally:
        dog.cancel()
        for t in timers:
            t.cancel()  # only live if every worker crashed before the window closed
        for c in conns:
            if c is not None:
                c.close()
        gc.enable()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="closed-loop HTTP/1.1 load generator (prints a JSON summary)")
    ap.add_argument("url")
    ap.add_argument(
        "--body", default='{"model":"mock-gpt","messages":[{"role":"user","content":"hi"}],"max_tokens":20}'
    )
    ap.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    ap.add_argument("-d", "--duration", type=float, default=8.0)
    ap.add_argument("-w", "--warmup", type=float, default=2.0)
    ap.add_argument(
        "--stream-events",
        type=int,
        default=0,
        help="expect SSE with this many data events incl. [DONE] (0: chat.completion JSON)",
    )
    args = ap.parse_args()
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    headers = dict((k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in args.header))
    request = build_request("POST", host, port, u.path or "/", headers, args.body.encode())
    validate = sse_validator(args.stream_events) if args.stream_events else chat_validator
    res = uvloop.run(
        run_load(
            host,
            port,
            request,
            validate,
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
            probes={"loadgen": time.process_time},
        )
    )
    print(json.dumps(res.summary()))


if __name__ == "__main__":
    main()
