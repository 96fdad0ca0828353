"""The connections a store URL asks for: the lean client and the redis.asyncio pool, alike.

Both clients get the same `ssl.SSLContext` (built once from the URL, see url.py) and,
behind Sentinel, the same `Sentinels`: each connect of either client asks it where the
primary is. redis.asyncio's own TLS and Sentinel classes are not used, so the two
clients cannot disagree on what is trusted or where the primary is.

On a cluster the lean client is cluster.py's; the other commands go through
redis.asyncio's `RedisCluster`, and pub/sub through one connection to any node (a
PUBLISH reaches the subscribers on every node of the cluster), the next seed after a
failure.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ReadOnlyError

from gateway.store.cluster import ClusterClient
from gateway.store.resp import Locate, RespClient
from gateway.store.sentinel import Sentinels
from gateway.store.slots import Address
from gateway.store.url import StoreURL, ssl_context


class GatewayConnection(Connection):
    """redis.asyncio's TCP connection, with our TLS context and, given `locate`, its address found anew
    on each connect (Sentinel's primary, or a cluster's next seed)."""

    def __init__(
        self, *, tls: ssl.SSLContext | None = None, locate: Locate | None = None, **kwargs: Any
    ) -> None:
        self._tls = tls
        self._locate = locate
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        if self._tls is not None:
            arguments["ssl"] = self._tls
            arguments["server_hostname"] = self.host
        return arguments

    async def _connect(self) -> None:
        if self._locate is not None:
            self.host, self.port = await self._locate()
        await super()._connect()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ReadOnlyError:
            if self._locate is None:
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
        locate=sentinels.primary if sentinels is not None else None,
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


class BlockingReads:
    """XREAD BLOCK on a cluster: on the key's node, from a pool per node that waits for a free
    connection (redis.asyncio's cluster pools refuse at once when full), without read timeout."""

    def __init__(self, lean: ClusterClient, *, timeout_s: float, max_connections: int, **common: Any) -> None:
        self._lean = lean
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._common = common
        self._nodes: dict[Address, Redis] = {}

    async def xread(self, streams: dict[str, str], *, block: int) -> Any:
        [key] = streams
        try:
            return await self._node(await self._lean.owner(key)).xread(streams, block=block)
        except MovedError:
            await self._lean.refresh()  # the slot moved: read where it lives now
        return await self._node(await self._lean.owner(key)).xread(streams, block=block)

    def _node(self, address: Address) -> Redis:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = Redis.from_pool(
                BlockingConnectionPool(
                    host=address[0],
                    port=address[1],
                    max_connections=self._max_connections,
                    timeout=self._timeout_s,
                    socket_timeout=None,
                    **self._common,
                )
            )
        return node

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()


class ClusterClients:
    """What a redis+cluster:// store runs on: see the module docstring."""

    def __init__(self, url: StoreURL, *, timeout_s: float, max_connections: int) -> None:
        common: dict[str, Any] = {
            "username": url.username,
            "password": url.password,
            "socket_connect_timeout": timeout_s,
            "decode_responses": False,
        }
        seeds = [ClusterNode(host, port) for host, port in url.hosts]
        self.command = RedisCluster(
            startup_nodes=seeds, max_connections=max_connections, socket_timeout=timeout_s, **common
        )
        self._seeds = url.hosts
        host, port = url.hosts[0]
        self.pubsub = Redis.from_pool(
            ConnectionPool(
                connection_class=GatewayConnection,
                host=host,
                port=port,
                locate=self._first_live_seed,
                socket_timeout=None,
                **common,
            )
        )
        self.publisher = Redis.from_pool(
            BlockingConnectionPool(
                connection_class=GatewayConnection,
                host=host,
                port=port,
                locate=self._first_live_seed,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                **common,
            )
        )
        self._timeout_s = timeout_s
        self.lean = ClusterClient(
            url.hosts, username=url.username, password=url.password, timeout_s=timeout_s
        )
        self.blocking = BlockingReads(
            self.lean, timeout_s=timeout_s, max_connections=max_connections, **common
        )

    async def _first_live_seed(self) -> Address:
        """The first seed, in the URL's order, that accepts a connection: the node every replica's
        subscribers and publishers agree on (PUBLISH counts the subscribers of its node only)."""
        for host, port in self._seeds:
            try:
                async with asyncio.timeout(self._timeout_s):
                    _, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                continue
            writer.close()
            return host, port
        return self._seeds[0]  # none: the connect that follows fails and says so
