"""The circuit breaker on every backend: two `Breakers` on one store stand for two replicas."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest

from gateway.routing.breaker import PROBE, Admission, Breakers, BreakerSettings, Outcome
from gateway.store import Store

from . import all_stores, eventually

pytestmark = pytest.mark.anyio

D = "openai/gpt-4o"
# Short enough to run quickly, long enough that a slow CI machine keeps the order of events.
FAST = BreakerSettings(
    failures=3, window_s=0.4, cooldown_s=0.2, max_cooldown_s=0.5, probe_lease_s=0.3, min_calls=10
)
PUBSUB_S = 0.2  # how long a state change may take to reach the other replica


class Replicas:
    """Two replicas' breakers on one store."""

    def __init__(self, store: Store, settings: BreakerSettings) -> None:
        self.a = Breakers(store, settings)
        self.b = Breakers(store, settings)

    async def __aenter__(self) -> Replicas:
        await self.a.start([D])
        await self.b.start([D])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.a.aclose()
        await self.b.aclose()

    async def fail(self, replica: Breakers, times: int, outcome: Outcome = Outcome.FAILURE) -> None:
        for _ in range(times):
            replica.record(D, outcome)
        await replica.flush()

    async def both(self, state: str) -> float:
        """Wait until both replicas know `state`; how long the slower one took."""
        started = time.monotonic()
        await eventually(lambda: self.a.state(D) == self.b.state(D) == state, seconds=2)
        return time.monotonic() - started

    async def open(self) -> None:
        await self.fail(self.a, FAST.failures)
        await self.both("open")


@pytest.fixture
async def replicas(store: Store) -> AsyncIterator[Replicas]:
    async with Replicas(store, FAST) as pair:
        yield pair


async def admits(replicas: Replicas, count: int) -> list[Admission]:
    """`count` concurrent admissions, alternating between the two replicas."""
    results: list[Admission] = []

    async def one(replica: Breakers) -> None:
        results.append(await replica.admit(D))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, replicas.a if i % 2 else replicas.b)
    return results


@all_stores
class TestOpening:
    async def test_opens_after_n_failures_and_the_upstream_sees_no_traffic(self, replicas: Replicas) -> None:
        await replicas.fail(replicas.a, FAST.failures - 1)
        assert replicas.a.state(D) == "closed"
        await replicas.fail(replicas.b, 1)  # failures from both replicas add up
        await replicas.both("open")
        upstream_calls = 0
        for i in range(50):
            if await (replicas.a if i % 2 else replicas.b).admit(D) is not Admission.REJECT:
                upstream_calls += 1
        assert upstream_calls == 0
        snapshot = replicas.b.snapshot()[D]
        assert snapshot["state"] == "open" and snapshot["failures"] == FAST.failures
        assert snapshot["cooldown_s"] == FAST.cooldown_s and isinstance(snapshot["opened_at"], float)

    async def test_failures_spread_beyond_the_window_do_not_open(self, replicas: Replicas) -> None:
        for _ in range(2 * FAST.failures):
            await replicas.fail(replicas.a, 1)
            await anyio.sleep(FAST.window_s / 2 + 0.05)
        assert replicas.a.state(D) == replicas.b.state(D) == "closed"
        assert await replicas.a.admit(D) is Admission.ALLOW

    async def test_429_counts_only_with_count_429(self, store: Store) -> None:
        async with Replicas(store, FAST) as pair:
            await pair.fail(pair.a, 2 * FAST.failures, Outcome.RATE_LIMITED)
            assert pair.a.state(D) == "closed"
        counting = BreakerSettings(failures=3, window_s=0.4, cooldown_s=0.2, count_429=True)
        async with Replicas(store, counting) as pair:
            await pair.fail(pair.a, 3, Outcome.RATE_LIMITED)
            await pair.both("open")

    async def test_client_errors_and_successes_never_count(self, replicas: Replicas) -> None:
        await replicas.fail(replicas.a, 10, Outcome.CLIENT_ERROR)
        await replicas.fail(replicas.a, 10, Outcome.SUCCESS)
        await replicas.fail(replicas.a, FAST.failures - 1)
        assert replicas.a.state(D) == "closed"
        assert replicas.a.snapshot()[D]["failures"] == FAST.failures - 1

    async def test_state_change_reaches_the_other_replica_before_its_next_request(
        self, replicas: Replicas
    ) -> None:
        await replicas.fail(replicas.a, FAST.failures)
        assert replicas.a.state(D) == "open"  # the replica that opened it knows at once
        assert await replicas.both("open") < PUBSUB_S
        assert await replicas.b.admit(D) is Admission.REJECT

    async def test_failure_rate(self, store: Store) -> None:
        rate = BreakerSettings(failures=100, window_s=2, cooldown_s=0.2, failure_rate=0.5, min_calls=10)
        async with Replicas(store, rate) as pair:
            await pair.fail(pair.a, 4)  # 100% failures, but fewer calls than min_calls
            await pair.fail(pair.b, 5, Outcome.SUCCESS)  # successes are batched, then counted
            assert pair.a.state(D) == "closed"  # 4 of 9
            await pair.fail(pair.b, 1, Outcome.SUCCESS)
            assert pair.b.snapshot()[D]["failures"] == 4
            await pair.fail(pair.a, 1)  # 5 of 11 < 50%
            assert pair.a.state(D) == "closed"
            await pair.fail(pair.b, 1)  # 6 of 12
            await pair.both("open")


