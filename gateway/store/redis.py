"""The Redis store: shared state for N gateway replicas.

The per-request calls (`run`, `run_many`, `get`, `set`) go through the lean
pipelining client of gateway/store/resp.py, one socket for all of them: they are
on every request's path and redis.asyncio's per-command CPU would dominate it.
That client serves every URL form (TLS, Sentinel and Cluster included, see connect.py and
cluster.py); only a store built around a given client (fakeredis in tests) uses
redis.asyncio for them.

Other commands use one `BlockingConnectionPool`: when every connection is busy a call
waits (up to `timeout_s`) for one to come back instead of failing, so a burst
queues rather than erroring. Each connection retries a command once after a
connection error, which is what lets the store ride out a Redis restart: the
pooled sockets are stale afterwards and the retry reconnects. Timeouts are not
retried, since a script that timed out may already have run.

Scripts go by EVALSHA. `run` is `run_many` of one call, and `run_many` pipelines
the EVALSHAs of its calls in one round trip (not a transaction: their keys may
span cluster slots). A script not loaded yet (no `register`) gets SCRIPT LOAD
pipelined in front, so a first run is one round trip too. If Redis has lost a
script since (restart, failover, SCRIPT FLUSH), the calls answered NOSCRIPT are
retried once, each script reloaded in front: a second round trip, in that case only.
Every call's reply is in before the first failure is raised.

Pub/sub has its own connection (pubsub.py).

Blocking log reads (XREAD BLOCK) use a pool of their own too, without a read
timeout: a reader parked on a log would otherwise hold a command slot (and trip
the command timeout); the wait is bounded by the caller's `block_s` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError

from gateway.store.base import (
    INCR_WITH_TTL,
    Call,
    Confirmed,
    Script,
    ScriptArg,
    Store,
    StoreError,
    Subscription,
    check_ttl,
    ttl_ms,
)
from gateway.store.cluster import ClusterClient
from gateway.store.confirm import own_connection, write_confirmed
from gateway.store.connect import BlockingReads, ClusterClients, lean_for, pool_for, sentinels_for, tls_for
from gateway.store.pubsub import PubSubHub
from gateway.store.resp import ReplyError, RespClient, encode
from gateway.store.sentinel import Sentinels
from gateway.store.url import parse, redact, url_secrets

Lean = RespClient | ClusterClient  # the per-request client: one node's, or a cluster's

# What the driver raises: its own errors, plus socket errors it does not wrap everywhere.
_DRIVER_ERRORS = (RedisError, OSError)


class RedisStore(Store):
    """A `Store` on Redis. Build it with `from_url`, or around an existing client.

    The store owns `client` and closes it in `aclose`. `secrets` (the URL's
    password) are masked in every error message and log line.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout_s: float = 1.0,
        secrets: Sequence[str] = (),
        lean: Lean | None = None,
        sentinels: Sentinels | None = None,
        pubsub_client: Redis | None = None,
        blocking_client: Redis | BlockingReads | None = None,
        publisher: Redis | None = None,
    ) -> None:
        self._client: Redis | RedisCluster = client
        self._lean = lean
        self._sentinels = sentinels
        self._timeout_s = timeout_s
        self._secrets = tuple(secret for secret in secrets if secret)
        self._loaded: set[str] = set()
        if pubsub_client is None or blocking_client is None:
            assert isinstance(client, Redis)  # a cluster brings its own
            pool = client.connection_pool
            # Same server and options, but no read timeout: an idle subscriber waits
            # for messages indefinitely. Connecting is still bounded by timeout_s.
            pubsub_client = Redis.from_pool(
                ConnectionPool(
                    connection_class=pool.connection_class,
                    **{**pool.connection_kwargs, "socket_timeout": None},
                )
            )
            # Blocking reads: as many connections as the command pool, waiting up to timeout_s for one.
            blocking_client = Redis.from_pool(
                BlockingConnectionPool(
                    connection_class=pool.connection_class,
                    max_connections=pool.max_connections,
                    timeout=timeout_s,
                    **{**pool.connection_kwargs, "socket_timeout": None},
                )
            )
        self._pubsub = PubSubHub(pubsub_client, timeout_s=timeout_s, secrets=self._secrets)
        self._blocking_client = blocking_client
        # On a cluster: a client of the node the subscribers are on, so PUBLISH counts them.
        self._publisher = publisher
        if sentinels is not None:
            sentinels.on_switch = self._switched

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, max_connections: int = 50) -> RedisStore:
        """Build a store for a Redis URL, in any of the forms url.py lists.

        No connection is made yet; a malformed URL, or a TLS file that cannot be read,
        is a ValueError without the URL's secrets.
        """
        secrets = url_secrets(url)
        try:
            parsed = parse(url)
            tls = tls_for(parsed)
        except ValueError as exc:
            raise ValueError(redact(f"invalid redis URL: {exc}", secrets)) from None
        if parsed.kind == "cluster":
            cluster = ClusterClients(parsed, timeout_s=timeout_s, max_connections=max_connections)
            return cls(
                cluster.command,
                timeout_s=timeout_s,
                secrets=secrets,
                lean=cluster.lean,
                pubsub_client=cluster.pubsub,
                blocking_client=cluster.blocking,
                publisher=cluster.publisher,
            )
        sentinels = sentinels_for(parsed, tls, timeout_s)
        pool = pool_for(
            parsed, tls=tls, sentinels=sentinels, timeout_s=timeout_s, max_connections=max_connections
        )
        lean = lean_for(parsed, tls=tls, sentinels=sentinels, timeout_s=timeout_s)
        client = Redis.from_pool(pool)
        return cls(client, timeout_s=timeout_s, secrets=secrets, lean=lean, sentinels=sentinels)

    async def _switched(self) -> None:
        """Sentinel reports a failover: leave the old primary now (idle pooled connections too)."""
        if isinstance(self._lean, RespClient):
            self._lean.retire()
        assert isinstance(self._client, Redis) and isinstance(self._blocking_client, Redis)
        await self._client.connection_pool.disconnect(inuse_connections=False)
        await self._blocking_client.connection_pool.disconnect(inuse_connections=False)

    @property
    def client(self) -> Redis | RedisCluster:
        """The underlying client, for tooling and tests; request paths use the methods."""
        return self._client

    def _error(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(redact(f"redis {action} failed: {type(exc).__name__}: {exc}", self._secrets))

    def _observe(self, started: float, failed: bool) -> None:
        if self.stats is not None:
            self.stats.observe(time.perf_counter() - started, failed)

    async def _lean_call(self, lean: Lean, action: str, args: Sequence[ScriptArg]) -> Any:
        """One command on the lean client; an error reply or a failure is a `StoreError`."""
        started = time.perf_counter()
        try:
            reply = await lean.execute(encode(args), keys=[[str(args[1])]])
        except StoreError as exc:
            self._observe(started, True)
            raise self._error(action, exc) from exc
        self._observe(started, False)
        if isinstance(reply, ReplyError):
            raise self._error(action, reply)
        return reply

    async def _driver_call(self, action: str, call: Awaitable[Any]) -> Any:
        """A request-path command on redis.asyncio (no lean client here), counted like a lean one."""
        started = time.perf_counter()
        try:
            reply = await call
        except _DRIVER_ERRORS as exc:
            self._observe(started, True)
            raise self._error(action, exc) from exc
        self._observe(started, False)
        return reply

    # -- lifecycle ---------------------------------------------------------

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except _DRIVER_ERRORS as exc:
            raise self._error("PING", exc) from exc

    async def aclose(self) -> None:
        """Stop the pub/sub reader, then close the connection pools and clients. Idempotent."""
        await self._pubsub.aclose()
        await self._blocking_client.aclose()
        if self._publisher is not None:
            await self._publisher.aclose()
        await self._client.aclose()
        if self._lean is not None:
            await self._lean.aclose()
        if self._sentinels is not None:
            await self._sentinels.aclose()

    # -- keys and counters -------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        if self._lean is not None:
            return cast("bytes | None", await self._lean_call(self._lean, "GET", ("GET", key)))
        value = await self._driver_call("GET", self._client.get(key))
        return cast("bytes | None", value)  # decode_responses=False: never str

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None, nx: bool = False) -> bool:
        check_ttl(ttl_s)
        if self._lean is not None:
            command: list[ScriptArg] = ["SET", key, value]
            if ttl_s is not None:
                command += ("PX", ttl_ms(ttl_s))
            if nx:
                command.append("NX")
            return await self._lean_call(self._lean, "SET", command) is not None  # OK, or nil under NX
        px = None if ttl_s is None else ttl_ms(ttl_s)
        return bool(await self._driver_call("SET", self._client.set(key, value, px=px, nx=nx)))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0  # DEL needs at least one key
        try:
            count: int = await self._client.delete(*keys)
        except _DRIVER_ERRORS as exc:
            raise self._error("DEL", exc) from exc
        return count

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        check_ttl(ttl_s)
        if ttl_s is not None:
            count: int = await self.run(INCR_WITH_TTL, [key], [amount, ttl_ms(ttl_s)])
            return count
        try:
            count = await self._client.incrby(key, amount)
        except _DRIVER_ERRORS as exc:
            raise self._error("INCRBY", exc) from exc
        return count

    # -- hashes ------------------------------------------------------------

    async def hset(self, key: str, field: str, value: bytes) -> None:
        try:
            await self._client.hset(key, field, value)
        except _DRIVER_ERRORS as exc:
            raise self._error("HSET", exc) from exc

    async def hget(self, key: str, field: str) -> bytes | None:
        try:
            value = await self._client.hget(key, field)
        except _DRIVER_ERRORS as exc:
            raise self._error("HGET", exc) from exc
        return cast("bytes | None", value)

    async def hdel(self, key: str, field: str) -> bool:
        try:
            return bool(await self._client.hdel(key, field))
        except _DRIVER_ERRORS as exc:
            raise self._error("HDEL", exc) from exc

    async def hincrby(self, key: str, amounts: dict[str, int], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for field, amount in amounts.items():
                    pipe.hincrby(key, field, amount)
                pipe.pexpire(key, ttl_ms(ttl_s))
                await pipe.execute()
        except _DRIVER_ERRORS as exc:
            raise self._error("HINCRBY", exc) from exc

    async def hset_confirmed(
        self, key: str, field: str, value: bytes | None, *, replicas: int | None, aof: bool, timeout_s: float
    ) -> Confirmed:
        """See confirm.py: the write and its WAIT on a connection of their own, never retried."""
        write: tuple[ScriptArg, ...] = (
            ("HSET", key, field, value) if value is not None else ("HDEL", key, field)
        )
        try:
            async with own_connection(self._client, key) as connection:
                return await write_confirmed(
                    connection,
                    write,
                    replicas=replicas,
                    aof=aof,
                    timeout_s=timeout_s,
                    reply_timeout_s=self._timeout_s,
                )
        except (StoreError, *_DRIVER_ERRORS, TimeoutError) as exc:
            raise self._error("HSET" if value is not None else "HDEL", exc) from exc

    async def hgetall(self, key: str) -> dict[str, bytes]:
        try:
            reply = await self._client.hgetall(key)
        except _DRIVER_ERRORS as exc:
            raise self._error("HGETALL", exc) from exc
        return {field.decode(): value for field, value in reply.items()}

    # -- scripts -----------------------------------------------------------

    async def register(self, *scripts: Script) -> None:
        """SCRIPT LOAD each script now: a Lua error shows at startup, not on a request."""
        for script in scripts:
            try:
                await self._load(script)
            except _DRIVER_ERRORS as exc:
                raise self._error(f"SCRIPT LOAD of {script.name}", exc) from exc

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        (reply,) = await self.run_many(((script, keys, args),))
        if isinstance(reply, StoreError):
            raise reply
        return reply

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """EVALSHA each call in one pipeline; see the module docstring for SCRIPT LOAD and NOSCRIPT."""
        if not calls:
            return []
        loaded = self._loaded
        started = time.perf_counter()
        try:
            replies = await self._send(calls, [script for script, _, _ in calls if script.sha not in loaded])
        except (StoreError, *_DRIVER_ERRORS) as exc:
            self._observe(started, True)
            raise self._error(_scripts(calls), exc) from exc
        self._observe(started, False)
        for reply in replies:
            if isinstance(reply, Exception):
                return await self._settle(calls, replies)
        return replies

    async def _settle(self, calls: Sequence[Call], replies: list[Any]) -> list[Any]:
        """Replies with an error among them: retry the NOSCRIPT calls, then a `StoreError` in the place
        of each call that still failed."""
        lost = [i for i, reply in enumerate(replies) if _noscript(reply)]
        if lost:
            # Redis lost its script cache since we loaded them (restart, failover, SCRIPT FLUSH).
            again = [calls[i] for i in lost]
            try:
                retried = await self._send(again, [script for script, _, _ in again])
            except (StoreError, *_DRIVER_ERRORS) as exc:
                raise self._error(_scripts(again), exc) from exc
            for i, reply in zip(lost, retried, strict=True):
                replies[i] = reply
        return [
            self._error(f"script {script.name}", reply) if isinstance(reply, Exception) else reply
            for (script, _, _), reply in zip(calls, replies, strict=True)
        ]

    def _send(self, calls: Sequence[Call], loads: Sequence[Script]) -> Awaitable[list[Any]]:
        """One round trip: SCRIPT LOAD of `loads`, then an EVALSHA per call; one reply per call."""
        if loads:
            loads = _distinct(loads)
        return self._lean_send(calls, loads) if self._lean is not None else self._pipeline_send(calls, loads)

    async def _lean_send(self, calls: Sequence[Call], loads: Sequence[Script]) -> list[Any]:
        """`_send` on the lean client: every command in one write."""
        assert self._lean is not None
        commands = [encode(("SCRIPT", "LOAD", script.lua)) for script in loads]
        commands += [encode(("EVALSHA", script.sha, len(keys), *keys, *args)) for script, keys, args in calls]
        # Each command's keys, for a cluster's routing; SCRIPT LOAD goes to every node the calls go to.
        routes: list[Sequence[str] | None] = [None] * len(loads) + [keys for _, keys, _ in calls]
        replies = await self._lean.execute(*commands, keys=routes)
        if len(commands) == 1:
            return [replies]
        return self._after_loads(loads, calls, replies) if loads else replies

    async def _pipeline_send(self, calls: Sequence[Call], loads: Sequence[Script]) -> list[Any]:
        """`_send` on redis.asyncio: a pipeline, not a transaction (the keys may span slots)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for script in loads:
                pipe.script_load(script.lua)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        return self._after_loads(loads, calls, replies) if loads else replies

    def _after_loads(self, loads: Sequence[Script], calls: Sequence[Call], replies: list[Any]) -> list[Any]:
        """The calls' replies, after those of SCRIPT LOAD of `loads`; notes which scripts Redis has now.

        A refused load (a Lua syntax error) becomes the reply of its script's calls: their
        NOSCRIPT would only trigger a reload bound to fail the same way.
        """
        refused: dict[str, StoreError] = {}
        for script, loaded in zip(loads, replies, strict=False):
            if isinstance(loaded, Exception):
                refused[script.sha] = StoreError(f"SCRIPT LOAD refused: {loaded}")
            else:
                self._loaded.add(script.sha)
        replies = replies[len(loads) :]
        if refused:
            replies = [
                refused.get(script.sha, reply) for (script, _, _), reply in zip(calls, replies, strict=True)
            ]
        return replies

    async def _load(self, script: Script) -> None:
        await self._client.script_load(script.lua)
        self._loaded.add(script.sha)

    # -- pub/sub -----------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> int:
        try:
            receivers: int = await (self._publisher or self._client).publish(channel, message)
        except _DRIVER_ERRORS as exc:
            raise self._error("PUBLISH", exc) from exc
        return receivers

    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> Subscription:
        """Subscribe, waiting up to `timeout_s` for Redis to confirm (else `StoreError`)."""
        return await self._pubsub.subscribe(channel, handler)

    # -- logs (Redis streams) ----------------------------------------------

    async def xadd(self, key: str, *values: bytes, ttl_s: float) -> None:
        check_ttl(ttl_s)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for value in values:
                    pipe.xadd(key, {b"v": value})
                pipe.pexpire(key, ttl_ms(ttl_s))
                await pipe.execute()
        except _DRIVER_ERRORS as exc:
            raise self._error("XADD", exc) from exc

    async def xread(self, key: str, after: str, *, block_s: float = 0) -> list[tuple[str, bytes]]:
        try:
            if block_s > 0:
                # The connection has no read timeout: bound the wait here (BLOCK plus a round trip).
                async with asyncio.timeout(block_s + self._timeout_s):
                    reply = await self._blocking_client.xread({key: after}, block=ttl_ms(block_s))
            else:
                reply = await self._client.xread({key: after})
        except (*_DRIVER_ERRORS, TimeoutError) as exc:
            raise self._error("XREAD", exc) from exc
        if not reply:
            return []
        [[_, entries]] = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]", reply)
        return [(ident.decode(), fields[b"v"]) for ident, fields in entries]


def _noscript(reply: Any) -> bool:
    """Whether an EVALSHA's reply says Redis does not have the script (either client's error type)."""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")
    )


def _distinct(scripts: Sequence[Script]) -> list[Script]:
    """Each script once: a script in several calls is loaded once."""
    return list({script.sha: script for script in scripts}.values())


def _scripts(calls: Sequence[Call]) -> str:
    """What a failed round trip names in its error: its scripts."""
    names = dict.fromkeys(script.name for script, _, _ in calls)
    return f"script{'s' if len(names) > 1 else ''} {', '.join(names)}"
