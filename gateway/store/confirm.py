"""Writes confirmed by the replicas (WAIT, WAITAOF): `RedisStore.hset_confirmed`, for admin keys.

Redis confirms the writes of the connection a WAIT is sent on (its replication offset after its last
write), so the write and the wait go on one connection of their own, to the primary owning the key:
never the lean client's, which a blocked WAIT would stall for every request, and never retried,
since a WAIT resent on a new connection confirms nothing and counts every replica.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from gateway.store.base import Confirmed, ScriptArg, StoreError, ttl_ms


@contextlib.asynccontextmanager
async def own_connection(client: Redis | RedisCluster, key: str) -> AsyncIterator[AbstractConnection]:
    """A connection to the primary owning `key`, out of the command pool while in use.

    One that failed is disconnected before it goes back, since a reply may still be on its way.
    """
    node: ClusterNode | None = None
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        acquired = node.acquire_connection()
        connection: AbstractConnection = acquired
    else:
        connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield connection
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        if node is not None:
            node.release(acquired)
        else:
            assert isinstance(client, Redis)
            await client.connection_pool.release(connection)


async def write_confirmed(
    connection: AbstractConnection,
    write: tuple[ScriptArg, ...],
    *,
    replicas: int | None,
    aof: bool,
    timeout_s: float,
    reply_timeout_s: float,
) -> Confirmed:
    """`write`, then WAIT (or WAITAOF) for `replicas` (None: those connected now) in one round trip.

    An error reply to the write is a `StoreError`; one to the wait is reported in the result.
    """
    if replicas is None:
        replicas = await _connected_replicas(connection, reply_timeout_s)
    commands = [write]
    if aof:
        commands.append(("WAITAOF", 1, replicas, ttl_ms(timeout_s)))
    elif replicas:
        commands.append(("WAIT", replicas, ttl_ms(timeout_s)))
    await connection.send_packed_command(connection.pack_commands(commands))
    written = await _reply(connection, reply_timeout_s)
    if len(commands) > 1:
        # The wait blocks up to its own bound; its reply then has the store timeout to come back.
        waited = await _reply(connection, timeout_s + reply_timeout_s)
    if isinstance(written, ResponseError):
        raise StoreError(f"the write was refused: {written}")
    if len(commands) == 1:
        return Confirmed(wanted=0, replicas=0)
    if isinstance(waited, ResponseError):
        return Confirmed(wanted=replicas, replicas=0, aof=aof, refused=str(waited))
    if aof:
        local, acknowledged = waited
        return Confirmed(wanted=replicas, replicas=acknowledged, aof=True, on_disk=local >= 1)
    return Confirmed(wanted=replicas, replicas=int(waited))


async def _connected_replicas(connection: AbstractConnection, timeout_s: float) -> int:
    """How many replicas the node on `connection` has connected now (ROLE)."""
    await connection.send_command("ROLE")
    role = await _reply(connection, timeout_s)
    if isinstance(role, ResponseError):
        raise StoreError(f"ROLE refused: {role}")
    if role[0] != b"master":
        raise StoreError(f"the node is a {role[0].decode()}, not the primary: nothing was written")
    return len(role[2])


async def _reply(connection: AbstractConnection, timeout_s: float) -> Any:
    """The next reply on `connection`; an error reply is returned, not raised."""
    try:
        return await connection.read_response(timeout=timeout_s)
    except ResponseError as exc:
        return exc
