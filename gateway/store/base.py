"""The store interface: every shared fact of the gateway goes through a `Store`.

Two backends implement it (`MemoryStore`, `RedisStore`) and one contract suite
(tests/contract) holds them to the same behaviour. The interface centres on
`run(script, keys, args)`: a feature does all of a request's store work in one
atomic round trip, written once in Lua for Redis and once in Python for memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Sequence
from importlib import resources
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self

ScriptArg = str | int | float | bytes

logger = logging.getLogger("gateway.store")


class StoreError(Exception):
    """The store failed: unreachable, timed out, or refused a command.

    A backend's driver errors are wrapped into this (`raise StoreError(...) from exc`)
    so callers decide fail-open or fail-closed on one type. Messages never hold a
    password from the store URL.
    """


class LocalOps(Protocol):
    """What a `Script.local` function may use: the memory store's keyspace, synchronously.

    The twin Lua script uses the matching Redis commands (GET, SET PX, INCRBY, PEXPIRE,
    PEXPIREAT, PTTL, DEL, TIME; HMGET, HSET, HDEL on hashes). An operation on a value of the wrong kind raises
    `StoreError`, as Redis aborts the script with an error reply.
    """

    def time(self) -> float:
        """The store's clock in seconds since the epoch (Redis: TIME)."""
        ...

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store `value`; without `ttl_s` any previous expiry is cleared (as Redis SET)."""
        ...

    def incr(self, key: str, amount: int = 1) -> int:
        """Add `amount` (a missing key counts as 0); keeps the key's expiry (as INCRBY)."""
        ...

    def expire(self, key: str, ttl_s: float) -> None:
        """Expire `key` in `ttl_s` seconds; nothing happens when it does not exist."""
        ...

    def pexpireat(self, key: str, at_ms: int) -> None:
        """Expire `key` at `at_ms` (ms since the epoch), as PEXPIREAT; nothing when it does not exist."""
        ...

    def ttl(self, key: str) -> float | None:
        """Seconds left, or None when the key does not exist *or* has no expiry.

        Lua tells the two apart (PTTL -2 / -1); a script that must do so in
        Python pairs this with `get`.
        """
        ...

    def delete(self, key: str) -> bool: ...

    def hash(self, key: str, *, create: bool = False) -> dict[str, bytes] | None:
        """The hash at `key`, itself (changes to it are the store's), made empty when missing and
        `create`; None when missing. The Lua twin uses HMGET, HSET, HDEL."""
        ...


class Script:
    """A server-side atomic operation: Lua for Redis, a Python function for the memory store.

    Both must return the same Redis-typed result: int, bytes, None, or (nested)
    lists of those. Lua's conversions apply on Redis (numbers are truncated to
    integers, `true` is 1, `false` is nil), and the memory store applies the same
    to what `local` returns, so the two stay comparable in the contract suite.
    `local` receives ARGV as bytes, encoded as redis-py encodes them.
    """

    __slots__ = ("local", "lua", "name", "sha")

    def __init__(
        self,
        name: str,
        lua: str,
        local: Callable[[LocalOps, list[str], list[bytes]], Any],
    ) -> None:
        self.name = name
        self.lua = lua
        self.local = local
        # Redis names a script by the SHA1 of its body: known here, before any SCRIPT LOAD.
        self.sha = hashlib.sha1(lua.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]})"


def lua_source(package: str, *names: str) -> str:
    """The text of `names`, joined in order, from `package`'s `lua/` folder (each concern keeps its own)."""
    folder = resources.files(package).joinpath("lua")
    return "".join(folder.joinpath(name).read_text() for name in names)


Call = tuple[Script, Sequence[str], Sequence[ScriptArg]]  # one script run: script, KEYS, ARGV


STORE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StoreStats:
    """A backend's round trips on the request path (scripts, get, set), for the metrics to read.

    Kept by whoever outlives the store (the metrics), so a reload that builds a
    new store does not start the counts again.
    """

    __slots__ = ("buckets", "errors", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(STORE_SECONDS) + 1)  # round trips per `le` bucket, +Inf last
        self.seconds = 0.0
        self.errors = 0  # of them, those that failed (unreachable, timed out, connection lost)

    def observe(self, seconds: float, failed: bool) -> None:
        self.buckets[bisect_left(STORE_SECONDS, seconds)] += 1
        self.seconds += seconds
        self.errors += failed


class Confirmed(NamedTuple):
    """What `Store.hset_confirmed` got acknowledged (Redis: WAIT, or WAITAOF with `aof`)."""

    wanted: int  # replicas asked to acknowledge the write
    replicas: int  # of them, those that did in time (with `aof`: that wrote it to their AOF)
    aof: bool = False  # asked that the primary's AOF hold the write too
    on_disk: bool = False  # with `aof`: the primary fsynced it to its AOF
    refused: str = ""  # the wait command's error reply (WAITAOF before Redis 7.2, or without appendonly)

    def shortfall(self) -> str:
        """What is missing, in words ("" when the write is confirmed as asked)."""
        if self.refused:
            return f"the store refused to confirm it: {self.refused}"
        missing = []
        if self.replicas < self.wanted:
            missing.append(f"confirmed by {self.replicas} of {self.wanted} store replicas")
        if self.aof and not self.on_disk:
            missing.append("not yet in the primary's append-only file")
        return ", ".join(missing)


class Subscription(ABC):
    """A live subscription returned by `Store.subscribe`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop delivering messages to this subscription's handler. Idempotent, never raises."""


