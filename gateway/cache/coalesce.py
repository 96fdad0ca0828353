"""Request coalescing: identical cacheable requests in flight at once, on any replica, make one upstream call.

A cacheable request looks itself up with `CLAIM` (one round trip, pipelined
with the rate-limit admission when the key has limits): the entry if there is
one, else the lock `<entry key>:lock` with `SET NX PX lease` (it leads), else
the lock's value, the leader's flight token (it follows).

The leader answers its own client as usual; what it sends is also appended, by
a background writer so its client never waits on the store, to the flight's log
`gw:cache:{<sha256>}:flight:<token>` (a Redis stream under the entry's hash tag, so
in the slot of the entry and its lock): the head (content type), each body chunk,
then an end mark, `END` for a complete 200 answer, `FAILED` for anything else (an
error status, a broken stream, a disconnect). While the
flight lasts the writer renews the lease and the log's expiry every lease/3.
On `END` it fills the cache entry first and only then releases the lock, so a
newcomer finds either the entry or the flight.

Followers read the log from the start and then block for new entries, through
one reader per process and flight (`Tail`), however many requests follow it
there, in reads of at most lease/2: when one comes back empty it checks the lock
still holds the token; a lock gone or taken by another flight, with no end mark
in the log, means the leader died (its lease ran out). A streaming follower of a
streamed flight relays each chunk as it arrives; every other follower waits for
the end and answers with the whole (converted to its own mode, gateway/replay.py).
A follower whose client goes away stops following at once. A failed leader
releases the lock before it writes `FAILED`, so a follower that reads the mark
and claims again does not find the failed flight.

A follower never passes on a failure: if the leader fails before the follower
has sent anything, it claims again (one follower leads, the rest follow the new
flight); if it fails after a streaming follower started relaying, that stream
ends with an error event, as a broken upstream stream does, and the answer is
not complete. `cache.coalesce_wait_s` bounds a follower's wait for an answer:
past it (or on a store error) the follower calls upstream on its own. Once a
streaming follower relays, the leader's lease alone decides, so a long live
stream is never cut. Errors and partial streams are never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.store import LocalOps, Script, Store, StoreError

log = logging.getLogger("gateway.cache")

# A log entry is one tag byte, then its data.
HEAD = b"h"  # the answer's content type
CHUNK = b"c"  # body bytes, as sent to the leader's client
END = b"e"  # the answer is complete: 200, whole
FAILED = b"f"  # the answer is not to be passed on


def log_key(lock: str, token: str) -> str:
    """The log of flight `token` of `lock`: under the lock's hash tag, as RENEW touches both."""
    return lock[: lock.index("}") + 1] + ":flight:" + token


def new_token() -> str:
    return secrets.token_hex(8)


def _claim_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[bytes]:
    entry = ops.get(keys[0])
    if entry is not None:
        return [b"hit", entry]
    if args[1] == b"0":
        return [b"miss"]
    holder = ops.get(keys[1])
    if holder is None:
        ops.set(keys[1], args[0], int(args[1]) / 1000)
        return [b"lead"]
    return [b"follow", holder]


# KEYS: entry, lock; ARGV: token, lease in ms (0: look up only, no coalescing)
# -> {"hit", entry} | {"miss"} | {"lead"} | {"follow", leader's token}
CLAIM = Script(
    "gateway.cache.claim",
    lua="""
local entry = redis.call('GET', KEYS[1])
if entry then
  return {'hit', entry}
end
if ARGV[2] == '0' then
  return {'miss'}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'lead'}
end
return {'follow', redis.call('GET', KEYS[2])}
""",
    local=_claim_local,
)


def _renew_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    if ops.get(keys[0]) != args[0]:
        return 0
    ops.expire(keys[0], int(args[1]) / 1000)
    ops.expire(keys[1], int(args[2]) / 1000)
    return 1


# KEYS: lock, log; ARGV: token, lease in ms, log TTL in ms -> 1 while the lock is ours, else 0
RENEW = Script(
    "gateway.cache.renew",
    lua="""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
""",
    local=_renew_local,
)


def _release_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    return int(ops.get(keys[0]) == args[0] and ops.delete(keys[0]))


