"""Rate limits, quotas, concurrency caps and budgets: all of a request's checks in one atomic script.

A request is checked against its key's limits, the key's limits on that model,
and the quota of the deployment it will go to. One script run decides them
together on the store's clock (Redis TIME, so a replica's skewed clock changes
nothing) and either charges every counter or none. When the model's first
deployments are over their quota the script picks the next deployment that has
room (the router's order); only when none has, the client gets 429.

Kinds of limit:
    sliding   rpm, tpm, rpd: counters per bucket (3 s for a minute, 1 h for a day);
              a bucket's usage counts until a window after its last charge (the
              counter's expiry, set to that instant + window + 2 buckets, records
              it), and a request is admitted when what still counts leaves room.
              Only the oldest bucket of the span (the current one and a window's
              worth before it) can be partly past the window, so that is the one
              expiry read. No window of that length ever holds more than the limit
              (never R + 1); the price is that a charge early in a bucket stays
              counted until the bucket's last one is a window old (steady traffic
              gets at least 95% of the limit; bench/limits_error.py measures it
              against an exact sliding log). A refusal's reset is when enough of
              the oldest usage has left for the request, so it is never more than
              the window and a retry then is let in (no one else admitted meanwhile).
    calendar  budgets: USD (as nano-USD) per UTC day or month, a fixed window.
    lease     concurrency: a sorted set of in-flight request ids scored by expiry,
              released when the answer ends and expired if a replica dies mid-request.

Tokens and cost are charged as an estimate on admission (prompt characters / 4
+ the completion tokens asked for) and corrected by `settle` after the answer,
to its real usage (0 for an error or a cache hit).

Store schema: every limit of every key and deployment lives under one hash tag,
`{rl}`, because one script must touch all of a request's counters (a key's and a
deployment's) and Redis Cluster runs a script on one slot only:
    gw:{rl}:k:<key id>:<rpm|tpm|rpd>:<bucket number>       counter; expires window + 2 buckets after
                                                           its last charge
    gw:{rl}:k:<key id>:m:<alias>:<rpm|tpm|rpd>:<bucket>    the key's limits on one model
    gw:{rl}:k:<key id>:usd:<day or month number>           budget spent, nano-USD
    gw:{rl}:k:<key id>:conc                                zset: request id -> lease expiry (ms)
    gw:{rl}:d:<provider>/<model>:<rpm|tpm|rpd>:<bucket>    a deployment's quota, all keys together
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from gateway.config import Limits
from gateway.store import LocalOps, Script, lua_source

PREFIX = "gw:{rl}"
MINUTE_MS, DAY_MS = 60_000, 86_400_000
MINUTE_BUCKET_MS, DAY_BUCKET_MS = 3_000, 3_600_000
MONTH = 0  # a calendar window's length when it is the UTC month
DEFAULT_COMPLETION_TOKENS = 256
NANO_USD_PER_MTOK = 1000  # USD per million tokens x 1000 = nano-USD per token

SLIDING, CALENDAR, LEASE = b"s", b"f", b"c"
REQUESTS, TOKENS, COST = 0, 1, 2  # what a limit counts
_REASON = {
    "rpm": "requests per minute (rpm)",
    "tpm": "tokens per minute (tpm)",
    "rpd": "requests per day (rpd)",
    "usd": "budget (USD)",
    "conc": "concurrent requests",
}


class Spec(NamedTuple):
    """One limit as the script sees it."""

    kind: bytes
    name: str  # the counter's name under PREFIX
    limit: int
    window_ms: int  # sliding/calendar: the window (MONTH: the calendar month); lease: its expiry
    bucket_ms: int  # sliding: the counting step (divides the window); else 0
    counts: int  # REQUESTS, TOKENS or COST
    label: str  # for the 429 message: "rpm", "tpm", "rpd", "usd" or "conc"
    scope: str  # "this key", "this key on model `x`", or a deployment id

    def args(self, group: int, amount: int) -> list[str | int | bytes]:
        """This limit's ADMIT arguments: what never changes goes packed in one (fewer to encode)."""
        return [group, pack(self), amount]


@functools.lru_cache(maxsize=8192)
def pack(spec: Spec) -> bytes:
    return b"%s|%d|%d|%d|%s" % (spec.kind, spec.limit, spec.window_ms, spec.bucket_ms, spec.name.encode())


def specs_of(limits: Limits, name: str, scope: str, lease_ms: int) -> tuple[Spec, ...]:
    out: list[Spec] = []
    minute, day = (MINUTE_MS, MINUTE_BUCKET_MS), (DAY_MS, DAY_BUCKET_MS)
    if limits.rpm:
        out.append(Spec(SLIDING, f"{name}:rpm", limits.rpm, *minute, REQUESTS, "rpm", scope))
    if limits.tpm:
        out.append(Spec(SLIDING, f"{name}:tpm", limits.tpm, *minute, TOKENS, "tpm", scope))
    if limits.rpd:
        out.append(Spec(SLIDING, f"{name}:rpd", limits.rpd, *day, REQUESTS, "rpd", scope))
    if limits.budget_usd:
        window = DAY_MS if limits.budget_period == "day" else MONTH
        budget = round(limits.budget_usd * 1e9)
        out.append(Spec(CALENDAR, f"{name}:usd", budget, window, 0, COST, "usd", scope))
    if limits.concurrency:
        out.append(Spec(LEASE, f"{name}:conc", limits.concurrency, lease_ms, 0, REQUESTS, "conc", scope))
    return tuple(out)


