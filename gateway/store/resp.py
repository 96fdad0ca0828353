"""A lean RESP2 client for the store's per-request calls: one socket, automatic pipelining.

redis.asyncio costs ~0.15-0.2 ms of CPU per command (pool checkout, command
packing, response callbacks); the gateway makes one store call per request, so
that alone would take half its CPU budget. This client does the minimum: a
command is encoded straight to bytes and written on one persistent connection
(an `asyncio.Protocol`) at the end of the event loop's turn, together with the
other calls of that turn (one write, and one read for Redis, for many requests),
and `hiredis.Reader` parses replies. Every call appends a future to a FIFO and
replies resolve them in order, so concurrent callers pipeline on the socket
without waiting for each other.

Error replies come back as `hiredis.ReplyError` values, not exceptions: the
caller decides (the store reloads a script on NOSCRIPT). A failure of the
connection itself is a `StoreError`.

Time bounds: connecting (with AUTH and SELECT) is bounded by `timeout_s`, and so
is every call. Replies come in order, so the oldest pending call has the earliest
deadline: one timer watches it instead of one per call. When it is overdue the
connection is presumed stuck: every pending call fails and the socket is
dropped, so a late reply can never be taken for the next command's; the next
call reconnects. A cancelled caller keeps its slot in the FIFO and its reply is
dropped. Timeouts are never retried (a script may have run).

A lost connection (a Redis restart leaves the socket stale) fails its pending
calls; a call on it that saw no reply come back after it was written is retried
once on a fresh connection: the server most likely never read it. That is the
trade redis-py's retry makes, limited to calls that got nothing back.

TLS: given an `ssl.SSLContext` the socket is wrapped (SNI and the certificate's
name checked against the host). Behind Sentinel (`locate` given) each connect asks
where the primary is, and checks with ROLE that the node is one. A READONLY reply
means the node has been demoted since: the connection is retired and the calls from
that reply on are sent again, once, to the primary found anew. They ran on a replica,
which cannot have written anything; the calls before it keep their replies.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis

from gateway.store.base import ScriptArg, StoreError

ReplyError = hiredis.ReplyError
Locate = Callable[[], Awaitable[tuple[str, int]]]


class _Lost(StoreError):
    """The connection broke before a reply came back for this call; safe to retry once."""


class ConnectFailed(StoreError):
    """No connection could be set up: the call was not sent."""


def encode(args: Sequence[ScriptArg]) -> bytes:
    """One command in RESP2 (an array of bulk strings); numbers as redis-py sends them (repr)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)  # exact types first: this runs for every argument of every hot-path call
        if kind is str:
            data = arg.encode()  # type: ignore[union-attr]
        elif kind is bytes:
            data = arg  # type: ignore[assignment]
        elif kind is int:
            data = b"%d" % arg
        elif isinstance(arg, bytes | str | int | float) and not isinstance(arg, bool):
            data = arg if isinstance(arg, bytes) else (arg if isinstance(arg, str) else repr(arg)).encode()
        else:
            raise StoreError(f"invalid redis argument of type {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One socket: a FIFO of (future, replies expected, deadline, replies seen before the write)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._pending: deque[tuple[asyncio.Future[Any], int, float, int]] = deque()
        self._partial: list[Any] = []  # replies so far of the head entry when it expects several
        self._replies = 0
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []  # written at the end of this loop turn, in one write
        self.lost = False
        self._retired = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast("asyncio.Transport", transport)

    def request(self, payload: bytes, count: int) -> asyncio.Future[Any]:
        """Write `count` encoded commands; the future gets the reply (a list of them when count > 1)."""
        assert self._transport is not None
        future = self._loop.create_future()
        self._pending.append((future, count, self._loop.time() + self._timeout_s, self._replies))
        self._out.append(payload)
        if len(self._out) == 1:
            self._loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout_s, self._watch)
        return future

    def _flush(self) -> None:
        """Write what this loop turn's calls asked for: one syscall for many requests' commands
        (and one read for Redis), where a write each cost more CPU than the rest of the call."""
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():  # else failed already
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            while (reply := reader.gets()) is not False:
                self._replies += 1
                future, count, _, _ = pending[0]
                if count > 1:
                    self._partial.append(reply)
                    if len(self._partial) < count:
                        continue
                    reply, self._partial = self._partial, []
                pending.popleft()
                if not future.done():  # a cancelled caller's reply is dropped
                    future.set_result(reply)
            if self._retired and not pending:
                self.close()
        except (hiredis.ProtocolError, IndexError) as exc:
            # A garbled stream, or a reply nobody asked for: nothing after it can be trusted.
            self._fail(StoreError(f"redis protocol error: {type(exc).__name__}: {exc}"), retry=False)

    def eof_received(self) -> None:
        self.lost = True  # no new calls on it; the transport closes and connection_lost fails the pending

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self._fail(StoreError(f"redis connection lost{reason}"), retry=True)
        if not self.closed.done():
            self.closed.set_result(None)

    def _watch(self) -> None:
        self._timer = None
        if not self._pending:
            return
        deadline = self._pending[0][2]
        if self._loop.time() >= deadline:
            self._fail(StoreError(f"redis call timed out after {self._timeout_s}s"), retry=False)
        else:
            self._timer = self._loop.call_at(deadline, self._watch)

    def _fail(self, error: StoreError, *, retry: bool) -> None:
        """Fail every pending call and drop the socket; the next call reconnects."""
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        self._partial, self._out = [], []
        for future, _, _, replies_before in pending:
            if not future.done():
                nothing_back = retry and replies_before == self._replies
                future.set_exception(_Lost(str(error)) if nothing_back else StoreError(str(error)))
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(StoreError("redis connection closed"), retry=False)

    def retire(self) -> None:
        """Take no new calls; close once the pending ones have their replies."""
        self.lost = self._retired = True
        if not self._pending:
            self.close()