# KEYS: lock; ARGV: token -> 1 when the lock was ours and is gone
RELEASE = Script(
    "gateway.cache.release",
    lua="""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
    local=_release_local,
)


class Flight:
    """The leader's side: copies its answer to the log, keeps the lease, ends the flight."""

    def __init__(self, store: Store, lock: str, token: str, *, lease_s: float, log_ttl_s: float) -> None:
        self.store = store
        self.lock = lock
        self.token = token
        self.log = log_key(lock, token)
        self.lease_s = lease_s
        self.log_ttl_s = log_ttl_s
        self._pending: list[bytes] = []
        self._wake = asyncio.Event()
        self._fill: Callable[[], Awaitable[None]] | None = None
        self._released = False

    def put(self, tag: bytes, data: bytes = b"") -> None:
        self._pending.append(tag + data)
        self._wake.set()

    def finish(self, fill: Callable[[], Awaitable[None]] | None) -> None:
        """End the flight: complete (then `fill` stores the entry before the lock goes) or failed (None)."""
        self._fill = fill
        self.put(END if fill is not None else FAILED)

    async def run(self) -> None:
        """The writer, in the background from the claim to the end mark."""
        renew_every = self.lease_s / 3
        renewed = time.monotonic()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, renewed + renew_every - time.monotonic())):
                        await self._wake.wait()
                self._wake.clear()
                batch, self._pending = self._pending, []
                if batch:
                    if batch[-1][:1] == FAILED:
                        await self._release()  # first, so followers that read the mark can claim anew
                    await self.store.xadd(self.log, *batch, ttl_s=self.log_ttl_s)
                    if batch[-1][:1] in (END, FAILED):
                        break
                if time.monotonic() - renewed >= renew_every:
                    lease_ms, log_ms = math.ceil(self.lease_s * 1000), math.ceil(self.log_ttl_s * 1000)
                    await self.store.run(RENEW, [self.lock, self.log], [self.token, lease_ms, log_ms])
                    renewed = time.monotonic()
            if self._fill is not None:
                await self._fill()
        except StoreError as exc:
            # Followers see the lease run out and take over.
            log.warning("cache: flight %s not relayed: %s", self.token, exc)
        finally:
            with contextlib.suppress(StoreError):
                await self._release()

    async def _release(self) -> None:
        if not self._released:
            self._released = True
            await self.store.run(RELEASE, [self.lock], [self.token])


class FlightLost(Exception):
    """The leader failed or vanished before its answer was complete."""


class Tail:
    """One reader of a flight's log per process, shared by the process's followers of that flight.

    So a replica makes one blocking read at a time per flight, however many requests follow it.
    `entries` grows as the log does, up to its end mark; `failure` is set when reading ends without
    one (the lease ran out, the store failed).
    """

    def __init__(self, store: Store, lock: str, token: str, *, poll_s: float) -> None:
        self.store = store
        self.lock = lock
        self.token = token
        self.poll_s = poll_s
        self.entries: list[tuple[bytes, bytes]] = []
        self.failure: Exception | None = None
        self.followers = 0
        self.changed = asyncio.Event()  # set, and replaced, whenever entries or failure change
        self.task = asyncio.get_running_loop().create_task(self._read())

    def _changed(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _read(self) -> None:
        after = "0"
        log_name, token = log_key(self.lock, self.token), self.token.encode()
        try:
            while True:
                found = await self.store.xread(log_name, after, block_s=self.poll_s)
                if not found and await self.store.get(self.lock) != token:
                    # The end mark is written before the lock goes: read once more to tell the two apart.
                    found = await self.store.xread(log_name, after)
                    if not found:
                        self.failure = FlightLost(f"flight {self.token}: the leader's lease ran out")
                        return
                if not found:
                    continue
                after = found[-1][0]
                self.entries += [(value[:1], value[1:]) for _, value in found]
                self._changed()
                if self.entries[-1][0] in (END, FAILED):
                    return
        except StoreError as exc:
            self.failure = exc
        finally:
            if self.failure is None and not (self.entries and self.entries[-1][0] in (END, FAILED)):
                self.failure = FlightLost(f"flight {self.token}: no longer read")  # cancelled, or a bug
            self._changed()


class Follow:
    """A follower's side: the flight's log entries (tag, data) as they are appended, up to `END`.

    Raises `FlightLost` when the leader fails, `TimeoutError` past `deadline` (a
    `time.monotonic()`; set it to `math.inf` to wait as long as the leader lives),
    `StoreError` when the store does. `close` when done, so the tail stops with its last follower.
    """

    def __init__(self, tail: Tail, tails: dict[str, Tail], *, deadline: float) -> None:
        self.tail = tail
        self.tails = tails
        self.deadline = deadline
        tail.followers += 1

    @property
    def token(self) -> str:
        return self.tail.token

    def close(self) -> None:
        tail = self.tail
        tail.followers -= 1
        if tail.followers == 0:
            tail.task.cancel()
            if self.tails.get(tail.token) is tail:
                del self.tails[tail.token]

    async def entries(self) -> AsyncIterator[tuple[bytes, bytes]]:
        tail = self.tail
        read = 0
        while True:
            for tag, data in tail.entries[read:]:
                read += 1
                if tag == FAILED:
                    raise FlightLost(f"flight {tail.token}: the leader failed")
                if tag == END:
                    return
                yield tag, data
            if tail.failure is not None:
                raise tail.failure
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            changed = tail.changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