def month_number(ms: int) -> tuple[int, int]:
    """(year * 12 + month - 1, ms until the month ends) in UTC, as the Lua computes it."""
    at = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    following = datetime.datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=datetime.UTC)
    return at.year * 12 + at.month - 1, int(following.timestamp() * 1000) - ms


def calendar(window: int, now: int) -> tuple[int, int, int]:
    """A calendar window at `now`: (its number, ms until it ends, ms its counter lives), as the Lua."""
    if window == MONTH:
        number, reset = month_number(now)
        return number, reset, reset + DAY_MS
    return now // window, window - now % window, 2 * window


def counter_of(spec: Spec, now: int) -> str:
    """The name of the counter `spec` charged at `now` (a sliding bucket or a calendar window)."""
    if spec.kind == SLIDING:
        return f"{spec.name}:{now // spec.bucket_ms}"
    return f"{spec.name}:{calendar(spec.window_ms, now)[0]}"


class _State:
    """One limit's reading in ADMIT (the Lua's table `s`)."""

    __slots__ = (
        "cost", "counts", "first", "fits", "group", "key", "kind", "limit", "names", "reset", "ttl", "used",
        "wait", "window",
    )

    def __init__(self, group: int, kind: bytes, limit: int, cost: int) -> None:
        self.group, self.kind, self.limit, self.cost = group, kind, limit, cost
        self.first: int | None = None
        self.wait: int | None = None
        self.reset = self.window = 0
        self.counts: list[int] = []
        self.names: list[str] = []


def _leaves(ops: LocalOps, s: _State, j: int) -> int:
    """When the usage in bucket j leaves the window: a window after the bucket's last charge,
    which the counter's expiry records (every charge sets it to that instant + ttl)."""
    return ops.pexpiretime(s.names[j]) - s.ttl + s.window


def _read(ops: LocalOps, keys: list[str], args: list[bytes], i: int, now: int) -> _State:
    kind, *numbers, packed_name = args[i + 1].split(b"|", 4)
    limit, window, bucket = map(int, numbers)
    s = _State(int(args[i]), kind, limit, int(args[i + 2]))
    base = f"{keys[0]}:{packed_name.decode()}"
    if kind == LEASE:
        leases = {m: e for m, e in orjson.loads(ops.get(base) or b"{}").items() if e > now}
        ops.set(base, orjson.dumps(leases), window / 1000) if leases else ops.delete(base)
        s.key, s.used, s.reset, s.ttl = base, len(leases), 1000, window
    elif kind == SLIDING:
        # The current bucket and a window's worth before it: a span that covers the last window.
        number, span = now // bucket, window // bucket
        s.names = [f"{base}:{b}" for b in range(number - span, number + 1)]
        s.counts = counts = [int(ops.get(name) or b"0") for name in s.names]
        s.used = sum(counts)
        s.key, s.ttl, s.window = f"{base}:{number}", window + 2 * bucket, window
        # The oldest bucket straddles the window's start: whether its usage has left is read only
        # where it matters (the remaining a key is told; a deployment that is otherwise full).
        if counts[0] > 0 and (s.group == 0 or s.used + s.cost > s.limit):
            s.first = _leaves(ops, s, 0)
            if s.first <= now:
                s.used, counts[0] = s.used - counts[0], 0
    else:
        number, s.reset, s.ttl = calendar(window, now)
        s.key = f"{base}:{number}"
        s.used = int(ops.get(s.key) or b"0")
    s.fits = s.used + s.cost <= s.limit
    return s


def _reset(ops: LocalOps, s: _State, now: int, charged: bool) -> int:
    """ms until `s` lets the request in, no one else admitted meanwhile (when it fits: until the
    first of its counted usage leaves; when it never can: until all of it has left)."""
    if s.kind != SLIDING:
        return s.reset
    need = 1 if s.fits else s.used + s.cost - s.limit
    need = min(need, s.used)
    if need == 0:
        return s.window if charged and s.cost > 0 else 0
    freed = 0
    for j, count in enumerate(s.counts):
        freed += count
        if count > 0 and freed >= need:
            return (s.first if j == 0 and s.first is not None else _leaves(ops, s, j)) - now
    raise AssertionError("need is at most the usage counted")


def _later(a: _State, b: _State) -> bool:
    """Whether `a` holds the request back longer than `b`: a limit it can never fit, else the later wait."""
    never_a, never_b = a.cost > a.limit, b.cost > b.limit
    if never_a != never_b:
        return never_a
    return a.wait > b.wait  # type: ignore[operator]