class RespClient:
    """Commands over one lazily opened connection; see the module docstring.

    Messages never hold the URL's password: the client is built from parsed
    parts and its errors name the failure only.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
        locate: Locate | None = None,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._timeout_s = timeout_s
        self._tls = tls
        self._locate = locate
        handshake: list[list[ScriptArg]] = []
        if password:
            handshake.append(["AUTH", username, password] if username else ["AUTH", password])
        if db:
            handshake.append(["SELECT", db])
        if locate is not None:
            handshake.append(["ROLE"])
        self._handshake = b"".join(encode(command) for command in handshake)
        self._handshake_count = len(handshake)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    @property
    def address(self) -> str:
        """Where the client connects (the last primary found, behind Sentinel), for messages."""
        return self._path if self._path is not None else f"{self._host}:{self._port}"

    async def execute(self, *commands: bytes, keys: Sequence[Sequence[str] | None] = ()) -> Any:
        """Send the encoded `commands` in one write; the reply, or the list of replies of several.

        Error replies are returned as `ReplyError` values; a broken or stuck
        connection raises `StoreError`. `keys` (each command's keys) route commands on a
        cluster (cluster.py, the same interface); one node has nothing to route.
        """
        count = len(commands)
        payload = commands[0] if count == 1 else b"".join(commands)
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connection()
        try:
            reply = await conn.request(payload, count)
        except _Lost:
            try:
                conn = await self._connection()
            except ConnectFailed as exc:
                # The first write may have been read: this call is no longer known not to have run.
                raise StoreError(str(exc)) from None
            reply = await conn.request(payload, count)
        if self._locate is None:
            return reply
        replies = reply if count > 1 else [reply]
        demoted = next((i for i, each in enumerate(replies) if _readonly(each)), None)
        if demoted is None:
            return reply
        conn.retire()  # later calls go to the new primary; earlier ones finish here
        conn = await self._connection()
        again = commands[demoted:]
        retried = await conn.request(b"".join(again), len(again))
        if count == 1:
            return retried
        return replies[:demoted] + (retried if len(again) > 1 else [retried])

    def retire(self) -> None:
        """Move on: the next call connects anew (behind Sentinel, to the primary found then)."""
        if self._conn is not None:
            self._conn.retire()

    async def _connection(self) -> _Connection:
        """The live connection, else a new one (another caller may have reconnected meanwhile)."""
        if self._closed:
            raise StoreError("redis client is closed")
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        task = self._connecting
        if task is None:
            # One connect shared by every caller that arrives meanwhile; a cancelled
            # caller does not cancel it for the others (shield).
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._opened)
        return await asyncio.shield(task)

    def _opened(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        if task.exception() is None:  # also marks a failure retrieved when every caller has gone
            self._conn = task.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._locate is not None:
                    self._host, self._port = await self._locate()
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(loop, self._timeout_s), self._path
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self._timeout_s),
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
                if self._handshake_count:
                    replies = await conn.request(self._handshake, self._handshake_count)
                    replies = replies if self._handshake_count > 1 else [replies]
                    for reply in replies:
                        if isinstance(reply, ReplyError):
                            refused = f"redis at {self.address} refused the connection setup: {reply}"
                            raise ConnectFailed(refused)
                    if self._locate is not None and replies[-1][0] != b"master":
                        # Sentinel's answer is stale (a failover is under way): try again on the next call.
                        role = replies[-1][0].decode()
                        raise ConnectFailed(f"redis at {self.address} is a {role}, not the primary")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            where = self.address
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"redis connect to {where} timed out after {self._timeout_s}s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"redis connect to {where} failed: {type(exc).__name__}: {exc}") from None
            raise
        return conn

    async def aclose(self) -> None:
        """Close the connection (pending calls fail) and wait until the socket is released."""
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.closed


def _readonly(reply: Any) -> bool:
    """Whether a reply says the node is a replica now (a script's write reports it the same way)."""
    return isinstance(reply, ReplyError) and str(reply).startswith("READONLY")
