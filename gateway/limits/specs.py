"""Rate limits, quotas, concurrency caps and budgets: the ADMIT script and its Python twin.

A request is checked against its key's limits, the key's limits on that model,
and the quota of the deployment it will go to. An ADMIT call decides the limits
of one scope (a key's, or a deployment's) together on the store's clock (Redis
TIME, so a replica's skewed clock changes nothing) and either charges every
counter or none; limiter.py combines the calls of a request.

Kinds of limit:
    sliding   rpm, tpm, rpd: usage per bucket (3 s for a minute, 1 h for a day), all
              of a limit in one hash with the total still counted and the oldest
              bucket with usage; a bucket's usage counts until a window after its
              last charge (recorded per bucket), and a request is admitted when what
              still counts leaves room. Only a bucket a span (window / bucket) behind
              the current one can have left, so a request reads the total and at
              most that bucket; a bucket that left is subtracted from the total once.
              No window of that length ever holds more than the limit (never R + 1);
              the price is that a charge early in a bucket stays counted until the
              bucket's last one is a window old (steady traffic gets at least 95% of
              the limit; bench/limits_error.py measures it against an exact sliding
              log). A refusal's reset is when enough of the oldest usage has left for
              the request, so it is never more than the window and a retry then is
              let in (no one else admitted meanwhile).
    calendar  budgets: USD (as nano-USD) per UTC day or month, a fixed window.
    lease     concurrency: a sorted set of in-flight request ids scored by expiry,
              released when the answer ends and expired if a replica dies mid-request.

Tokens and cost are charged as an estimate on admission (prompt characters / 4
+ the completion tokens asked for) and corrected by `settle` after the answer,
to its real usage (0 for an error or a cache hit).

Store schema: a key's limits live under its own hash tag and each deployment's quota
under its own, so on Redis Cluster they spread over the shards (a script runs on one
slot: a request runs ADMIT once per tag, see limiter.py):
    gw:{k:<key id>}:<rpm|tpm|rpd>              hash: t (usage counted), o (oldest bucket with usage),
                                               <bucket> (its usage), l<bucket> (its last charge, ms);
                                               expires window + 2 buckets after the last charge
    gw:{k:<key id>}:m:<alias>:<rpm|tpm|rpd>    the key's limits on one model
    gw:{k:<key id>}:usd:<day or month number>  budget spent, nano-USD
    gw:{k:<key id>}:conc                       zset: request id -> lease expiry (ms)
    gw:{d:<provider>/<model>}:<rpm|tpm|rpd>    a deployment's quota, all keys together
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
    name: str  # the counter's name, starting with its hash tag (key_base, deployment_base)
    limit: int
    window_ms: int  # sliding/calendar: the window (MONTH: the calendar month); lease: its expiry
    bucket_ms: int  # sliding: the counting step (divides the window); else 0
    counts: int  # REQUESTS, TOKENS or COST
    label: str  # for the 429 message: "rpm", "tpm", "rpd", "usd" or "conc"
    scope: str  # "this key", "this key on model `x`", or a deployment id

    @property
    def tag(self) -> str:
        """The hash-tagged prefix its script call is routed by: every counter of the scope shares it."""
        return tag_of(self.name)

    def args(self, amount: int) -> list[str | int | bytes]:
        """This limit's ADMIT arguments: what never changes goes packed in one (fewer to encode)."""
        return [pack(self), amount]


def key_base(key_id: str) -> str:
    return f"gw:{{k:{key_id}}}"


def deployment_base(deployment: str) -> str:
    return f"gw:{{d:{deployment}}}"


def tag_of(name: str) -> str:
    """`name` up to its hash tag's end: the KEYS[1] that routes a script call on its counters."""
    return name[: name.index("}") + 1]


@functools.lru_cache(maxsize=8192)
def pack(spec: Spec) -> bytes:
    return b"%s|%d|%d|%d" % (spec.kind, spec.limit, spec.window_ms, spec.bucket_ms)


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


def counter_of(spec: Spec, now: int) -> tuple[str, int]:
    """The calendar hash `spec` charged at `now` and the window (day or month number) it counted."""
    return spec.name, calendar(spec.window_ms, now)[0]


