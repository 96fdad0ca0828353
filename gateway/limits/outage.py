"""Limits while the store is unreachable: what this replica decides on its own.

`Local` counts rpm, tpm, rpd and concurrency on this replica alone (the `limits`
library's sliding window) under `store.outage.limits: open`: each replica enforces
the whole limit by itself until the store is back, and that count is not merged
into the store afterwards (its windows are over by then).

`Ledger` keeps budgets under `store.outage.budgets: open`. A request is checked
against what the store last said this budget had spent (remembered from every
admission's reply while the store answered) plus what this replica admitted
since, and its cost is counted here, corrected to the real cost after the answer.
When the store answers again, the first admission writes that spend into the
store's counters in the same round trip, before it is decided (RECONCILE, then
ADMIT), so the budget is whole again. While the store is down each replica may
spend what was left of a budget: with N replicas, at most N times that (a replica
that has not admitted the key since it started counts from zero).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from gateway.context import Admission
from gateway.limits.specs import COST, LEASE, RECONCILE, TOKENS, Spec, calendar, counter_of, tag_of
from gateway.store import Call


class Local:
    """This replica's own counts while the store is down (the `limits` library's sliding window)."""

    def __init__(self) -> None:
        self._window = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._leases: dict[str, str] = {}  # member -> lease name
        self._held: dict[str, int] = {}

    def admit(
        self, specs: tuple[Spec, ...], admission: Admission, ledger: Ledger | None
    ) -> tuple[Spec, int] | None:
        """The refusing limit and its ms to reset, or None with every local counter charged (all or
        none: no await between). Budgets go to `ledger` (None: the caller refused them already)."""
        checks = []
        for spec in specs:
            if spec.kind == LEASE:
                if self._held.get(spec.name, 0) >= spec.limit:
                    return spec, 1000
                continue
            if spec.counts == COST:
                continue
            item = (RateLimitItemPerDay if spec.window_ms > 60_000 else RateLimitItemPerMinute)(spec.limit)
            amount = admission.tokens if spec.counts == TOKENS else 1
            if amount and not self._window.test(item, spec.name, cost=amount):
                return spec, 1000
            checks.append((item, spec.name, amount))
        if ledger is not None:
            refused = ledger.admit(specs, admission)
            if refused is not None:
                return refused
        for item, name, amount in checks:
            if amount:
                self._window.hit(item, name, cost=amount)
        lease = next((s for s in specs if s.kind == LEASE), None)
        if lease is not None:
            self._held[lease.name] = self._held.get(lease.name, 0) + 1
            self._leases[admission.member] = lease.name
        return None

    def release(self, member: str) -> None:
        name = self._leases.pop(member, None)
        if name is not None:
            self._held[name] -= 1


class Ledger:
    """Budget spend admitted while the store was unreachable, owed to the store's counters."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int]] = {}  # budget name -> (store ms, spent) at its last answer
        self._owed: dict[tuple[str, int], list[int]] = {}  # (budget, window number) -> [nano-USD, expiry ms]

    def __bool__(self) -> bool:
        return bool(self._owed)

    @property
    def owed_usd(self) -> float:
        return sum(amount for amount, _ in self._owed.values()) / 1e9

    def seen(self, spec: Spec, now: int, remaining: int) -> None:
        """The store's answer for budget `spec` at `now`: `remaining` nano-USD left."""
        self._seen[spec.name] = (now, spec.limit - remaining)

    def admit(self, specs: tuple[Spec, ...], admission: Admission) -> tuple[Spec, int] | None:
        """Charge the request's cost to each budget among `specs`, or the one without room and its
        ms to reset (the end of its UTC day or month, on this replica's clock)."""
        now = int(time.time() * 1000)
        charges = []
        for spec in specs:
            if spec.counts != COST:
                continue
            number, reset, ttl = calendar(spec.window_ms, now)
            counter = (spec.name, number)
            seen = self._seen.get(spec.name)
            spent = seen[1] if seen is not None and counter_of(spec, seen[0]) == counter else 0
            owed = self._owed.get(counter)
            if spent + (owed[0] if owed else 0) + admission.cost > spec.limit:
                return spec, reset
            charges.append((spec, counter, now + ttl))
        for spec, counter, expiry in charges:
            self._owed.setdefault(counter, [0, expiry])[0] += admission.cost
            admission.charges.append((spec, now, admission.cost, None))
        return None

    def correct(self, spec: Spec, now: int, delta: int) -> None:
        """A locally admitted request cost `delta` more (or less) than charged at `now`."""
        self._owed.setdefault(counter_of(spec, now), [0, now + calendar(spec.window_ms, now)[2]])[0] += delta

    def take(self) -> list[Call]:
        """RECONCILE calls, one per budget's tag, for everything owed, now forgotten here (`restore`
        the arguments of any that fails)."""
        now = int(time.time() * 1000)
        by_tag: dict[str, tuple[list[str], list[str | int | bytes]]] = {}
        for (name, number), (amount, expiry) in self._owed.items():
            if expiry > now and amount:  # a window already over: its counter is gone, nothing to add
                keys, args = by_tag.setdefault(tag_of(name), ([], []))
                keys.append(name)
                args.extend((name, number, amount, expiry - now))
        self._owed.clear()
        return [(RECONCILE, list(dict.fromkeys(keys)), args) for keys, args in by_tag.values()]

    def restore(self, args: Sequence[str | int | bytes | float]) -> None:
        """Owe again what a call of `take` handed out: the store did not take it."""
        now = int(time.time() * 1000)
        for i in range(0, len(args), 4):
            counter, amount, ttl = (str(args[i]), int(args[i + 1])), int(args[i + 2]), int(args[i + 3])
            self._owed.setdefault(counter, [0, now + ttl])[0] += amount
