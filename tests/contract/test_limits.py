"""The limit scripts on every backend: exact under concurrency, all-or-none, on the store's clock."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from gateway.limits.specs import (
    ADMIT,
    CALENDAR,
    DAY_MS,
    LEASE,
    MINUTE_MS,
    MONTH,
    RECONCILE,
    SETTLE,
    SLIDING,
    month_number,
)
from gateway.store import LocalOps, Script, Store

from . import all_stores, bounded_tests

pytestmark = pytest.mark.anyio


KEY, EAST = "gw:{k:a}", "gw:{d:east}"  # a key's tag and a deployment's


def limit(
    name: str,
    cap: int,
    cost: int = 1,
    *,
    kind: bytes = SLIDING,
    window: int = MINUTE_MS,
    bucket: int | None = None,
) -> list[Any]:
    if bucket is None:
        bucket = window // 20 if kind == SLIDING else 0
    return [name, b"%s|%d|%d|%d" % (kind, cap, window, bucket), cost]


async def admit(store: Store, *limits: list[Any], report: bool = True, member: str = "") -> list[int]:
    """ADMIT on `limits`, which share a hash tag: their names are its KEYS."""
    args: list[Any] = [member, int(report)]  # then 2 fields per limit
    for _, packed, cost in limits:
        args += [packed, cost]
    return [int(x) for x in await store.run(ADMIT, [name for name, _, _ in limits], args)]


@all_stores
@bounded_tests
class TestAdmission:
    async def test_exactly_the_limit_under_concurrency(self, store: Store) -> None:
        results: list[int] = []

        async def one() -> None:
            results.append((await admit(store, limit(f"{KEY}:rpm", 50)))[0])

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert results.count(1) == 50 and results.count(0) == 150

    async def test_all_or_none_and_the_refusing_limit(self, store: Store) -> None:
        both = (limit(f"{KEY}:rpm", 10), limit(f"{KEY}:tpm", 100, 80))
        first = await admit(store, *both)
        assert first[:3] == [1, 0, 0] and first[3] > 1_700_000_000_000  # the store's clock, ms
        assert [first[4], first[6]] == [9, 20]  # remaining requests, tokens
        second = await admit(store, *both)
        assert second[0] == 0 and second[1] == 2 and second[2] == second[7]  # tpm's reset, in its header too
        assert MINUTE_MS - 1000 < second[2] <= MINUTE_MS  # when the first request's 80 tokens leave
        third = await admit(store, limit(f"{KEY}:rpm", 10))
        assert third[4] == 8  # the refused request charged nothing

    async def test_window_slides_and_never_admits_more_than_the_limit_in_any_window(
        self, store: Store
    ) -> None:
        spec = limit(f"{KEY}:rps", 2, window=400)
        assert [(await admit(store, spec))[0] for _ in range(3)] == [1, 1, 0]
        await anyio.sleep(0.25)  # half a window on: still counted (a two-window estimate would free one)
        refused = await admit(store, spec)
        assert refused[0] == 0 and 0 < refused[2] <= 400 - 250 + 20
        await anyio.sleep(refused[2] / 1000 + 0.03)  # the retry-after it gave is enough
        assert (await admit(store, spec))[0] == 1

    async def test_settle_corrects_never_below_zero_and_skips_gone_windows(self, store: Store) -> None:
        reply = await admit(store, limit(f"{KEY}:tpm", 100, 90))
        bucket = reply[3] // (MINUTE_MS // 20)
        await store.run(SETTLE, [f"{KEY}:tpm"], ["h", f"{KEY}:tpm", bucket, -60])
        assert (await admit(store, limit(f"{KEY}:tpm", 100, 0)))[4] == 70
        await store.run(SETTLE, [f"{KEY}:tpm"], ["h", f"{KEY}:tpm", bucket, -500, "h", f"{KEY}:tpm", bucket - 5, 7])
        assert (await admit(store, limit(f"{KEY}:tpm", 100, 100)))[0] == 1  # bucket - 5 not made by a correction


@all_stores
@bounded_tests
class TestDeploymentsAndLeases:
    async def test_a_deployments_call_reports_only_the_decision(self, store: Store) -> None:
        east = limit(f"{EAST}:rpm", 1)
        first = await admit(store, east, report=False)
        assert first[:3] == [1, 0, 0] and len(first) == 4
        refused = await admit(store, east, limit(f"{EAST}:tpm", 100, 5), report=False)
        assert refused[:2] == [0, 1] and MINUTE_MS - 1000 < refused[2] <= MINUTE_MS and len(refused) == 4
        assert (await admit(store, limit(f"{EAST}:tpm", 100, 100), report=False))[0] == 1  # tpm: nothing charged

    async def test_concurrency_lease_caps_releases_and_expires(self, store: Store) -> None:
        cap = limit(f"{KEY}:conc", 2, kind=LEASE, window=400)
        assert [(await admit(store, cap, member=m))[0] for m in ("r1", "r2", "r3")] == [1, 1, 0]
        await store.run(SETTLE, [f"{KEY}:conc"], ["r", f"{KEY}:conc", "", "r1", "r", f"{KEY}:conc", "", "unknown"])
        assert (await admit(store, cap, member="r4"))[0] == 1
        await anyio.sleep(0.5)  # r2 and r4 die with their replica: their leases expire
        assert [(await admit(store, cap, member=m))[0] for m in ("r5", "r6", "r7")] == [1, 1, 0]

    async def test_budget_is_a_calendar_month_on_the_store_clock(self, store: Store) -> None:
        budget = limit(f"{KEY}:usd", 1_000_000, 600_000, kind=CALENDAR, window=MONTH)
        first = await admit(store, budget)
        number, reset = month_number(first[3])
        assert first[0] == 1 and first[4:] == [400_000, reset]
        assert (await admit(store, budget))[0] == 0
        await store.run(SETTLE, [f"{KEY}:usd"], ["c", f"{KEY}:usd", number, -500_000])  # it cost less
        assert (await admit(store, budget))[0] == 1

    async def test_reconcile_adds_outage_spend_remaking_a_lost_counter(self, store: Store) -> None:
        budget = limit(f"{KEY}:usd", 1_000_000, 100_000, kind=CALENDAR, window=MONTH)
        number, reset = month_number((await admit(store, budget))[3])
        kept, lost, low = f"{KEY}:usd", f"{KEY}:m:x:usd", f"{KEY}:m:y:usd"
        spend = [kept, number, 250_000, 300, lost, number, 70_000, 300, low, number, -9, 300]
        await store.run(RECONCILE, [kept, lost, low], [*spend, kept, number - 1, 5, 300])  # last month: over
        assert await store.hget(kept, "v") == b"350000"
        assert await store.hget(lost, "v") == b"70000"  # made again, expiring with the ttl given
        assert await store.hget(low, "v") == b"0"  # never below zero
        reply = await admit(store, budget)
        assert reply[4] == 1_000_000 - 350_000 - 100_000 and reply[5] == pytest.approx(reset, abs=5_000)
        await anyio.sleep(0.4)
        assert await store.hget(lost, "v") is None and await store.hget(kept, "v") is not None

    async def test_calendar_day(self, store: Store) -> None:
        reply = await admit(store, limit(f"{KEY}:usd", 10, 3, kind=CALENDAR, window=DAY_MS))
        assert reply[4] == 7 and reply[5] == DAY_MS - reply[3] % DAY_MS


def _put_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> None:
    charges = [(int(args[i]), int(args[i + 1])) for i in range(0, len(args), 2)]
    stored = ops.hash(keys[0], create=True)
    assert stored is not None
    for at, amount in charges:
        stored[str(at // BUCKET)], stored[f"l{at // BUCKET}"] = b"%d" % amount, b"%d" % at
    stored["t"] = b"%d" % sum(amount for _, amount in charges)
    stored["o"] = b"%d" % min(at // BUCKET for at, _ in charges)
    ops.pexpireat(keys[0], max(at for at, _ in charges) + TTL)


# A sliding limit's hash as ADMIT leaves it: KEYS[1] the limit, ARGV pairs (last charge ms, amount),
# one per bucket, oldest first.
PUT = Script(
    "test.put_usage",
    f"""
