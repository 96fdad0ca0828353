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
    PREFIX,
    RECONCILE,
    SETTLE,
    SLIDING,
    month_number,
)
from gateway.store import LocalOps, Script, Store

from . import all_stores, bounded_tests

pytestmark = pytest.mark.anyio


def limit(
    name: str,
    cap: int,
    cost: int = 1,
    *,
    group: int = 0,
    kind: bytes = SLIDING,
    window: int = MINUTE_MS,
    bucket: int | None = None,
) -> list[Any]:
    if bucket is None:
        bucket = window // 20 if kind == SLIDING else 0
    return [group, b"%s|%d|%d|%d|%s" % (kind, cap, window, bucket, name.encode()), cost]


async def admit(
    store: Store, *limits: list[Any], alternatives: int = 0, free: int = 0, member: str = ""
) -> list[int]:
    args: list[Any] = [member, alternatives, free]  # then 3 fields per limit
    for spec in limits:
        args += spec
    return [int(x) for x in await store.run(ADMIT, [PREFIX], args)]


@all_stores
@bounded_tests
class TestAdmission:
    async def test_exactly_the_limit_under_concurrency(self, store: Store) -> None:
        results: list[int] = []

        async def one() -> None:
            results.append((await admit(store, limit("k:a:rpm", 50)))[0])

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert results.count(1) == 50 and results.count(0) == 150

    async def test_all_or_none_and_the_refusing_limit(self, store: Store) -> None:
        both = (limit("k:a:rpm", 10), limit("k:a:tpm", 100, 80))
        first = await admit(store, *both)
        assert first[:4] == [1, 0, 0, 0] and first[4] > 1_700_000_000_000  # the store's clock, ms
        assert [first[5], first[7]] == [9, 20]  # remaining requests, tokens
        second = await admit(store, *both)
        assert second[0] == 0 and second[1] == 2 and second[2] == second[8]  # tpm's reset, in its header too
        assert MINUTE_MS - 1000 < second[2] <= MINUTE_MS  # when the first request's 80 tokens leave
        third = await admit(store, limit("k:a:rpm", 10))
        assert third[5] == 8  # the refused request charged nothing

    async def test_window_slides_and_never_admits_more_than_the_limit_in_any_window(
        self, store: Store
    ) -> None:
        spec = limit("k:a:rps", 2, window=400)
        assert [(await admit(store, spec))[0] for _ in range(3)] == [1, 1, 0]
        await anyio.sleep(0.25)  # half a window on: still counted (a two-window estimate would free one)
        refused = await admit(store, spec)
        assert refused[0] == 0 and 0 < refused[2] <= 400 - 250 + 20
        await anyio.sleep(refused[2] / 1000 + 0.03)  # the retry-after it gave is enough
        assert (await admit(store, spec))[0] == 1

    async def test_settle_corrects_never_below_zero_and_skips_gone_windows(self, store: Store) -> None:
        reply = await admit(store, limit("k:a:tpm", 100, 90))
        bucket = reply[4] // (MINUTE_MS // 20)
        await store.run(SETTLE, [PREFIX], ["c", f"k:a:tpm:{bucket}", -60])
        assert (await admit(store, limit("k:a:tpm", 100, 0)))[5] == 70
        await store.run(SETTLE, [PREFIX], ["c", f"k:a:tpm:{bucket}", -500, "c", f"k:a:tpm:{bucket - 5}", 7])
        assert (await admit(store, limit("k:a:tpm", 100, 100)))[0] == 1
        assert await store.get(f"{PREFIX}:k:a:tpm:{bucket - 5}") is None  # not created by a correction