class Store(ABC):
    """Shared state of the gateway. Every method is a coroutine; failures raise `StoreError`."""

    stats: StoreStats | None = None  # set by the app to count round trips; the memory store makes none

    # -- lifecycle ---------------------------------------------------------

    @abstractmethod
    async def ping(self) -> None:
        """Check the store answers; raises `StoreError` when it is unreachable."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and stop background work (subscriptions end)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- keys and counters -------------------------------------------------

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when it is missing or expired."""

    @abstractmethod
    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None, nx: bool = False) -> bool:
        """Store `value`, expiring after `ttl_s` seconds (> 0) when given; else any old expiry is cleared.

        With `nx`, only when the key does not exist: returns False when it does.
        """

    @abstractmethod
    async def delete(self, *keys: str) -> int:
        """Remove `keys`; returns how many existed."""

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        """Add `amount` to the integer at `key` and return the new value.

        `ttl_s` is applied only when this call creates the key, so a counter's
        window is fixed by its first increment. A non-integer value raises `StoreError`.
        """

    # -- hashes ------------------------------------------------------------

    @abstractmethod
    async def hset(self, key: str, field: str, value: bytes) -> None:
        """Set `field` of the hash at `key` (created when missing)."""

    @abstractmethod
    async def hget(self, key: str, field: str) -> bytes | None:
        """One field of the hash at `key`, or None."""

    @abstractmethod
    async def hdel(self, key: str, field: str) -> bool:
        """Remove `field`; returns whether it existed. An emptied hash disappears."""

    @abstractmethod
    async def hgetall(self, key: str) -> dict[str, bytes]:
        """Every field of the hash at `key` ({} when missing)."""

    @abstractmethod
    async def hset_confirmed(
        self, key: str, field: str, value: bytes | None, *, replicas: int | None, aof: bool, timeout_s: float
    ) -> Confirmed:
        """Set `field` of the hash at `key` to `value` (None: remove it), then wait, at most `timeout_s`,
        until that many replicas of the primary that took the write acknowledge it.

        For the writes a failover must not undo (admin keys). `replicas` None: every replica connected
        to that primary at the write (none on a lone node: no wait); 0: none. With `aof` the primary
        and those replicas must have fsynced it to their append-only files too. A shortfall is no
        error, the write stands on the primary: the result says what was confirmed. The memory store
        has no replicas and no failover, so it confirms at once.
        """

    @abstractmethod
    async def hincrby(self, key: str, amounts: dict[str, int], *, ttl_s: float) -> None:
        """Add each amount to its field of the hash at `key` (one round trip); the hash expires
        `ttl_s` after this write."""

    # -- scripts -----------------------------------------------------------

    @abstractmethod
    async def register(self, *scripts: Script) -> None:
        """Prepare `scripts` ahead of their first `run` (at startup).

        Redis loads them, so a Lua syntax error surfaces here rather than on a
        request. Optional: `run` prepares a script on first use anyway.
        """

    @abstractmethod
    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run `script` atomically in one round trip with KEYS=`keys` and ARGV=`args`.

        An error raised by the script (Lua error reply or Python exception) is a `StoreError`.
        """

    @abstractmethod
    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """Run each (script, keys, args) of `calls` as `run` does, in ONE round trip, in order.

        A pipeline, not a transaction: each script is atomic, but the calls may touch
        different hash slots and another client may run between them. A script that
        fails leaves a `StoreError` in its place (the others' replies still count: a
        caller must not lose a counter another script charged); an unreachable store
        raises `StoreError`.
        """

    # -- pub/sub -----------------------------------------------------------

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> int:
        """Send `message` to every current subscriber of `channel`, on any replica.

        Returns how many subscriptions received it (Redis counts one per subscribed connection).
        """

    @abstractmethod
    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> Subscription:
        """Call `handler` with each message published on `channel` from now on, in order.

        Returns once the subscription is active: a message published after that
        is delivered. Handlers run in the event loop and must not block; one that
        raises is logged and keeps its subscription.
        """

    # -- logs (Redis streams) ----------------------------------------------

    @abstractmethod
    async def xadd(self, key: str, *values: bytes, ttl_s: float) -> None:
        """Append `values`, in order, to the log at `key` (created when missing), in one round trip.

        The log expires `ttl_s` after this write. Entries get increasing ids (Redis stream ids).
        """

    @abstractmethod
    async def xread(self, key: str, after: str, *, block_s: float = 0) -> list[tuple[str, bytes]]:
        """The entries of the log at `key` with ids after `after` ("0": from the start), oldest first.

        Each is (id, value); pass the last id as `after` to read on. When there are none,
        waits up to `block_s` seconds (> 0) for an append, else answers at once; [] when
        nothing came or the log does not exist.
        """


def deliver(handler: Callable[[bytes], None], channel: str | bytes, message: bytes) -> None:
    """Call a subscriber; its exception is logged and must not stop delivery to the others."""
    try:
        handler(message)
    except Exception:
        logger.exception("store: a subscriber of channel %r raised; it stays subscribed", channel)


def _incr_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    created = ops.get(keys[0]) is None
    value = ops.incr(keys[0], int(args[0]))
    if created:
        ops.expire(keys[0], int(args[1]) / 1000)
    return value


# `incr` with a TTL in one atomic step on both backends; ARGV: amount, TTL in ms.
INCR_WITH_TTL = Script(
    "gateway.incr_with_ttl",
    lua="""
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
""",
    local=_incr_local,
)


def check_ttl(ttl_s: float | None) -> None:
    """Reject a non-positive TTL as a caller's bug (Redis would refuse it as an error reply)."""
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")


def ttl_ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds, rounded up so a tiny TTL never becomes 0 (which Redis refuses)."""
    return max(1, math.ceil(ttl_s * 1000))