def correction(spec: Spec, now: int, delta: int) -> tuple[bytes, str, str, int]:
    """SETTLE's arguments adding `delta` to what `spec` charged at `now` (its bucket or window)."""
    if spec.kind == SLIDING:
        return HASH, spec.name, str(now // spec.bucket_ms), delta
    return CORRECT, spec.name, str(calendar(spec.window_ms, now)[0]), delta


class _State:
    """One limit's reading in ADMIT (the Lua's table `s`)."""

    __slots__ = (
        "cost", "current", "dirty", "first", "fits", "hash", "key", "kind", "limit", "number", "oldest",
        "reset", "ttl", "used", "wait", "window",
    )  # fmt: skip

    def __init__(self, kind: bytes, limit: int, cost: int, key: str) -> None:
        self.kind, self.limit, self.cost, self.key = kind, limit, cost, key
        self.first: tuple[int, int] | None = None  # the oldest bucket's (usage, last charge), when read
        self.wait: int | None = None
        self.oldest: int | None = None
        self.reset = self.window = self.number = self.current = 0
        self.dirty = False
        self.hash: dict[str, bytes] = {}


def _bucket(s: _State, b: int) -> tuple[int, int]:
    """Usage and last charge of bucket b."""
    return int(s.hash.get(str(b), b"0")), int(s.hash.get(f"l{b}", b"0"))


def _slide(ops: LocalOps, s: _State, now: int, span: int) -> None:
    """See admit.lua: t (usage counted), o (oldest bucket with usage), <b> and l<b> per bucket."""
    s.hash = ops.hash(s.key) or {}  # the stored hash: what is dropped here is gone, as HDEL in Lua
    s.used = int(s.hash.get("t", b"0"))
    s.oldest = int(s.hash["o"]) if "o" in s.hash else None
    s.current = _bucket(s, s.number)[0]
    while s.oldest is not None and s.oldest <= s.number - span:
        count, last = _bucket(s, s.oldest)
        if last + s.window > now:
            s.first = (count, last)
            return
        s.used, s.dirty = s.used - count, True
        s.hash.pop(str(s.oldest), None)
        s.hash.pop(f"l{s.oldest}", None)
        s.oldest = next((b for b in range(s.oldest + 1, s.number + 1) if str(b) in s.hash), None)


def _read(ops: LocalOps, keys: list[str], args: list[bytes], j: int, now: int) -> _State:
    kind, *numbers = args[2 * j + 2].split(b"|")
    limit, window, bucket = map(int, numbers)
    s = _State(kind, limit, int(args[2 * j + 3]), keys[j])
    if kind == LEASE:
        leases = {m: e for m, e in orjson.loads(ops.get(s.key) or b"{}").items() if e > now}
        ops.set(s.key, orjson.dumps(leases), window / 1000) if leases else ops.delete(s.key)
        s.used, s.reset, s.ttl = len(leases), 1000, window
    elif kind == SLIDING:
        s.window, s.ttl, s.number = window, window + 2 * bucket, now // bucket
        _slide(ops, s, now, window // bucket)
    else:
        s.number, s.reset, s.ttl = calendar(window, now)
        s.hash = ops.hash(s.key) or {}
        s.used = int(s.hash.get("v", b"0")) if s.hash.get("n") == b"%d" % s.number else 0
    s.fits = s.used + s.cost <= s.limit
    return s


def _reset(s: _State, now: int, charged: bool) -> int:
    """ms until `s` lets the request in, no one else admitted meanwhile (when it fits: until the
    first of its counted usage leaves; when it never can: until all of it has left)."""
    if s.kind != SLIDING:
        return s.reset
    need = 1 if s.fits else s.used + s.cost - s.limit
    need = min(need, s.used)
    if need == 0:
        return s.window if charged and s.cost > 0 else 0
    assert s.oldest is not None  # usage counted: some bucket holds it
    freed = 0
    for b in range(s.oldest, s.number + 1):
        count, last = s.first if b == s.oldest and s.first else _bucket(s, b)
        freed += count
        if count > 0 and freed >= need:
            return last + s.window - now
    raise AssertionError("need is at most the usage counted")


def later(never_a: bool, wait_a: int, never_b: bool, wait_b: int) -> bool:
    """Whether a limit holds a request back longer than another: one it can never fit, else the
    later wait (the Lua's `later`; limiter.py compares the refusals of two calls with it)."""
    if never_a != never_b:
        return never_a
    return wait_a > wait_b


def _admit_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    now = int(ops.time() * 1000)
    member, report = args[0].decode(), args[1] == b"1"
    states = [_read(ops, keys, args, j, now) for j in range(len(keys))]
    # A refusal reports the limit that frees last: a retry at its reset is let in by every one.
    refused = 0
    for i, s in enumerate(states, 1):
        if not s.fits:
            s.wait = _reset(s, now, False)
            if refused == 0 or later(s.cost > s.limit, s.wait, *_never_wait(states[refused - 1])):
                refused = i
    for s in states:
        if not refused and s.kind == LEASE:
            leases = orjson.loads(ops.get(s.key) or b"{}")
            leases[member] = now + s.ttl
            ops.set(s.key, orjson.dumps(leases), s.ttl / 1000)
        elif not refused and s.cost and s.kind == SLIDING:
            stored = ops.hash(s.key, create=True)  # s.hash itself when it existed
            assert stored is not None
            oldest = s.number if s.oldest is None else s.oldest
            stored["t"], stored["o"] = b"%d" % (s.used + s.cost), b"%d" % oldest
            stored[str(s.number)], stored[f"l{s.number}"] = b"%d" % (s.current + s.cost), b"%d" % now
            ops.expire(s.key, s.ttl / 1000)
        elif not refused and s.cost:
            stored = ops.hash(s.key, create=True)
            assert stored is not None
            stored.update({"n": b"%d" % s.number, "v": b"%d" % (s.used + s.cost)})
            ops.pexpireat(s.key, now + s.ttl)
        elif s.dirty:  # buckets that left, dropped: the total and the oldest follow
            if s.oldest is None:
                ops.delete(s.key)
            else:
                s.hash.update({"t": b"%d" % s.used, "o": b"%d" % s.oldest})
    out = [0 if refused else 1, refused, states[refused - 1].wait if refused else 0, now]
    if report:
        for s in states:
            out.append(max(0, s.limit - s.used - (0 if refused else s.cost)))
            out.append(s.wait if s.wait is not None else _reset(s, now, not refused))
    return out


def _never_wait(s: _State) -> tuple[bool, int]:
    assert s.wait is not None
    return s.cost > s.limit, s.wait


# KEYS: the limits of one scope (a key's, or a deployment's: one hash tag). ARGV: lease member, 1
# to report every limit's state (a key's: its x-ratelimit-* headers) else 0, then per key:
# "kind|limit|window ms|bucket ms", cost. All are charged, or none.
# Reply: [admitted, 1-based index of the refusing limit or 0, its ms to reset, now ms,
#         then when reported, per limit: remaining, ms to reset]
ADMIT = Script("gateway.rate_admit", lua_source("gateway.limits", "admit.lua"), _admit_local)


RELEASE, CORRECT, HASH = b"r", b"c", b"h"


def _settle_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    for i in range(0, len(args), 4):
        op, key, field, value = args[i], args[i + 1].decode(), args[i + 2].decode(), args[i + 3]
        if op == RELEASE:
            leases = orjson.loads(ops.get(key) or b"{}")
            if leases.pop(value.decode(), None) is not None:
                ttl = ops.ttl(key)
                ops.set(key, orjson.dumps(leases), ttl) if leases and ttl else ops.delete(key)
            continue
        stored = ops.hash(key)
        if stored is None:
            continue
        if op == CORRECT:
            if stored.get("n") == field.encode():
                stored["v"] = b"%d" % max(0, int(stored["v"]) + int(value))
        elif field in stored:
            count = int(stored[field])
            corrected = max(0, count + int(value))
            stored[field] = b"%d" % corrected
            stored["t"] = b"%d" % max(0, int(stored.get("t", b"0")) + corrected - count)
    return 1


# KEYS: every key of ARGV (one hash tag). ARGV: quadruples, of one or many requests: (RELEASE,
# lease, "", request id); (CORRECT, calendar hash, window number, delta); (HASH, sliding hash,
# bucket number, delta). What has expired is left alone; nothing goes below zero.
SETTLE = Script("gateway.rate_settle", lua_source("gateway.limits", "settle.lua"), _settle_local)


def _reconcile_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    for i in range(0, len(args), 4):
        key, number, amount = args[i].decode(), int(args[i + 1]), int(args[i + 2])
        stored = ops.hash(key, create=True)
        assert stored is not None
        counted = int(stored["n"]) if "n" in stored else None
        if counted == number:
            stored["v"] = b"%d" % max(0, int(stored["v"]) + amount)
        elif counted is None or counted < number:
            stored.update({"n": b"%d" % number, "v": b"%d" % max(0, amount)})
            ops.expire(key, int(args[i + 3]) / 1000)
    return 1


# KEYS: the budgets' calendar hashes (one hash tag). ARGV: quadruples (hash, window number,
# nano-USD, ms the hash lives should this make it): spend admitted while the store was unreachable.
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
