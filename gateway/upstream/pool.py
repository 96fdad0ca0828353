"""UpstreamPool: a bounded pool of keep-alive HTTP/1.1 connections to one origin.

Requests take the most recently used idle connection, else open one if fewer than
`max_connections` are open, else wait (at most `connect_s`) for one to come back. A
connection returns to the pool when its response body has fully arrived and both
sides allow keep-alive; any failure, cancellation or unread body closes it instead.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

from gateway.errors import UpstreamConnectError, UpstreamError
from gateway.upstream.connection import Connection, Timeouts, UpstreamResponse, timed_out

_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class UpstreamPool:
    """HTTP/1.1 client for one upstream origin (`http` or `https` base URL).

    `request()` raises `UpstreamConnectError` when nothing was sent (refused, TLS
    failure, pool closed), `UpstreamTimeout` for any of `Timeouts`, and `UpstreamError`
    when the connection broke or the reply was malformed. Messages never quote headers.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 100,
        timeouts: Timeouts = Timeouts(),
        keepalive_expiry_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("upstream base_url must be http:// or https:// with a host")
        if url.username is not None or url.query or url.fragment:
            raise ValueError("upstream base_url must not carry credentials, a query or a fragment")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        tls = url.scheme == "https"
        default_port = 443 if tls else 80
        self._host = url.hostname
        self._port = url.port or default_port
        name = f"[{self._host}]" if ":" in self._host else self._host
        if self._port != default_port:
            name = f"{name}:{self._port}"
        self.host_header = name.encode("ascii")
        self.base_path = url.path.rstrip("/")
        self.timeouts = timeouts
        self._ssl = (ssl_context or ssl.create_default_context()) if tls else None
        self._line_end = b" HTTP/1.1\r\nhost: " + self.host_header + b"\r\n"
        self._max = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._slots = 0  # connections open or being opened: never above _max
        self._conns: set[Connection] = set()
        self._idle: deque[Connection] = deque()  # oldest first
        # Requests waiting for a slot, handed either a connection or None ("open one").
        # While any waits, nothing is idle: a released connection goes to a waiter first.
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._closed = False

    @property
    def in_use(self) -> int:
        """Connections busy with an exchange, or being opened."""
        return self._slots - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        `target` is the whole request-target. Host and Content-Length are added here;
        `headers` are written as given, so they must hold no Host, Content-Length,
        hop-by-hop header, CR or LF.
        """
        parts = [method, b" ", target, self._line_end]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body or method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts += (b"\r\n", body)
        payload = b"".join(parts)

        loop = asyncio.get_running_loop()
        now = loop.time()
        conn = self._take_idle(now) or await self._acquire(loop)
        # A request is only ever sent once: a connection that dies after the write (even
        # before any response byte) fails the request, as the upstream may have acted on
        # it. Only connections seen dead before the write are replaced (_take_idle).
        return await conn.send(payload, method == b"HEAD", now + self.timeouts.total_s)

    async def aclose(self) -> None:
        """Close every connection; exchanges under way fail, and later requests raise."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("upstream pool is closed"))
        for conn in list(self._conns):
            conn.fail(UpstreamError("upstream pool closed"), None)
        await asyncio.sleep(0)  # aborted transports close their sockets on the next loop turn

    # -- slots

    def _take_idle(self, now: float) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            # Closed-while-idle connections left the deque already (_forget); these are
            # the ones expired, or closing with connection_lost still to come.
            if conn.expires_at > now and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> Connection:
        while True:
            if self._closed:
                raise UpstreamConnectError("upstream pool is closed")
            if self._slots < self._max:
                self._slots += 1
                return await self._connect(loop)
            conn = await self._wait_for_slot(loop)
            if conn is None:  # a freed slot, ours to fill
                return await self._connect(loop)
            if not conn.closed and not conn.transport.is_closing():
                return conn
            conn.close()  # it died on the way to us

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        seconds = self.timeouts.connect_s
        timer = loop.call_later(seconds, _expire, waiter, seconds)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled just after being handed something: pass it on, or it leaks.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                elif not handed.closed:
                    self._release(handed)
            raise
        finally:
            timer.cancel()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """Open a connection into a slot the caller holds already."""
        seconds = self.timeouts.connect_s
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise timed_out("connecting", seconds) from exc
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (ssl.SSLError)
                raise UpstreamConnectError(
                    f"could not connect to the upstream ({type(exc).__name__})"
                ) from exc
            raise
        if conn.closed:  # the upstream hung up at once (which freed the slot already)
            raise UpstreamConnectError("upstream closed the connection on connect")
        self._conns.add(conn)
        if self._closed:
            conn.close()
            raise UpstreamConnectError("upstream pool is closed")
        return conn

    def _release(self, conn: Connection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        now = conn.loop.time()
        idle = self._idle
        while idle and idle[0].expires_at <= now:  # requests take the newest: shed the stale
            stale = idle.popleft()
            stale.idle = False
            stale.close()
        conn.idle = True
        conn.expires_at = now + self._keepalive_expiry_s
        idle.append(conn)

    def _forget(self, conn: Connection) -> None:
        """A connection closed: drop it and give its slot to a waiter, if any."""
        self._conns.discard(conn)
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        self._slots -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._slots += 1
                waiter.set_result(None)
                return


def _expire(waiter: asyncio.Future[Connection | None], seconds: float) -> None:
    if not waiter.done():
        waiter.set_exception(timed_out("waiting for a free connection", seconds))