@all_stores
class TestProbing:
    async def test_exactly_one_probe_among_20_concurrent_requests_on_two_replicas(self, store: Store) -> None:
        # A cooldown long enough that opening on both replicas (pub/sub on a loaded cluster) cannot
        # outlast it: the first admissions must still find it cooling down.
        settings = msgspec.structs.replace(FAST, cooldown_s=1.0, max_cooldown_s=2.0)
        async with Replicas(store, settings) as replicas:
            await replicas.open()
            assert set(await admits(replicas, 20)) == {Admission.REJECT}  # cooling down
            await anyio.sleep(settings.cooldown_s + 0.02)
            results = await admits(replicas, 20)
            assert results.count(Admission.PROBE) == 1
            assert results.count(Admission.REJECT) == 19
            await replicas.both("half_open")
            assert set(await admits(replicas, 20)) == {Admission.REJECT}  # while the probe runs

    async def test_exactly_one_probe_granted_by_the_store(self, store: Store) -> None:
        """The store's part alone: concurrent probe scripts, however many, grant one lease."""
        async with Replicas(store, FAST) as pair:
            await pair.open()
        await anyio.sleep(FAST.cooldown_s + 0.02)
        keys = [f"gw:{{brk:{D}}}:state", f"gw:{{brk:{D}}}:probe"]
        flags: list[int] = []

        async def one() -> None:
            flags.append((await store.run(PROBE, keys, [300, 200]))[0])

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert sorted(flags) == [0] * 19 + [1]

    async def test_probe_success_closes_on_both(self, replicas: Replicas) -> None:
        await replicas.open()
        await anyio.sleep(FAST.cooldown_s + 0.02)
        assert await replicas.b.admit(D) is Admission.PROBE
        replicas.b.record(D, Outcome.SUCCESS, probe=True)
        await replicas.b.flush()
        assert await replicas.both("closed") < PUBSUB_S
        assert await replicas.a.admit(D) is await replicas.b.admit(D) is Admission.ALLOW
        snapshot = replicas.a.snapshot()[D]
        assert snapshot["failures"] == 0 and snapshot["opened_at"] is None
        # Closed afresh: the old failures are gone, and it takes the threshold again to open.
        await replicas.fail(replicas.a, FAST.failures - 1)
        assert replicas.a.state(D) == "closed"

    async def test_probe_failure_reopens_with_doubled_cooldown_capped(self, replicas: Replicas) -> None:
        await replicas.open()
        cooldown = FAST.cooldown_s
        for expected in (0.4, 0.5, 0.5):  # doubled, then capped by max_cooldown_s
            await anyio.sleep(cooldown + 0.02)
            assert await replicas.a.admit(D) is Admission.PROBE
            replicas.a.record(D, Outcome.FAILURE, probe=True)
            await replicas.a.flush()
            await eventually(lambda: replicas.b.snapshot()[D]["cooldown_s"] == expected, seconds=2)  # noqa: B023
            await replicas.both("open")
            cooldown = expected
            assert await replicas.b.admit(D) is Admission.REJECT
            await anyio.sleep(FAST.cooldown_s + 0.02)  # the first cooldown is not enough any more
            assert await replicas.b.admit(D) is Admission.REJECT
            cooldown -= FAST.cooldown_s + 0.02
        await anyio.sleep(cooldown + 0.02)
        assert await replicas.b.admit(D) is Admission.PROBE
        replicas.b.record(D, Outcome.SUCCESS, probe=True)
        await replicas.both("closed")
        assert replicas.a.snapshot()[D]["cooldown_s"] == FAST.cooldown_s  # recovery resets the backoff

    async def test_an_expired_probe_lease_lets_a_new_probe_through(self, replicas: Replicas) -> None:
        await replicas.open()
        await anyio.sleep(FAST.cooldown_s + 0.02)
        assert await replicas.a.admit(D) is Admission.PROBE  # ...and replica a dies mid-probe
        await replicas.both("half_open")
        assert await replicas.b.admit(D) is Admission.REJECT
        await anyio.sleep(FAST.probe_lease_s + 0.02)
        assert await replicas.b.admit(D) is Admission.PROBE
        assert await replicas.a.admit(D) is Admission.REJECT
        replicas.b.record(D, Outcome.SUCCESS, probe=True)
        await replicas.both("closed")

    async def test_a_late_probe_result_changes_nothing(self, replicas: Replicas) -> None:
        await replicas.open()
        await anyio.sleep(FAST.cooldown_s + 0.02)
        assert await replicas.a.admit(D) is Admission.PROBE
        await replicas.b.reset(D)
        await replicas.both("closed")
        replicas.a.record(D, Outcome.FAILURE, probe=True)  # its lease is gone with the reset
        await replicas.a.flush()
        await anyio.sleep(0.05)
        assert replicas.a.state(D) == replicas.b.state(D) == "closed"

    async def test_failures_of_requests_admitted_before_opening_do_not_extend_it(
        self, replicas: Replicas
    ) -> None:
        await replicas.open()
        opened_at = replicas.a.snapshot()[D]["opened_at"]
        await replicas.fail(replicas.b, 10)  # stragglers
        await anyio.sleep(FAST.cooldown_s + 0.02)
        assert replicas.a.snapshot()[D]["opened_at"] == opened_at
        assert await replicas.b.admit(D) is Admission.PROBE


@all_stores
class TestReset:
    async def test_reset_closes_everywhere(self, replicas: Replicas) -> None:
        await replicas.open()
        await replicas.a.reset(D)
        assert replicas.a.state(D) == "closed"
        assert await replicas.both("closed") < PUBSUB_S
        assert await replicas.b.admit(D) is Admission.ALLOW

    async def test_a_replica_started_later_loads_the_state(self, store: Store, replicas: Replicas) -> None:
        await replicas.open()
        late = Breakers(store, FAST)
        await late.start([D])
        try:
            assert late.state(D) == "open"
            assert await late.admit(D) is Admission.REJECT
        finally:
            await late.aclose()
