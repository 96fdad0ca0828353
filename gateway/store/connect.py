"""The connections a store URL asks for: the lean client and the redis.asyncio pool, alike.

Both clients get the same `ssl.SSLContext` (built once from the URL, see url.py) and,
behind Sentinel, the same `Sentinels`: each connect of either client asks it where the
primary is. redis.asyncio's own TLS and Sentinel classes are not used, so the two
clients cannot disagree on what is trusted or where the primary is.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from gateway.store.resp import RespClient
from gateway.store.sentinel import Sentinels
from gateway.store.url import StoreURL, ssl_context


class GatewayConnection(Connection):
    """redis.asyncio's TCP connection, with our TLS context and Sentinel discovery."""

    def __init__(
        self, *, tls: ssl.SSLContext | None = None, sentinels: Sentinels | None = None, **kwargs: Any
    ) -> None:
        self._tls = tls
        self._sentinels = sentinels
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        if self._tls is not None:
            arguments["ssl"] = self._tls
            arguments["server_hostname"] = self.host
        return arguments

    async def _connect(self) -> None:
        if self._sentinels is not None:
            self.host, self.port = await self._sentinels.primary()
        await super()._connect()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ReadOnlyError:
            if self._sentinels is None:
                raise
            # Demoted in a failover: a connection error makes the pool's one retry reconnect,
            # via Sentinel, to the new primary; the command ran on a replica, so it wrote nothing.
            await self.disconnect()
            raise RedisConnectionError("redis node is a replica now; reconnecting to the primary") from None


def sentinels_for(url: StoreURL, tls: ssl.SSLContext | None, timeout_s: float) -> Sentinels | None:
    if url.kind != "sentinel":
        return None
    assert url.service is not None
    return Sentinels(
        url.hosts,
        url.service,
        username=url.sentinel_username,
        password=url.sentinel_password,
        tls=tls,
        timeout_s=timeout_s,
    )


def tls_for(url: StoreURL) -> ssl.SSLContext | None:
    return ssl_context(url) if url.tls else None


def pool_for(
    url: StoreURL,
    *,
    tls: ssl.SSLContext | None,
    sentinels: Sentinels | None,
    timeout_s: float,
    max_connections: int,
) -> BlockingConnectionPool:
    """The redis.asyncio pool: waits up to `timeout_s` for a free connection; retries once on a lost one."""
    common: dict[str, Any] = {
        "db": url.db,
        "username": url.username,
        "password": url.password,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "decode_responses": False,
    }
    if url.kind == "unix":
        return BlockingConnectionPool(
            connection_class=UnixDomainSocketConnection,
            max_connections=max_connections,
            timeout=timeout_s,
            path=url.path,
            **common,
        )
    host, port = url.hosts[0]
    return BlockingConnectionPool(
        connection_class=GatewayConnection,
        max_connections=max_connections,
        timeout=timeout_s,
        host=host,
        port=port,
        tls=tls,
        sentinels=sentinels,
        **common,
    )


def lean_for(
    url: StoreURL, *, tls: ssl.SSLContext | None, sentinels: Sentinels | None, timeout_s: float
) -> RespClient:
    """The lean client of the per-request calls, for the same node(s) as `pool_for`."""
    host, port = url.hosts[0] if url.hosts else ("localhost", 0)
    return RespClient(
        host=host,
        port=port,
        path=url.path,
        db=url.db,
        username=url.username,
        password=url.password,
        timeout_s=timeout_s,
        tls=tls,
        locate=sentinels.primary if sentinels is not None else None,
    )