local total, last, oldest = 0, 0, nil
for i = 1, #ARGV, 2 do
  local at, amount = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local b = math.floor(at / {MINUTE_MS // 20})
  redis.call('HSET', KEYS[1], b, amount, 'l' .. b, at)
  total, last = total + amount, math.max(last, at)
  if not oldest or b < oldest then oldest = b end
end
redis.call('HSET', KEYS[1], 't', total, 'o', oldest)
redis.call('PEXPIREAT', KEYS[1], last + {MINUTE_MS + 2 * MINUTE_MS // 20})
""",
    _put_local,
)
BUCKET = MINUTE_MS // 20
TTL = MINUTE_MS + 2 * BUCKET  # a minute limit's hash lives this long after its last charge


async def usage(store: Store, name: str, charges: list[tuple[int, int]]) -> None:
    """Sliding limit `name` holding `charges` (last charge ms, amount): one per bucket, oldest first."""
    await store.run(PUT, [name], [x for last, amount in charges for x in (last, amount)])


def charges_at(now: int) -> list[tuple[int, int]]:
    """Usage spread over the last minute: the oldest bucket's last charge a bucket's end, so
    whether it still counts depends on the instant; one charge per bucket, oldest first."""
    number = now // BUCKET
    return [
        ((number - 19) * BUCKET - 1, 10),  # the bucket straddling the window's start
        ((number - 15) * BUCKET + 100, 30),
        ((number - 5) * BUCKET + 7, 25),
        (number * BUCKET, 30),
    ]


def expected(charges: list[tuple[int, int]], limit: int, cost: int, now: int) -> tuple[int, int]:
    """(remaining, reset ms) by an exact sliding log of the same charges: a charge counts for a
    window from its instant; a refusal's reset is when enough of the oldest has left."""
    counted = [(last, amount) for last, amount in charges if last + MINUTE_MS > now]
    used = sum(amount for _, amount in counted)
    fits = used + cost <= limit
    need = min(1 if fits else used + cost - limit, used)
    freed = 0
    for last, amount in counted:
        freed += amount
        if need and freed >= need:
            return max(0, limit - used - (cost if fits else 0)), last + MINUTE_MS - now
    return max(0, limit - used - (cost if fits else 0)), (MINUTE_MS if fits and cost else 0)


@all_stores
@bounded_tests
class TestRetryAfter:
    """A refusal's reset is when the retry is let in: no later than the window, never bucket-rounded."""

    async def now(self, store: Store) -> int:
        return (await admit(store, limit("gw:{k:clock}:rpm", 1, 0)))[3]  # charges nothing

    @pytest.mark.parametrize(
        ("cost", "admitted"),
        [(5, 1), (40, 0), (71, 0), (200, 0)],
        ids=["fits", "needs-two-buckets-to-leave", "needs-all-but-the-newest", "never-fits"],
    )
    async def test_tokens_wait_for_as_many_buckets_as_the_request_needs(
        self, store: Store, cost: int, admitted: int
    ) -> None:
        charges = charges_at(await self.now(store))
        await usage(store, f"{KEY}:tpm", charges)
        reply = await admit(store, limit(f"{KEY}:tpm", 100, cost))
        remaining, reset = expected(charges, 100, cost, reply[3])
        assert reply == [admitted, 1 - admitted, 0 if admitted else reset, reply[3], remaining, reset]
        assert 0 < reset <= MINUTE_MS

    async def test_the_oldest_bucket_leaves_a_window_after_its_last_charge(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        # Its last charge a window and a bit ago: gone, though its bucket is still in the span.
        await usage(store, f"{KEY}:rpm", [((number - 20) * BUCKET + 1, 3), (number * BUCKET, 1)])
        reply = await admit(store, limit(f"{KEY}:rpm", 2))
        assert reply[:2] == [1, 0] and reply[4] == 0

    async def test_the_limit_that_frees_last_is_reported(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        await usage(store, f"{KEY}:rpm", [((number - 15) * BUCKET, 2)])
        await usage(store, f"{KEY}:tpm", [((number - 10) * BUCKET, 60), (number * BUCKET, 40)])
        reply = await admit(store, limit(f"{KEY}:rpm", 2), limit(f"{KEY}:tpm", 100, 50))
        assert reply[:2] == [0, 2]  # both refuse; tpm frees later
        assert reply[2] == (number - 10) * BUCKET + MINUTE_MS - reply[3] == reply[7]
        assert reply[5] == (number - 15) * BUCKET + MINUTE_MS - reply[3]  # rpm's own, in its header


# The Lua's calendar, cut out of ADMIT, run on any instant (ADMIT itself only sees the store's now).
_LUA_MONTH = ADMIT.lua[ADMIT.lua.index("local DAY") : ADMIT.lua.index("local member")]
MONTH_OF = Script(
    "test.month",
    lua=_LUA_MONTH + "\nlocal n, r = month(tonumber(ARGV[1]))\nreturn {n, r}",
    local=lambda ops, keys, args: list(month_number(int(args[0]))),
)
BOUNDARIES = [
    (1_709_251_199_999, 2024 * 12 + 1, 1),  # 2024-02-29 23:59:59.999 (a leap year)
    (1_709_251_200_000, 2024 * 12 + 2, 31 * DAY_MS),  # 2024-03-01
    (1_740_787_199_000, 2025 * 12 + 1, 1000),  # 2025-02-28 23:59:59 (not a leap year)
    (1_735_689_599_999, 2024 * 12 + 11, 1),  # 2024-12-31 23:59:59.999
    (1_735_689_600_000, 2025 * 12, 31 * DAY_MS),  # 2025-01-01
    (4_107_542_400_000, 2100 * 12 + 2, 31 * DAY_MS),  # 2100-03-01: 2100 is not a leap year
]


@all_stores
@bounded_tests
class TestCalendar:
    async def test_lua_and_python_agree_on_month_boundaries(self, store: Store) -> None:
        for ms, number, reset in BOUNDARIES:
            assert month_number(ms) == (number, reset)
            assert [int(x) for x in await store.run(MONTH_OF, [], [ms])] == [number, reset]