@all_stores
@bounded_tests
class TestDeploymentsAndLeases:
    async def test_first_deployment_with_room_is_chosen_and_charged(self, store: Store) -> None:
        key = limit("k:a:rpm", 100)
        east, west = limit("d:east:rpm", 1, group=1), limit("d:west:rpm", 5, group=2)
        replies = [await admit(store, key, east, west, alternatives=2) for _ in range(3)]
        assert [r[3] for r in replies] == [1, 2, 2]
        assert [r[5] for r in replies] == [99, 98, 97]  # the key is charged whichever deployment

    async def test_every_deployment_full_refuses_unless_one_without_quota_follows(self, store: Store) -> None:
        east = limit("d:east:rpm", 1, group=1)
        assert (await admit(store, east, alternatives=1))[:4] == [1, 0, 0, 1]
        refused = await admit(store, limit("k:a:rpm", 10), east, alternatives=1)
        assert refused[:2] == [0, 2] and MINUTE_MS - 1000 < refused[2] <= MINUTE_MS  # the deployment's limit
        assert refused[5] == 10  # the key was not charged
        spill = await admit(store, limit("k:a:rpm", 10), east, alternatives=1, free=1)
        assert spill[:4] == [1, 0, 0, 0]  # admitted, to the deployment without a quota

    async def test_concurrency_lease_caps_releases_and_expires(self, store: Store) -> None:
        cap = limit("k:a:conc", 2, kind=LEASE, window=400)
        assert [(await admit(store, cap, member=m))[0] for m in ("r1", "r2", "r3")] == [1, 1, 0]
        await store.run(SETTLE, [PREFIX], ["r", "k:a:conc", "r1", "r", "k:a:conc", "unknown"])
        assert (await admit(store, cap, member="r4"))[0] == 1
        await anyio.sleep(0.5)  # r2 and r4 die with their replica: their leases expire
        assert [(await admit(store, cap, member=m))[0] for m in ("r5", "r6", "r7")] == [1, 1, 0]

    async def test_budget_is_a_calendar_month_on_the_store_clock(self, store: Store) -> None:
        budget = limit("k:a:usd", 1_000_000, 600_000, kind=CALENDAR, window=MONTH)
        first = await admit(store, budget)
        number, reset = month_number(first[4])
        assert first[0] == 1 and first[5:] == [400_000, reset]
        assert (await admit(store, budget))[0] == 0
        await store.run(SETTLE, [PREFIX], ["c", f"k:a:usd:{number}", -500_000])  # it cost less
        assert (await admit(store, budget))[0] == 1

    async def test_reconcile_adds_outage_spend_remaking_a_lost_counter(self, store: Store) -> None:
        budget = limit("k:a:usd", 1_000_000, 100_000, kind=CALENDAR, window=MONTH)
        number, reset = month_number((await admit(store, budget))[4])
        kept, lost = f"k:a:usd:{number}", f"k:b:usd:{number}"
        await store.run(RECONCILE, [PREFIX], [kept, 250_000, 300, lost, 70_000, 300, "k:c:usd:1", -9, 300])
        assert await store.get(f"{PREFIX}:{kept}") == b"350000"
        assert await store.get(f"{PREFIX}:{lost}") == b"70000"  # made again, expiring with the ttl given
        assert await store.get(f"{PREFIX}:k:c:usd:1") == b"0"  # never below zero
        reply = await admit(store, budget)
        assert reply[5] == 1_000_000 - 350_000 - 100_000 and reply[6] == pytest.approx(reset, abs=5_000)
        await anyio.sleep(0.4)
        assert await store.get(f"{PREFIX}:{lost}") is None and await store.get(f"{PREFIX}:{kept}") is not None

    async def test_calendar_day(self, store: Store) -> None:
        reply = await admit(store, limit("k:a:usd", 10, 3, kind=CALENDAR, window=DAY_MS))
        assert reply[5] == 7 and reply[6] == DAY_MS - reply[4] % DAY_MS


def _put_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> None:
    for i, key in enumerate(keys):
        ops.set(key, args[2 * i])
        ops.pexpireat(key, int(args[2 * i + 1]))


# Counters as ADMIT leaves them: KEYS, and ARGV pairs (count, expiry ms = the last charge + ttl).
PUT = Script(
    "test.put_counters",
    """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 * i - 1])
  redis.call('PEXPIREAT', key, ARGV[2 * i])
end
""",
    _put_local,
)
BUCKET = MINUTE_MS // 20
TTL = MINUTE_MS + 2 * BUCKET  # a minute limit's counter lives this long after its last charge


