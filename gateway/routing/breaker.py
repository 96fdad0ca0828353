"""Circuit breakers: one per upstream deployment, kept in the store and shared by every replica.

A breaker is *closed* (traffic flows) until the failures in a rolling window reach
`failures` (or, with `failure_rate`, failures/calls reach the rate over at least
`min_calls` calls); it then *opens* and every replica rejects that deployment (the
router fails over) for a cooldown. After the cooldown the first caller anywhere wins a
probe lease (SET NX with expiry) and the breaker is *half-open*: that one request goes
upstream while everyone else keeps failing over; its success closes the breaker
(cooldown back to `cooldown_s`), its failure re-opens it with the cooldown doubled (up
to `max_cooldown_s`), and a lease that runs out unreported (its replica died) lets the
next caller probe. Keys, one hash tag per deployment so each script touches one slot:
`gw:{brk:<d>}:state` holds "<state> <version> <opened_at_ms> <cooldown_ms>",
`gw:{brk:<d>}:window` ten time buckets "<start_ms>:<failures>:<calls>,..." in one string
(a sorted set of timestamps would be exact but grows with traffic once calls are
counted, and `LocalOps` has only strings; buckets stay bounded and one key keeps every
key declared in KEYS), and `gw:{brk:<d>}:probe` the lease; all times come from the
store's clock. The common path costs no round trip: each replica holds every breaker's
state in memory, a closed breaker admits with a dict lookup, and an open one rejects
until its local retry time; the script that changes a state returns it and the replica
publishes it on `gw:{brk}:events`, whose handler applies it synchronously, ordered by
the version, so every replica knows before its next request. Outcomes are recorded in
the background, failures at once, successes (counted only for `failure_rate`) in
batches. When the store is unreachable the same scripts run on a private in-process
store: this replica counts and decides alone (fail open) and says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Annotated, Any

import msgspec

from gateway.routing.breaker_scripts import CLOSED, HALF_OPEN, OPEN, PROBE, RECORD, SCRIPTS, SETTLE
from gateway.store import MemoryStore, Script, ScriptArg, Store, StoreError, Subscription

log = logging.getLogger("gateway.breaker")

_STATES = {CLOSED: CLOSED, OPEN: OPEN, HALF_OPEN: HALF_OPEN}  # interned, so the hot path compares identities
EVENTS = "gw:{brk}:events"
_BUCKETS = 10  # window resolution: a failure older than window_s * 9/10 may leave it early, never late
_MAX_BATCH_S = 0.1  # successes wait at most this long to be counted together
_WARN_EVERY_S = 10.0
_CLOSE_WAIT_S = 1.0
_RESUBSCRIBE_MAX_S = 5.0
_ERROR_CHARS = 500

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Rate = Annotated[float, msgspec.Meta(gt=0, le=1)]


class BreakerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Config `breaker:`: when a deployment's breaker opens and how long it stays open."""

    failures: PositiveInt = 5  # failures within window_s that open the breaker
    window_s: PositiveFloat = 30
    cooldown_s: PositiveFloat = 10  # first cooldown; doubles after each failed probe...
    max_cooldown_s: PositiveFloat = 300  # ...capped here
    failure_rate: Rate | None = None  # also open when failures/calls >= rate...
    min_calls: PositiveInt = 20  # ...with at least this many calls in the window
    count_429: bool = False  # whether upstream 429 counts as a failure
    # A probe not reported within this is presumed lost (its replica died) and another may go.
    probe_lease_s: PositiveFloat = 30

    def __post_init__(self) -> None:
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError(
                f"max_cooldown_s ({self.max_cooldown_s}) is below cooldown_s ({self.cooldown_s})"
            )


class Admission(enum.Enum):
    ALLOW = "allow"
    PROBE = "probe"  # the single trial request of a half-open breaker: record it with probe=True
    REJECT = "reject"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # 5xx, timeout, connection error
    RATE_LIMITED = "rate_limited"  # upstream 429: a failure only with count_429
    CLIENT_ERROR = "client_error"  # another 4xx: the client's fault, never counted

    @classmethod
    def of_status(cls, status: int) -> Outcome:
        """The outcome of an upstream HTTP status (408, the upstream timing out, is a failure)."""
        if status >= 500 or status == 408:
            return cls.FAILURE
        if status == 429:
            return cls.RATE_LIMITED
        return cls.CLIENT_ERROR if status >= 400 else cls.SUCCESS


