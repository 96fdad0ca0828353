"""Rate limits, quotas, concurrency caps and budgets: all of a request's checks in one atomic script.

A request is checked against its key's limits, the key's limits on that model,
and the quota of the deployment it will go to. One script run decides them
together on the store's clock (Redis TIME, so a replica's skewed clock changes
nothing) and either charges every counter or none. When the model's first
deployments are over their quota the script picks the next deployment that has
room (the router's order); only when none has, the client gets 429.

Kinds of limit:
    sliding   rpm, tpm, rpd: counters per bucket (3 s for a minute, 1 h for a day);
              a request is admitted when the current bucket and the whole window's
              worth of buckets before it, together, leave room. That span always
              covers the last full window, so no window of that length ever holds
              more than the limit (never R + 1); the price is that a request stays
              counted up to one bucket longer than the window, so steady traffic gets
              at least 95% (minute) or 96% (day) of the limit. bench/limits_error.py
              measures both against an exact sliding log.
    calendar  budgets: USD (as nano-USD) per UTC day or month, a fixed window.
    lease     concurrency: a sorted set of in-flight request ids scored by expiry,
              released when the answer ends and expired if a replica dies mid-request.

Tokens and cost are charged as an estimate on admission (prompt characters / 4
+ the completion tokens asked for) and corrected by `settle` after the answer,
to its real usage (0 for an error or a cache hit).

Store schema: every limit of every key and deployment lives under one hash tag,
`{rl}`, because one script must touch all of a request's counters (a key's and a
deployment's) and Redis Cluster runs a script on one slot only:
    gw:{rl}:k:<key id>:<rpm|tpm|rpd>:<bucket number>       counter, expires after window + 2 buckets
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


def counter_of(spec: Spec, now: int) -> str:
    """The name of the counter `spec` charged at `now` (a sliding bucket or a calendar window)."""
    if spec.kind == SLIDING:
        return f"{spec.name}:{now // spec.bucket_ms}"
    return f"{spec.name}:{month_number(now)[0] if spec.window_ms == MONTH else now // spec.window_ms}"


def _sliding(ops: LocalOps, base: str, limit: int, window: int, bucket: int, cost: int, now: int) -> tuple:
    number = now // bucket
    span = window // bucket
    counts = [int(ops.get(f"{base}:{b}") or b"0") for b in range(number - span, number + 1)]
    used = sum(counts)
    need, freed, reset = max(used + cost - limit, 1), 0, window + bucket
    for j, count in enumerate(counts):
        freed += count
        if count and freed >= need:
            reset = (number + j + 1) * bucket - now  # when bucket number - span + j leaves the span
            break
    return f"{base}:{number}", used, reset, window + 2 * bucket


def _admit_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    now = int(ops.time() * 1000)
    member, alternatives, free = args[0].decode(), int(args[1]), int(args[2])
    states = []  # (group, kind, key, limit, cost, used, reset, ttl)
    for i in range(3, len(args), 3):
        group, cost = int(args[i]), int(args[i + 2])
        kind, *numbers, packed_name = args[i + 1].split(b"|", 4)
        limit, window, bucket = map(int, numbers)
        base = f"{keys[0]}:{packed_name.decode()}"
        if kind == LEASE:
            leases = {m: e for m, e in orjson.loads(ops.get(base) or b"{}").items() if e > now}
            ops.set(base, orjson.dumps(leases), window / 1000) if leases else ops.delete(base)
            states.append((group, kind, base, limit, cost, len(leases), 1000, window))
        elif kind == SLIDING:
            key, used, reset, ttl = _sliding(ops, base, limit, window, bucket, cost, now)
            states.append((group, kind, key, limit, cost, used, reset, ttl))
        else:
            if window == MONTH:
                number, reset = month_number(now)
                ttl = reset + DAY_MS
            else:
                number, reset, ttl = now // window, window - now % window, 2 * window
            key = f"{base}:{number}"
            states.append((group, kind, key, limit, cost, int(ops.get(key) or b"0"), reset, ttl))
    refused, reset_ms, chosen = _decide(states, alternatives, free)
    if not refused:
        for group, kind, key, _limit, cost, _used, _reset, ttl in states:
            if group not in (0, chosen):
                continue
            if kind == LEASE:
                leases = orjson.loads(ops.get(key) or b"{}")
                leases[member] = now + ttl
                ops.set(key, orjson.dumps(leases), ttl / 1000)
            elif cost:
                ops.incr(key, cost)
                ops.expire(key, ttl / 1000)
    out = [0 if refused else 1, refused, reset_ms, chosen, now]
    for group, _kind, _key, limit, cost, used, reset, _ttl in states:
        if group == 0:
            out += [max(0, limit - used - (0 if refused else cost)), reset]
    return out


def _decide(states: list[tuple[Any, ...]], alternatives: int, free: int) -> tuple[int, int, int]:
    """(1-based index of the refusing limit or 0, its ms to reset, the chosen alternative or 0)."""
    fits = [state[5] + state[4] <= state[3] for state in states]
    for index, state in enumerate(states):
        if state[0] == 0 and not fits[index]:
            return index + 1, state[6], 0
    if not alternatives:
        return 0, 0, 0
    full = {state[0] for index, state in enumerate(states) if state[0] and not fits[index]}
    for group in range(1, alternatives + 1):
        if group not in full:
            return 0, 0, group
    if free:
        return 0, 0, 0
    # Every deployment is over its quota: report the one that frees soonest.
    waits = [(state[6], index + 1) for index, state in enumerate(states) if state[0] and not fits[index]]
    reset, index = min(waits)
    return index, reset, 0


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
        elif ops.get(key) is not None and ops.incr(key, int(args[i + 2])) < 0:
            ops.set(key, b"0", ops.ttl(key))
    return 1


# KEYS[1]: PREFIX. ARGV: triples, of one or many requests: ("r", lease name, request id) releases
# a lease; ("c", counter name with its bucket or window number, delta) corrects what admission
# charged. A counter whose window has expired is left alone; none goes below zero.
SETTLE = Script("gateway.rate_settle", lua_source("gateway.limits", "settle.lua"), _settle_local)


def estimate(body: Mapping[str, Any], default: int = DEFAULT_COMPLETION_TOKENS) -> tuple[int, int]:
    """(prompt, completion) tokens: prompt characters / 4, a fast stand-in for a tokenizer, and the
    completion tokens asked for (or `default`)."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input") or ""
    chars = len(prompt) if isinstance(prompt, str) else len(orjson.dumps(prompt))
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or completion < 0:
        completion = default
    return chars // 4, completion


_PROCESS = os.urandom(4).hex()
_SEQUENCE = itertools.count()


def lease_member() -> str:
    """A request's id in lease sets: unique across replicas (a client's x-request-id may repeat)."""
    return f"{_PROCESS}.{next(_SEQUENCE)}"


def reason(spec: Spec) -> str:
    return f"{_REASON[spec.label]} on {spec.scope}"
