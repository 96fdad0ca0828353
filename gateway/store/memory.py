"""The in-process store: the embedded default, so the gateway runs with no Redis at all.

State is only shared within one process. Every operation, a script's `local`
function included, runs synchronously in the event loop with no await inside,
which makes it atomic as a Lua script is on Redis.

Expiry is lazy (a key past its deadline is dropped when touched) plus an
amortised sweep: deadlines sit in a heap and each operation pops a bounded
number of the expired ones, so keys nobody reads again still go away without a
background thread, and no single call pays for a mass expiry.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    deliver,
    ttl_ms,
)

# Expired keys dropped per operation at most: more than any operation creates,
# so the backlog shrinks, yet small enough to bound one call's latency.
_SWEEP_BUDGET = 64
# Redis integers are signed 64-bit; INCRBY past that is an error there.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class Log:
    """A Redis stream, reduced to what the gateway uses: ids ("<ms>-<seq>") and one value each."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[tuple[int, int], bytes]] = []

    def append(self, now_s: float, value: bytes) -> None:
        ms = int(now_s * 1000)
        if self.entries and self.entries[-1][0][0] >= ms:
            last = self.entries[-1][0]
            ident = (last[0], last[1] + 1)  # as Redis: ids grow even when the clock does not
        else:
            ident = (ms, 0)
        self.entries.append((ident, value))

    def after(self, after: str) -> list[tuple[str, bytes]]:
        ms, _, seq = after.partition("-")
        start = bisect.bisect_right(self.entries, (int(ms), int(seq or 0)), key=lambda entry: entry[0])
        return [(f"{i[0]}-{i[1]}", value) for i, value in self.entries[start:]]