# Enum members as plain globals: looking them up on the class costs more than the whole hot path.
_ALLOW, _PROBE, _REJECT = Admission.ALLOW, Admission.PROBE, Admission.REJECT
_SUCCESS, _FAILURE, _RATE_LIMITED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.RATE_LIMITED


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _Breaker:
    """One deployment's breaker as this replica knows it, plus its outcomes not yet sent."""

    __slots__ = (
        "calls",
        "cooldown_ms",
        "deployment",
        "failures",
        "flushing",
        "last_error",
        "opened_ms",
        "pending_calls",
        "pending_failures",
        "probe_keys",
        "probing",
        "record_keys",
        "retry_at",
        "settle_keys",
        "state",
        "timer",
        "version",
    )

    def __init__(self, deployment: str, cooldown_ms: int) -> None:
        self.deployment = deployment
        state, window, lease = (f"gw:{{brk:{deployment}}}:{name}" for name in ("state", "window", "probe"))
        self.record_keys = (state, window, lease)
        self.probe_keys = (state, lease)
        self.settle_keys = (state, lease, window)
        self.state = CLOSED
        self.version = 0  # of the last state applied; 0 also after a local (store-down) decision
        self.opened_ms = 0
        self.cooldown_ms = cooldown_ms
        self.retry_at = 0.0  # local clock: when an open or half-open breaker may ask for a probe
        self.failures = 0  # in the window, as the last reply said
        self.calls = 0
        self.last_error: str | None = None
        self.probing = False  # this replica is asking the store for the probe now
        self.pending_failures = 0
        self.pending_calls = 0
        self.flushing = False
        self.timer: asyncio.TimerHandle | None = None


