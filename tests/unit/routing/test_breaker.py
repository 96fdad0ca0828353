"""The breaker's logic on the memory store and a clock the test moves; its cost on the hot path."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest

from gateway.routing.breaker import (
    EVENTS,
    PROBE,
    RECORD,
    SETTLE,
    Admission,
    Breakers,
    BreakerSettings,
    Outcome,
)
from gateway.store import MemoryStore, Script, ScriptArg, Store, StoreError, Subscription
from tests.contract import bounded_tests, eventually

pytestmark = pytest.mark.anyio

D = "anthropic/claude"
SETTINGS = BreakerSettings(failures=3, window_s=10, cooldown_s=5, max_cooldown_s=30, probe_lease_s=2)
STORE_METHODS = frozenset(name for name in dir(Store) if not name.startswith("_"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TestStore(MemoryStore):
    """A memory store that counts what is asked of it and can be made unreachable."""

    __test__ = False

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.calls: list[str] = []
        self.down = False
        self.publish_down = False
        self.bug: Exception | None = None
        self.latency_s = 0.0

    def __getattribute__(self, name: str) -> Any:
        if name in STORE_METHODS:
            object.__getattribute__(self, "calls").append(name)
        return super().__getattribute__(name)

    def _check(self) -> None:
        if self.down:
            raise StoreError("redis GET failed: ConnectionError")

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        self._check()
        if self.bug is not None:
            raise self.bug
        if self.latency_s:
            await anyio.sleep(self.latency_s)  # a round trip, during which more outcomes arrive
        return await super().run(script, keys, args)

    async def register(self, *scripts: Script) -> None:
        self._check()

    async def publish(self, channel: str, message: bytes) -> int:
        if self.publish_down:
            raise StoreError("redis PUBLISH failed")
        self._check()
        return await super().publish(channel, message)

    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> Subscription:
        self._check()
        return await super().subscribe(channel, handler)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> TestStore:
    return TestStore(clock)


@pytest.fixture
async def breakers(store: TestStore, clock: Clock) -> AsyncIterator[Breakers]:
    breakers = Breakers(store, SETTINGS, clock=clock)
    await breakers.start([D])
    yield breakers
    await breakers.aclose()


async def fail(breakers: Breakers, times: int = 1, outcome: Outcome = Outcome.FAILURE) -> None:
    for _ in range(times):
        breakers.record(D, outcome)
    await breakers.flush()
    await anyio.sleep(0)  # the memory store delivers messages on the next loop iteration


@pytest.mark.parametrize(
    "status, outcome",
    [
        (200, Outcome.SUCCESS),
        (304, Outcome.SUCCESS),
        (400, Outcome.CLIENT_ERROR),
        (401, Outcome.CLIENT_ERROR),
        (404, Outcome.CLIENT_ERROR),
        (408, Outcome.FAILURE),
        (429, Outcome.RATE_LIMITED),
        (500, Outcome.FAILURE),
        (503, Outcome.FAILURE),
    ],
)
def test_outcome_of_status(status: int, outcome: Outcome) -> None:
    assert Outcome.of_status(status) is outcome


class TestSettings:
    def test_defaults(self) -> None:
        settings = msgspec.convert({}, BreakerSettings)
        assert settings == BreakerSettings()
        assert (settings.failures, settings.window_s, settings.cooldown_s) == (5, 30, 10)
        assert settings.failure_rate is None and settings.count_429 is False

    @pytest.mark.parametrize(
        "raw, error",
        [
            ({"failures": 0}, "failures"),
            ({"window_s": -1}, "window_s"),
            ({"failure_rate": 1.5}, "failure_rate"),
            ({"failure_rate": 0}, "failure_rate"),
            ({"cooldown_s": 60, "max_cooldown_s": 30}, "max_cooldown_s"),
            ({"treshold": 3}, "treshold"),
        ],
    )
    def test_invalid(self, raw: dict[str, object], error: str) -> None:
        with pytest.raises(msgspec.ValidationError, match=error):
            msgspec.convert(raw, BreakerSettings)


@bounded_tests
class TestStateMachine:
    async def test_closed_admit_makes_no_store_call(self, breakers: Breakers, store: TestStore) -> None:
        store.calls.clear()
        for _ in range(1000):
            assert await breakers.admit(D) is Admission.ALLOW
            breakers.record(D, Outcome.SUCCESS)  # no failure_rate: successes are not even sent
            breakers.record(D, Outcome.CLIENT_ERROR)
        await breakers.flush()
        assert store.calls == []

    async def test_open_rejects_without_store_call_until_the_cooldown_ends(
        self, breakers: Breakers, store: TestStore, clock: Clock
    ) -> None:
        await fail(breakers, 3)
        assert breakers.state(D) == "open"
        store.calls.clear()
        clock.now += SETTINGS.cooldown_s - 0.5
        for _ in range(100):
            assert await breakers.admit(D) is Admission.REJECT
        assert store.calls == []
        clock.now += 0.5
        assert await breakers.admit(D) is Admission.PROBE
        assert store.calls.count("run") == 1
        assert breakers.state(D) == "half_open"

    async def test_window_slides(self, breakers: Breakers, clock: Clock) -> None:
        await fail(breakers, 2)
        clock.now += SETTINGS.window_s  # those two leave the window
        await fail(breakers, 2)
        assert breakers.state(D) == "closed"
        assert breakers.snapshot()[D]["failures"] == 2
        clock.now += SETTINGS.window_s / 2
        await fail(breakers)
        assert breakers.state(D) == "open"

    async def test_backoff_lease_and_recovery(self, breakers: Breakers, clock: Clock) -> None:
        await fail(breakers, 3)
        for cooldown in (10, 20, 30, 30):
            clock.now += breakers.snapshot()[D]["cooldown_s"]  # type: ignore[operator]
            assert await breakers.admit(D) is Admission.PROBE
            breakers.record(D, Outcome.FAILURE, probe=True)
            await breakers.flush()
            assert breakers.snapshot()[D]["cooldown_s"] == cooldown
            assert await breakers.admit(D) is Admission.REJECT
        clock.now += 30
        assert await breakers.admit(D) is Admission.PROBE
        clock.now += SETTINGS.probe_lease_s - 0.5
        assert await breakers.admit(D) is Admission.REJECT  # the probe still runs
        clock.now += 0.5
        assert await breakers.admit(D) is Admission.PROBE  # it was lost: another goes
        breakers.record(D, Outcome.CLIENT_ERROR, probe=True)  # the upstream answered: it is up
        await breakers.flush()
        assert breakers.state(D) == "closed"
        assert breakers.snapshot()[D]["cooldown_s"] == SETTINGS.cooldown_s

    async def test_rate_limited_probe_without_count_429_closes(
        self, breakers: Breakers, clock: Clock
    ) -> None:
        await fail(breakers, 3)
        clock.now += SETTINGS.cooldown_s
        assert await breakers.admit(D) is Admission.PROBE
        breakers.record(D, Outcome.RATE_LIMITED, probe=True)
        await breakers.flush()
        assert breakers.state(D) == "closed"

    async def test_snapshot(self, breakers: Breakers, clock: Clock) -> None:
        assert breakers.state("unknown") == "closed"
        breakers.note_error(D, "upstream 503: " + "x" * 1000)
        breakers.note_error("other", "timeout")
        await fail(breakers, 3)
        snapshot = breakers.snapshot()
        assert list(snapshot) == [D, "other"]
        assert snapshot[D] == {
            "state": "open",
            "failures": 3,
            "calls": 3,
            "opened_at": clock.now,
            "cooldown_s": SETTINGS.cooldown_s,
            "last_error": "upstream 503: " + "x" * 486,
        }
        assert snapshot["other"] == {
            "state": "closed",
            "failures": 0,
            "calls": 0,
            "opened_at": None,
            "cooldown_s": SETTINGS.cooldown_s,
            "last_error": "timeout",
        }

    async def test_recording_for_an_unknown_deployment_tracks_it(self, breakers: Breakers) -> None:
        breakers.record("new", Outcome.FAILURE)
        await breakers.flush()
        assert breakers.snapshot()["new"]["failures"] == 1

    async def test_an_unknown_deployment_is_loaded_in_the_background(
        self, breakers: Breakers, store: TestStore, clock: Clock
    ) -> None:
        other = Breakers(store, SETTINGS, clock=clock)
        await other.start()
        try:
            await fail(breakers, 3)
            assert other.state(D) == "open"  # told by the message
            late = Breakers(store, SETTINGS, clock=clock)
            await late.start()
            try:
                assert await late.admit(D) is Admission.ALLOW  # not known yet: no round trip either
                await late.flush()
                assert late.state(D) == "open"
            finally:
                await late.aclose()
        finally:
            await other.aclose()


@bounded_tests
class TestBatching:
    async def test_successes_are_batched(self, store: TestStore, clock: Clock) -> None:
        settings = BreakerSettings(failures=50, window_s=0.5, failure_rate=0.5, min_calls=4)
        breakers = Breakers(store, settings, clock=clock)
        await breakers.start([D])
        store.calls.clear()
        for _ in range(100):
            breakers.record(D, Outcome.SUCCESS)
        assert store.calls == []  # nothing before the batch is due
        await eventually(lambda: store.calls == ["run"], seconds=1)
        await breakers.flush()
        assert breakers.snapshot()[D]["failures"] == 0
        await fail(breakers, 10)  # failures go at once; the ones recorded meanwhile follow together
        assert store.calls.count("run") <= 3
        assert breakers.state(D) == "closed"  # 10 of 110 failed: under the rate and the count
        store.calls.clear()
        store.latency_s = 0.02
        breakers.record(D, Outcome.FAILURE)  # sent at once...
        await anyio.sleep(0.01)
        breakers.record(D, Outcome.SUCCESS)  # ...and this, recorded meanwhile, in the next batch
        await eventually(lambda: store.calls.count("run") == 2, seconds=1)
        await breakers.flush()
        assert breakers.snapshot()[D]["failures"] == 11
        await breakers.aclose()

    async def test_aclose_sends_pending_outcomes(self, store: TestStore, clock: Clock) -> None:
        settings = BreakerSettings(failures=5, window_s=30, failure_rate=0.5)
        breakers = Breakers(store, settings, clock=clock)
        await breakers.start([D])
        for _ in range(7):
            breakers.record(D, Outcome.SUCCESS)
        await breakers.aclose()
        assert b":0:7" in (await store.get(f"gw:{{brk:{D}}}:window") or b"")
        breakers.record(D, Outcome.FAILURE)  # closed: dropped
        await breakers.flush()
        assert b":0:7" in (await store.get(f"gw:{{brk:{D}}}:window") or b"")


@bounded_tests
class TestStoreOutage:
    async def test_decides_alone_while_the_store_is_down_then_shares_again(
        self, store: TestStore, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        store.down = True
        breakers = Breakers(store, SETTINGS, clock=clock)
        with caplog.at_level(logging.ERROR, logger="gateway.breaker"):
            await breakers.start([D])
            await fail(breakers, 3)
        assert breakers.state(D) == "open"  # counted locally
        assert caplog.text.count("store unreachable") == 2  # at start, then once per _WARN_EVERY_S
        clock.now += SETTINGS.cooldown_s
        assert await breakers.admit(D) is Admission.PROBE
        breakers.record(D, Outcome.SUCCESS, probe=True)
        await breakers.flush()
        assert breakers.state(D) == "closed"
        with pytest.raises(StoreError):
            await breakers.reset(D)

        # The store answers again, holding a state of its own: it wins over the local decision.
        store.down = False
        await store.set(f"gw:{{brk:{D}}}:state", f"open 5 {int(clock.now * 1000)} 5000".encode())
        with caplog.at_level(logging.WARNING, logger="gateway.breaker"):
            await eventually(lambda: "store reachable again" in caplog.text, seconds=2)
        await eventually(lambda: breakers.state(D) == "open", seconds=1)
        await breakers.aclose()

    async def test_a_failed_publish_keeps_the_local_state(
        self, breakers: Breakers, store: TestStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        store.publish_down = True
        with caplog.at_level(logging.ERROR, logger="gateway.breaker"):
            await fail(breakers, 3)
        assert breakers.state(D) == "open"
        assert "publish" in caplog.text

    async def test_a_bug_in_background_work_is_logged(
        self, breakers: Breakers, store: TestStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        store.bug = RuntimeError("bug")
        with caplog.at_level(logging.ERROR, logger="gateway.breaker"):
            await fail(breakers)
        assert "background work failed" in caplog.text
        assert "RuntimeError: bug" in caplog.text


@bounded_tests
class TestMessages:
    @pytest.mark.parametrize("message", [b"garbage", b"open 1 2 3 4 5 6", b"open x 0 0 0 0 0 d", b"\xff"])
    async def test_malformed_messages_are_ignored(
        self, breakers: Breakers, store: TestStore, caplog: pytest.LogCaptureFixture, message: bytes
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="gateway.breaker"):
            await store.publish(EVENTS, message)
            await anyio.sleep(0)
        assert "malformed" in caplog.text
        assert breakers.state(D) == "closed"

    async def test_unknown_states_and_older_versions_are_ignored(
        self, breakers: Breakers, store: TestStore, clock: Clock
    ) -> None:
        await store.publish(EVENTS, f"melted 99999999999999 0 0 0 0 0 {D}".encode())
        await fail(breakers, 3)
        version = int((await store.get(f"gw:{{brk:{D}}}:state") or b"").split()[1])
        await store.publish(EVENTS, f"closed {version - 1} 0 5000 0 0 0 {D}".encode())
        await anyio.sleep(0)
        assert breakers.state(D) == "open"

    async def test_a_message_names_a_deployment_with_spaces(
        self, breakers: Breakers, store: TestStore
    ) -> None:
        await store.publish(EVENTS, b"open 99999999999999 0 5000 5000 3 3 my deployment")
        await anyio.sleep(0)
        assert breakers.state("my deployment") == "open"
        assert breakers.snapshot()["my deployment"]["failures"] == 3


async def test_scripts_reply_the_same_shape() -> None:
    store = MemoryStore()
    keys = [f"gw:{{brk:{D}}}:{name}" for name in ("state", "window", "probe")]
    reply = await store.run(RECORD, keys, [1, 1, 1000, 100, 5, 0, 20, 5000])
    assert reply[1:2] == [b"closed"] and reply[6:] == [1, 1]
    reply = await store.run(SETTLE, [keys[0], keys[2], keys[1]], ["success", 5000, 30000])
    assert reply[0] == 0 and len(reply) == 8  # not half-open: nothing to settle
    reply = await store.run(PROBE, [keys[0], keys[2]], [1000, 5000])
    assert reply[:2] == [0, b"closed"]  # closed: no probe to grant