class Keyspace:
    """The memory store's keys, values and deadlines; implements `LocalOps` for scripts."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._values: dict[str, bytes | dict[str, bytes] | Log] = {}  # a dict is a Redis hash
        self._deadlines: dict[str, float] = {}
        # (deadline, key) entries; one goes stale when its key's deadline changes
        # and is skipped when popped. Rebuilt when stale entries dominate.
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._values)

    def time(self) -> float:
        return self._clock()

    def _live(self, key: str) -> bytes | dict[str, bytes] | Log | None:
        deadline = self._deadlines.get(key)
        if deadline is not None and deadline <= self._clock():
            self._drop(key)
            return None
        return self._values.get(key)

    def get(self, key: str) -> bytes | None:
        value = self._live(key)
        if value is not None and not isinstance(value, bytes):
            raise StoreError(_WRONGTYPE)
        return value

    def hash(self, key: str, *, create: bool = False) -> dict[str, bytes] | None:
        """The hash at `key` (made empty when missing and `create`); a string there is WRONGTYPE."""
        value = self._live(key)
        if value is None and create:
            value = self._values[key] = {}
        elif value is not None and not isinstance(value, dict):
            raise StoreError(_WRONGTYPE)
        return value

    def log(self, key: str, *, create: bool = False) -> Log | None:
        """The log at `key` (made empty when missing and `create`); another kind of value is WRONGTYPE."""
        value = self._live(key)
        if value is None and create:
            value = self._values[key] = Log()
        elif value is not None and not isinstance(value, Log):
            raise StoreError(_WRONGTYPE)
        return value

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._values[key] = value
        if ttl_s is None:
            self._deadlines.pop(key, None)
        else:
            self._set_deadline(key, self._clock() + ttl_s)

    def incr(self, key: str, amount: int = 1) -> int:
        current = self.get(key)
        value = amount if current is None else _as_int(current) + amount
        if not _INT_MIN <= value <= _INT_MAX:
            raise StoreError("increment or decrement would overflow")
        self._values[key] = str(value).encode()
        return value

    def expire(self, key: str, ttl_s: float) -> None:
        if self._live(key) is None:
            return
        if ttl_s <= 0:
            self._drop(key)  # as PEXPIRE with a non-positive time
        else:
            self._set_deadline(key, self._clock() + ttl_s)

    def pexpireat(self, key: str, at_ms: int) -> None:
        if self._live(key) is None:
            return
        if at_ms <= self._clock() * 1000:
            self._drop(key)  # as PEXPIREAT with a time already past
        else:
            self._set_deadline(key, at_ms / 1000)

    def ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            return None
        deadline = self._deadlines.get(key)
        return None if deadline is None else deadline - self._clock()

    def delete(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        self._drop(key)
        return True

    def sweep(self) -> None:
        """Drop up to `_SWEEP_BUDGET` keys whose deadline has passed."""
        heap = self._heap
        if not heap or heap[0][0] > (now := self._clock()):
            return
        for _ in range(_SWEEP_BUDGET):
            if not heap or heap[0][0] > now:
                break
            deadline, key = heapq.heappop(heap)
            if self._deadlines.get(key) == deadline:
                self._drop(key)

    def _set_deadline(self, key: str, deadline: float) -> None:
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        # Keys whose TTL is refreshed on every request leave stale entries behind;
        # rebuilding when they outnumber the live ones keeps the heap O(keys).
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._heap = [(d, k) for k, d in self._deadlines.items()]
            heapq.heapify(self._heap)

    def _drop(self, key: str) -> None:
        self._values.pop(key, None)
        self._deadlines.pop(key, None)


class MemoryStore(Store):
    """A `Store` in this process's memory. `clock` (seconds since the epoch) is injectable for tests."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._keys = Keyspace(clock)
        self._channels: dict[str, list[_MemorySubscription]] = {}
        # Set, and replaced, by every xadd: blocked readers wake and look at their own log again.
        self._appended = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def ping(self) -> None:
        """Always answers: the memory store cannot be unreachable."""

    async def aclose(self) -> None:
        """End every subscription; the data stays until the store is dropped."""
        for subscriptions in self._channels.values():
            for subscription in subscriptions:
                subscription.active = False
        self._channels.clear()

    # -- keys and counters -------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        self._keys.sweep()
        return self._keys.get(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None, nx: bool = False) -> bool:
        check_ttl(ttl_s)
        keys = self._keys
        keys.sweep()
        if nx and keys.get(key) is not None:
            return False
        keys.set(key, value, ttl_s)
        return True

    async def delete(self, *keys: str) -> int:
        self._keys.sweep()
        return sum(self._keys.delete(key) for key in keys)

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        check_ttl(ttl_s)
        if ttl_s is None:
            self._keys.sweep()
            return self._keys.incr(key, amount)
        count: int = await self.run(INCR_WITH_TTL, [key], [amount, ttl_ms(ttl_s)])
        return count

    # -- hashes ------------------------------------------------------------

    async def hset(self, key: str, field: str, value: bytes) -> None:
        self._keys.sweep()
        hash_ = self._keys.hash(key, create=True)
        assert hash_ is not None
        hash_[field] = value

    async def hget(self, key: str, field: str) -> bytes | None:
        self._keys.sweep()
        hash_ = self._keys.hash(key)
        return None if hash_ is None else hash_.get(field)

    async def hdel(self, key: str, field: str) -> bool:
        self._keys.sweep()
        hash_ = self._keys.hash(key)
        if hash_ is None or hash_.pop(field, None) is None:
            return False
        if not hash_:
            self._keys.delete(key)  # as Redis: an emptied hash is no key at all
        return True

    async def hset_confirmed(
        self, key: str, field: str, value: bytes | None, *, replicas: int | None, aof: bool, timeout_s: float
    ) -> Confirmed:
        # One process, no replicas and no failover: nothing to wait for, so nothing is short.
        if value is None:
            await self.hdel(key, field)
        else:
            await self.hset(key, field, value)
        return Confirmed(wanted=0, replicas=0)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        self._keys.sweep()
        return dict(self._keys.hash(key) or {})

    async def hincrby(self, key: str, amounts: dict[str, int], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        self._keys.sweep()
        hash_ = self._keys.hash(key, create=True)
        assert hash_ is not None
        for field, amount in amounts.items():
            hash_[field] = str(_as_int(hash_.get(field, b"0")) + amount).encode()
        self._keys.expire(key, ttl_s)

    # -- scripts -----------------------------------------------------------

    async def register(self, *scripts: Script) -> None:
        """Nothing to prepare: a script's `local` is plain Python."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run `script.local` now, synchronously; its result is converted as Lua's would be."""
        self._keys.sweep()
        argv = [_encode_arg(arg) for arg in args]
        try:
            result = script.local(self._keys, list(keys), argv)
        except StoreError:
            raise
        except Exception as exc:
            # Redis answers a Lua runtime error with an error reply; keep the two alike.
            raise StoreError(f"script {script.name!r} failed: {exc!r}") from exc
        return _redis_reply(result, script)

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """Each twin in turn; a failing one leaves its `StoreError` in its place."""
        replies: list[Any] = []
        for script, keys, args in calls:
            try:
                replies.append(await self.run(script, keys, args))
            except StoreError as exc:
                replies.append(exc)
        return replies

    # -- pub/sub -----------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> int:
        subscriptions = self._channels.get(channel)
        if not subscriptions:
            return 0
        # Delivered from the event loop after publish returns, as from Redis:
        # the publisher never runs subscriber code, and call_soon keeps order.
        asyncio.get_running_loop().call_soon(_deliver_all, tuple(subscriptions), channel, message)
        return len(subscriptions)

    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> Subscription:
        subscription = _MemorySubscription(self._channels, channel, handler)
        self._channels.setdefault(channel, []).append(subscription)
        return subscription

    # -- logs (Redis streams) ----------------------------------------------

    async def xadd(self, key: str, *values: bytes, ttl_s: float) -> None:
        check_ttl(ttl_s)
        keys = self._keys
        keys.sweep()
        log = keys.log(key, create=True)
        assert log is not None
        for value in values:
            log.append(keys.time(), value)
        keys.expire(key, ttl_s)
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()

    async def xread(self, key: str, after: str, *, block_s: float = 0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + block_s
        while True:
            self._keys.sweep()
            log = self._keys.log(key)
            entries = [] if log is None else log.after(after)
            remaining = deadline - time.monotonic()
            if entries or remaining <= 0:
                return entries
            try:
                await asyncio.wait_for(self._appended.wait(), remaining)
            except TimeoutError:
                return []


class _MemorySubscription(Subscription):
    def __init__(
        self,
        channels: dict[str, list[_MemorySubscription]],
        channel: str,
        handler: Callable[[bytes], None],
    ) -> None:
        self._channels = channels
        self.channel = channel
        self.handler = handler
        self.active = True

    async def aclose(self) -> None:
        if not self.active:
            return
        self.active = False
        subscriptions = self._channels[self.channel]
        subscriptions.remove(self)
        if not subscriptions:
            del self._channels[self.channel]


def _deliver_all(subscriptions: tuple[_MemorySubscription, ...], channel: str, message: bytes) -> None:
    for subscription in subscriptions:
        # Closed between publish and delivery: Redis would not deliver it either.
        if subscription.active:
            deliver(subscription.handler, channel, message)


def _as_int(value: bytes) -> int:
    # Redis accepts only the canonical decimal form ("07", " 7" and "7.0" are errors).
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or str(number).encode() != value:
        raise StoreError("value is not an integer or out of range")
    return number


def _encode_arg(arg: ScriptArg) -> bytes:
    """ARGV as redis-py sends it, so a script's `local` sees the bytes its Lua twin sees."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise StoreError(f"invalid script argument of type {type(arg).__name__}")


def _redis_reply(value: Any, script: Script) -> Any:
    """Convert a `local` result as Redis converts a Lua result (see `Script`)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return 1 if value else None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list | tuple):
        return [_redis_reply(item, script) for item in value]
    raise StoreError(f"script {script.name!r} returned a {type(value).__name__}, not a Redis reply")