class Breakers:
    """Every deployment's breaker, for one replica; see the module docstring."""

    def __init__(
        self, store: Store, settings: BreakerSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._fallback = MemoryStore(clock=clock)  # decides alone while `store` is unreachable
        self._breakers: dict[str, _Breaker] = {}
        self._count_429 = settings.count_429
        self._count_calls = settings.failure_rate is not None
        self._cooldown_ms = _ms(settings.cooldown_s)
        window_ms = _ms(settings.window_s)
        self._record_args: tuple[ScriptArg, ...] = (
            window_ms,
            max(1, math.ceil(window_ms / _BUCKETS)),
            settings.failures,
            settings.failure_rate or 0,
            settings.min_calls,
            self._cooldown_ms,
        )
        self._batch_s = min(_MAX_BATCH_S, settings.window_s / _BUCKETS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None
        self._resubscriber: asyncio.Task[None] | None = None
        self._warned_at = -math.inf
        self._closed = False
        # (deployment, state entered) -> changes applied here; the app hands in a dict that outlives reloads.
        self.transitions: dict[tuple[str, ...], float] = {}

    # -- lifecycle -------------------------------------------------------------

    async def start(self, deployments: Iterable[str] = ()) -> None:
        """Subscribe to state changes, then load the state of `deployments` (concurrently: one round trip).

        A deployment first seen later (by `admit` or `record`) is loaded then, in the background.
        """
        for deployment in deployments:
            self._breaker(deployment, load=False)
        try:
            await self._subscribe()
        except StoreError as exc:
            log.error("breaker: store unreachable at start, deciding locally until it answers: %s", exc)
            self._resubscriber = asyncio.create_task(self._resubscribe(), name="gateway.breaker.resubscribe")

    async def _subscribe(self) -> None:
        # Subscribed before loading, so a change made meanwhile is not missed (versions order the two).
        if self._subscription is None:
            self._subscription = await self._store.subscribe(EVENTS, self._on_event)
        await self._store.register(*SCRIPTS)
        await asyncio.gather(*(self._refresh(breaker) for breaker in list(self._breakers.values())))

    async def _resubscribe(self) -> None:
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX_S)
            with contextlib.suppress(StoreError):
                await self._subscribe()
                break
        log.warning("breaker: store reachable again, breaker state is shared")

    async def flush(self) -> None:
        """Send every outcome not yet sent and wait for all background store work (shutdown, tests)."""
        while True:
            for breaker in self._breakers.values():
                if (breaker.pending_failures or breaker.pending_calls) and not breaker.flushing:
                    self._flush_now(breaker)
            if not self._tasks:
                return
            await asyncio.wait(set(self._tasks))

    async def aclose(self) -> None:
        """Unsubscribe, send the outcomes still pending (a bounded wait), stop background work."""
        if self._resubscriber is not None:
            self._resubscriber.cancel()
            await asyncio.gather(self._resubscriber, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.aclose()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), _CLOSE_WAIT_S)
        self._closed = True  # outcomes recorded from now on are dropped
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._fallback.aclose()

    # -- the request path --------------------------------------------------------

    def state(self, deployment: str) -> str:
        """The state as this replica knows it: "closed", "open" or "half_open" (no I/O)."""
        breaker = self._breakers.get(deployment)
        return CLOSED if breaker is None else breaker.state

    def rejects(self, deployment: str) -> bool:
        """Would `admit` refuse now, without asking the store? (Open, or a probe already out.)"""
        breaker = self._breakers.get(deployment)
        if breaker is None or breaker.state is CLOSED:
            return False
        return breaker.probing or self._clock() < breaker.retry_at

    async def admit(self, deployment: str) -> Admission:
        """May a request go to `deployment`? Closed: ALLOW and open in its cooldown: REJECT, both with no I/O.

        Once the cooldown is over, one store call per replica at a time asks for the
        probe: exactly one caller across all replicas gets PROBE, the rest REJECT.
        """
        breaker = self._breakers.get(deployment)
        if breaker is None:
            breaker = self._breaker(deployment)
        if breaker.state is CLOSED:
            return _ALLOW
        if breaker.probing or self._clock() < breaker.retry_at:
            return _REJECT
        breaker.probing = True  # this replica's other callers reject rather than ask too
        try:
            lease_ms = _ms(self._settings.probe_lease_s)
            reply, shared = await self._run(PROBE, breaker.probe_keys, (lease_ms, self._cooldown_ms))
        finally:
            breaker.probing = False
        self._apply(breaker, reply, shared)
        if reply[0]:
            if reply[0] == 1 and shared:
                self._spawn(self._publish(breaker.deployment, reply))
            return _PROBE
        return _ALLOW if breaker.state is CLOSED else _REJECT

    def record(self, deployment: str, outcome: Outcome, *, probe: bool = False) -> None:
        """Note a request's outcome; the store work happens in the background (failures at once)."""
        if outcome is _SUCCESS and not probe and not self._count_calls:
            return  # the common case: nothing to count
        breaker = self._breakers.get(deployment)
        if breaker is None:
            breaker = self._breaker(deployment)
        failed = outcome is _FAILURE or (outcome is _RATE_LIMITED and self._count_429)
        if probe:
            # Anything but a failure shows the upstream answering, so it closes the breaker.
            self._spawn(self._settle(breaker, "failure" if failed else "success"))
        elif breaker.state is not CLOSED:
            return  # a request admitted before the breaker opened: it no longer counts
        elif failed:
            breaker.pending_failures += 1
            breaker.pending_calls += 1
            if not breaker.flushing:
                self._flush_now(breaker)
        elif outcome is _SUCCESS and self._count_calls:
            breaker.pending_calls += 1
            if breaker.timer is None and not breaker.flushing:
                breaker.timer = asyncio.get_running_loop().call_later(self._batch_s, self._flush_now, breaker)

    def note_error(self, deployment: str, message: str) -> None:
        """Remember the last error text (already masked by the caller) for `snapshot`."""
        breaker = self._breakers.get(deployment) or self._breaker(deployment)
        breaker.last_error = message[:_ERROR_CHARS]

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per deployment, for GET /health/providers, as this replica knows it.

        `failures` and `calls`: in the window (while open: those that opened it);
        `opened_at`: store-clock epoch seconds, None when closed.
        """
        return {
            name: {
                "state": breaker.state,
                "failures": breaker.failures,
                "calls": breaker.calls,  # counted only with failure_rate
                "opened_at": breaker.opened_ms / 1000 if breaker.state is not CLOSED else None,
                "cooldown_s": breaker.cooldown_ms / 1000,
                "last_error": breaker.last_error,
            }
            for name, breaker in sorted(self._breakers.items())
        }

    async def reset(self, deployment: str) -> None:
        """Close the breaker now, on every replica (admin); `StoreError` when the store is unreachable."""
        breaker = self._breakers.get(deployment) or self._breaker(deployment, load=False)
        breaker.pending_failures = breaker.pending_calls = 0
        args = ("reset", self._cooldown_ms, _ms(self._settings.max_cooldown_s))
        await self._fallback.run(SETTLE, breaker.settle_keys, args)
        reply = await self._store.run(SETTLE, breaker.settle_keys, args)
        self._apply(breaker, reply, True)
        await self._store.publish(EVENTS, _message(deployment, reply))

    # -- background work ---------------------------------------------------------

    def _breaker(self, deployment: str, *, load: bool = True) -> _Breaker:
        breaker = self._breakers[deployment] = _Breaker(deployment, self._cooldown_ms)
        if load:
            self._spawn(self._refresh(breaker))
        return breaker

    async def _refresh(self, breaker: _Breaker) -> None:
        reply, shared = await self._run(RECORD, breaker.record_keys, (0, 0, *self._record_args))
        self._apply(breaker, reply, shared, counts=True)

    def _flush_now(self, breaker: _Breaker) -> None:
        if breaker.timer is not None:
            breaker.timer.cancel()
            breaker.timer = None
        breaker.flushing = True
        self._spawn(self._flush(breaker))

    async def _flush(self, breaker: _Breaker) -> None:
        try:
            # Outcomes recorded while a call is in flight go in the next one: batches grow with load.
            while breaker.pending_failures or breaker.pending_calls:
                fails, calls = breaker.pending_failures, breaker.pending_calls
                breaker.pending_failures = breaker.pending_calls = 0
                reply, shared = await self._run(
                    RECORD, breaker.record_keys, (fails, calls, *self._record_args)
                )
                self._apply(breaker, reply, shared, counts=True)
                if reply[0] and shared:
                    await self._publish(breaker.deployment, reply)
                if not breaker.pending_failures:
                    break  # successes alone wait for the next batch
        finally:
            breaker.flushing = False
        if breaker.pending_calls and breaker.timer is None and not self._closed:
            breaker.timer = asyncio.get_running_loop().call_later(self._batch_s, self._flush_now, breaker)

    async def _settle(self, breaker: _Breaker, mode: str) -> None:
        args = (mode, self._cooldown_ms, _ms(self._settings.max_cooldown_s))
        reply, shared = await self._run(SETTLE, breaker.settle_keys, args)
        self._apply(breaker, reply, shared)
        if reply[0] and shared:
            await self._publish(breaker.deployment, reply)

    async def _run(
        self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> tuple[list[Any], bool]:
        """Run on the shared store, or on the private one when it is unreachable; says which."""
        try:
            return await self._store.run(script, keys, args), True
        except StoreError as exc:
            self._warn("run", exc)
            return await self._fallback.run(script, keys, args), False

    async def _publish(self, deployment: str, reply: list[Any]) -> None:
        try:
            await self._store.publish(EVENTS, _message(deployment, reply))
        except StoreError as exc:
            self._warn("publish", exc)

    def _warn(self, action: str, exc: StoreError) -> None:
        now = self._clock()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.error(
                "breaker: store unreachable (%s), this replica counts and decides alone: %s", action, exc
            )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work, name="gateway.breaker")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("breaker: background work failed", exc_info=exc)

    # -- applying states -----------------------------------------------------------

    def _on_event(self, message: bytes) -> None:
        """A state change published by any replica (this one included): applied at once."""
        try:
            state, *numbers, deployment = message.decode().split(" ", 7)
            fields: list[Any] = [1, state.encode(), *(int(number) for number in numbers)]
            if len(fields) != 8:
                raise ValueError(len(fields))
        except ValueError:
            log.warning("breaker: ignoring a malformed state message %r", message[:200])
            return
        breaker = self._breakers.get(deployment) or self._breaker(deployment, load=False)
        # Failures travel with the opening, so every replica's snapshot shows what tripped it.
        self._apply(breaker, fields, True, counts=state == OPEN and fields[6] > 0)

    def _apply(self, breaker: _Breaker, reply: Sequence[Any], shared: bool, *, counts: bool = False) -> None:
        """Take a state from a script's reply or a message, unless a newer one was applied already.

        A local (store-down) decision always applies and leaves version 0, so the
        shared store's next word wins over it once it answers again. `counts`: the
        reply is the window script's, whose failures and calls are worth keeping.
        """
        version = reply[2]
        if shared and version < breaker.version:
            return  # an older state, overtaken by a message
        state = _STATES.get(reply[1].decode())
        if state is None:
            return
        if not shared or version > breaker.version:
            if state is not breaker.state:
                entered = (breaker.deployment, state)
                self.transitions[entered] = self.transitions.get(entered, 0.0) + 1
            breaker.state = state
            breaker.version = version if shared else 0
            breaker.opened_ms, breaker.cooldown_ms = reply[3], reply[4]
            if state is CLOSED:
                breaker.failures = breaker.calls = 0
        breaker.retry_at = self._clock() + reply[5] / 1000
        if counts and (state is CLOSED or reply[0]):  # an open breaker's window is not read
            breaker.failures, breaker.calls = reply[6], reply[7]


def _message(deployment: str, reply: Sequence[Any]) -> bytes:
    # "<state> <version> <opened_at_ms> <cooldown_ms> <remaining_ms> <failures> <calls> <deployment>"
    return b"%s %d %d %d %d %d %d %s" % (*reply[1:8], deployment.encode())