def _admit_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    now = int(ops.time() * 1000)
    member, alternatives, free = args[0].decode(), int(args[1]), int(args[2])
    states = [_read(ops, keys, args, i, now) for i in range(3, len(args), 3)]
    # A refusal reports the limit that frees last: a retry at its reset is let in by every one.
    refused = chosen = 0
    for i, s in enumerate(states, 1):
        if s.group == 0 and not s.fits:
            s.wait = _reset(ops, s, now, False)
            if refused == 0 or _later(s, states[refused - 1]):
                refused = i
    if alternatives:
        full = {s.group for s in states if s.group and not s.fits}
        chosen = next((g for g in range(1, alternatives + 1) if g not in full), 0)
        if not chosen and not free:
            # Every deployment is over its quota: the one that frees soonest (when its last limit does).
            worst: dict[int, int] = {}
            for i, s in enumerate(states, 1):
                if s.group and not s.fits:
                    s.wait = _reset(ops, s, now, False)
                    if s.group not in worst or _later(s, states[worst[s.group] - 1]):
                        worst[s.group] = i
            soonest = worst[1]
            for g in range(2, alternatives + 1):
                if _later(states[soonest - 1], states[worst[g] - 1]):
                    soonest = worst[g]
            if refused == 0 or _later(states[soonest - 1], states[refused - 1]):
                refused = soonest
        if refused:
            chosen = 0
    if not refused:
        for s in states:
            if s.group not in (0, chosen):
                continue
            if s.kind == LEASE:
                leases = orjson.loads(ops.get(s.key) or b"{}")
                leases[member] = now + s.ttl
                ops.set(s.key, orjson.dumps(leases), s.ttl / 1000)
            elif s.cost:
                ops.incr(s.key, s.cost)
                ops.pexpireat(s.key, now + s.ttl)
    out = [0 if refused else 1, refused, states[refused - 1].wait if refused else 0, chosen, now]
    for s in states:
        if s.group == 0:
            out.append(max(0, s.limit - s.used - (0 if refused else s.cost)))
            out.append(s.wait if s.wait is not None else _reset(ops, s, now, not refused))
    return out


# KEYS[1]: PREFIX. ARGV: lease member, number of alternatives (deployments with quotas, in
# the router's order), 1 if a deployment without quota follows them, then per limit:
# group (0: always; n: alternative n), "kind|limit|window ms|bucket ms|name", cost.
# Reply: [admitted, 1-based index of the refusing limit or 0, its ms to reset, chosen
#         alternative (0: none needed), now ms, then per group-0 limit: remaining, ms to reset]
ADMIT = Script("gateway.rate_admit", lua_source("gateway.limits", "admit.lua"), _admit_local)


RELEASE, CORRECT = b"r", b"c"


def _settle_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    for i in range(0, len(args), 3):
        key = f"{keys[0]}:{args[i + 1].decode()}"
        if args[i] == RELEASE:
            leases = orjson.loads(ops.get(key) or b"{}")
            if leases.pop(args[i + 2].decode(), None) is not None:
                ttl = ops.ttl(key)
                ops.set(key, orjson.dumps(leases), ttl) if leases and ttl else ops.delete(key)
        elif ops.get(key) is not None and (value := ops.incr(key, int(args[i + 2]))) < 0:
            ops.incr(key, -value)  # back to 0, its expiry (the last charge's record) kept
    return 1


# KEYS[1]: PREFIX. ARGV: triples, of one or many requests: ("r", lease name, request id) releases
# a lease; ("c", counter name with its bucket or window number, delta) corrects what admission
# charged. A counter whose window has expired is left alone; none goes below zero.
SETTLE = Script("gateway.rate_settle", lua_source("gateway.limits", "settle.lua"), _settle_local)


def _reconcile_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    for i in range(0, len(args), 3):
        key = f"{keys[0]}:{args[i].decode()}"
        value = ops.incr(key, int(args[i + 1]))
        if ops.ttl(key) is None:
            ops.expire(key, int(args[i + 2]) / 1000)
        if value < 0:
            ops.incr(key, -value)
    return 1


# KEYS[1]: PREFIX. ARGV: triples (budget counter name with its window number, nano-USD, ms the
# counter lives should this create it): spend admitted while the store was unreachable.
RECONCILE = Script("gateway.rate_reconcile", lua_source("gateway.limits", "reconcile.lua"), _reconcile_local)


def estimate(body: Mapping[str, Any], default: int = DEFAULT_COMPLETION_TOKENS) -> tuple[int, int]:
    """(prompt, completion) tokens: prompt characters / 4, a fast stand-in for a tokenizer, and the
    completion tokens asked for (or `default`) for each choice generated (`n`, or `best_of`)."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input") or ""
    chars = len(prompt) if isinstance(prompt, str) else len(orjson.dumps(prompt))
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or completion < 0:
        completion = default
    choices = max([c for c in (body.get("n"), body.get("best_of")) if isinstance(c, int)] or [1])
    return chars // 4, completion * max(choices, 1)


_PROCESS = os.urandom(4).hex()
_SEQUENCE = itertools.count()


def lease_member() -> str:
    """A request's id in lease sets: unique across replicas (a client's x-request-id may repeat)."""
    return f"{_PROCESS}.{next(_SEQUENCE)}"


def reason(spec: Spec) -> str:
    return f"{_REASON[spec.label]} on {spec.scope}"
