"""Sentinel discovery: where the primary of a service is now, and word when it moves.

`Sentinels.primary()` asks the sentinels in turn (the last one that answered first)
with SENTINEL GET-MASTER-ADDR-BY-NAME, over a lean connection to each. Both clients
call it on every connect, so a connection lost in a failover comes back on the
promoted replica as soon as the sentinels name it; the lean client then checks ROLE,
and a READONLY reply on either client retires the connection (see resp.py, connect.py).

Once `on_switch` is set, the first `primary()` starts a task that listens for
+promoted-slave and +switch-master on one sentinel at a time and calls it, to drop the connections to the
old primary at once: a primary cut off by a partition is still alive, and until
Sentinel demotes it nothing else would tell its clients to move.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

import hiredis

from gateway.store.base import ScriptArg, StoreError
from gateway.store.resp import ReplyError, RespClient, encode

logger = logging.getLogger("gateway.store")

# +promoted-slave comes when the replica has taken over, which is when the sentinels start
# naming it; +switch-master only once the other replicas follow it, seconds later.
_EVENTS = ("+promoted-slave", "+switch-master")
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0


class Sentinels:
    """The sentinels of one service (the primary's name at the sentinels)."""

    def __init__(
        self,
        hosts: tuple[tuple[str, int], ...],
        service: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.service = service
        self._hosts = hosts
        self._username, self._password, self._tls = username, password, tls
        self._timeout_s = timeout_s
        self._clients = [
            RespClient(
                host=host, port=port, username=username, password=password, tls=tls, timeout_s=timeout_s
            )
            for host, port in hosts
        ]
        self._first = 0  # the sentinel that answered last
        self._delay = _BACKOFF_MIN_S  # before listening again; reset once a subscription holds
        self.on_switch: Callable[[], Awaitable[None]] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._query = encode(("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service))

    async def primary(self) -> tuple[str, int]:
        """The primary's address as the sentinels know it; `StoreError` when none can tell."""
        if self.on_switch is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(self.on_switch), name="gateway.store.sentinel")
        failures: list[str] = []
        count = len(self._clients)
        for step in range(count):
            index = (self._first + step) % count
            client = self._clients[index]
            try:
                reply = await client.execute(self._query)
            except StoreError as exc:
                failures.append(str(exc))
                continue
            if isinstance(reply, ReplyError) or not reply:
                failures.append(f"sentinel {client.address}: {reply or 'does not know the service'}")
                continue
            self._first = index
            host, port = reply
            return host.decode(), int(port)
        raise StoreError(f"no sentinel named the primary of {self.service!r}: {'; '.join(failures)}")

    async def _watch(self, on_switch: Callable[[], Awaitable[None]]) -> None:
        """Call `on_switch` on each +switch-master of the service, until cancelled; reconnects on failure."""
        index = 0
        while True:
            host, port = self._hosts[index]
            try:
                await self._listen(host, port, on_switch)
            except (OSError, StoreError, hiredis.ProtocolError) as exc:
                logger.warning(
                    "store: sentinel %s:%d stopped reporting failovers (%s: %s); trying the next in %.2fs",
                    host,
                    port,
                    type(exc).__name__,
                    exc,
                    self._delay,
                )
            index = (index + 1) % len(self._hosts)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, _BACKOFF_MAX_S)

    async def _listen(self, host: str, port: int, on_switch: Callable[[], Awaitable[None]]) -> None:
        async with asyncio.timeout(self._timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self._tls, server_hostname=host if self._tls is not None else None
            )
        try:
            parser = hiredis.Reader()
            setup: list[tuple[ScriptArg, ...]] = [("SUBSCRIBE", *_EVENTS)]
            if self._password:
                user = (self._username,) if self._username else ()
                setup.insert(0, ("AUTH", *user, self._password))
            writer.write(b"".join(encode(command) for command in setup))
            async with asyncio.timeout(self._timeout_s):
                for _ in range(len(setup) - 1 + len(_EVENTS)):  # SUBSCRIBE confirms each channel
                    reply = await _next(reader, parser)
                    if isinstance(reply, ReplyError):
                        raise StoreError(f"sentinel {host}:{port} refused the subscription: {reply}")
            self._delay = _BACKOFF_MIN_S
            while True:
                message = await _next(reader, parser)
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    event, text = message[1].decode(), message[2].decode()
                    if _service_of(event, text) == self.service:
                        logger.warning(
                            "store: sentinel reports a failover of %r: %s %s", self.service, event, text
                        )
                        await on_switch()
        finally:
            writer.close()

    async def aclose(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        for client in self._clients:
            await client.aclose()


def _service_of(event: str, text: str) -> str | None:
    """The service a failover event is about.

    +switch-master: "<service> <old ip> <old port> <new ip> <new port>";
    +promoted-slave: "slave <ip:port> <ip> <port> @ <service> <old ip> <old port>".
    """
    words = text.split()
    if event == "+switch-master":
        return words[0] if words else None
    return words[words.index("@") + 1] if "@" in words[:-1] else None


async def _next(reader: asyncio.StreamReader, parser: hiredis.Reader) -> object:
    """The next RESP reply on the stream."""
    while (reply := parser.gets()) is False:
        data = await reader.read(65536)
        if not data:
            raise StoreError("sentinel closed the connection")
        parser.feed(data)
    return reply