async def usage(store: Store, name: str, charges: list[tuple[int, int]]) -> None:
    """Bucket counters of limit `name` holding `charges` (last charge ms, amount): one per bucket."""
    keys = [f"{PREFIX}:{name}:{last // BUCKET}" for last, _ in charges]
    await store.run(PUT, keys, [x for last, amount in charges for x in (amount, last + TTL)])


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
        return (await admit(store, limit("k:clock:rpm", 1, 0)))[4]  # charges nothing

    @pytest.mark.parametrize(
        ("cost", "admitted"),
        [(5, 1), (40, 0), (71, 0), (200, 0)],
        ids=["fits", "needs-two-buckets-to-leave", "needs-all-but-the-newest", "never-fits"],
    )
    async def test_tokens_wait_for_as_many_buckets_as_the_request_needs(
        self, store: Store, cost: int, admitted: int
    ) -> None:
        charges = charges_at(await self.now(store))
        await usage(store, "k:a:tpm", charges)
        reply = await admit(store, limit("k:a:tpm", 100, cost))
        remaining, reset = expected(charges, 100, cost, reply[4])
        assert reply == [admitted, 1 - admitted, 0 if admitted else reset, 0, reply[4], remaining, reset]
        assert 0 < reset <= MINUTE_MS

    async def test_the_oldest_bucket_leaves_a_window_after_its_last_charge(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        # Its last charge a window and a bit ago: gone, though its bucket is still in the span.
        await usage(store, "k:a:rpm", [((number - 20) * BUCKET + 1, 3), (number * BUCKET, 1)])
        reply = await admit(store, limit("k:a:rpm", 2))
        assert reply[:2] == [1, 0] and reply[5] == 0

    async def test_the_limit_that_frees_last_is_reported(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        await usage(store, "k:a:rpm", [((number - 15) * BUCKET, 2)])
        await usage(store, "k:a:tpm", [((number - 10) * BUCKET, 60), (number * BUCKET, 40)])
        reply = await admit(store, limit("k:a:rpm", 2), limit("k:a:tpm", 100, 50))
        assert reply[:2] == [0, 2]  # both refuse; tpm frees later
        assert reply[2] == (number - 10) * BUCKET + MINUTE_MS - reply[4] == reply[8]
        assert reply[6] == (number - 15) * BUCKET + MINUTE_MS - reply[4]  # rpm's own, in its header

    async def test_every_deployment_full_reports_the_one_free_soonest_when_its_last_limit_frees(
        self, store: Store
    ) -> None:
        now = await self.now(store)
        number = now // BUCKET
        await usage(store, "d:east:rpm", [((number - 18) * BUCKET, 1)])  # frees first, but
        await usage(store, "d:east:tpm", [((number - 2) * BUCKET, 90)])  # east's tpm frees last
        await usage(store, "d:west:rpm", [((number - 8) * BUCKET, 1)])
        east = (limit("d:east:rpm", 1, group=1), limit("d:east:tpm", 100, 20, group=1))
        reply = await admit(store, limit("k:a:rpm", 10), *east, limit("d:west:rpm", 1, group=2), alternatives=2)
        assert reply[:2] == [0, 4] and reply[3] == 0  # west's rpm (the 4th limit)
        assert reply[2] == (number - 8) * BUCKET + MINUTE_MS - reply[4]
        assert reply[5:] == [10, 0]  # the key: nothing charged, nothing counted

    async def test_a_later_deployment_wait_outranks_the_keys(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        await usage(store, "k:a:rpm", [((number - 18) * BUCKET, 1)])
        await usage(store, "d:east:rpm", [((number - 3) * BUCKET, 1)])
        reply = await admit(store, limit("k:a:rpm", 1), limit("d:east:rpm", 1, group=1), alternatives=1)
        assert reply[:2] == [0, 2] and reply[2] == (number - 3) * BUCKET + MINUTE_MS - reply[4]
        spill = await admit(store, limit("k:a:rpm", 1), limit("d:east:rpm", 1, group=1), alternatives=1, free=1)
        assert spill[:2] == [0, 1]  # a deployment without quota follows: only the key holds it back

    async def test_a_request_over_a_deployments_quota_waits_for_another(self, store: Store) -> None:
        now = await self.now(store)
        number = now // BUCKET
        await usage(store, "d:west:tpm", [((number - 12) * BUCKET, 900)])
        small = limit("d:east:tpm", 100, 500, group=1)  # 500 tokens never fit east
        reply = await admit(store, small, limit("d:west:tpm", 1000, 500, group=2), alternatives=2)
        assert reply[:2] == [0, 2] and reply[2] == (number - 12) * BUCKET + MINUTE_MS - reply[4]


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
