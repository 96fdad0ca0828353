"""The store contract, run on memory, fakeredis and a real redis-server alike."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

import gateway.routing
import gateway.store
from gateway.store import LocalOps, MemoryStore, Script, Store, StoreError

from . import all_stores, bounded_tests, eventually

pytestmark = pytest.mark.anyio

LUA = Path(__file__).parent / "lua"


def capped_incr_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    cap, window_ms = int(args[0]), int(args[1])
    count = int(ops.get(keys[0]) or b"0")
    allowed = 0
    if count < cap:
        allowed = 1
        count = ops.incr(keys[0])
        if count == 1:
            ops.expire(keys[0], window_ms / 1000)
    ttl = ops.ttl(keys[0])
    return [allowed, count, -1 if ttl is None else int(ttl * 1000)]


CAPPED_INCR = Script("test.capped_incr", (LUA / "capped_incr.lua").read_text(), capped_incr_local)

ECHO = Script("test.echo", "return {KEYS, ARGV}", lambda ops, keys, args: [keys, args])

REPLY_TYPES = Script(
    "test.reply_types",
    "return {1, 'text', false, {2, 3.7}, true, -4.5}",
    lambda ops, keys, args: [1, "text", None, [2, 3.7], True, -4.5],
)


def _fail(ops: LocalOps, keys: list[str], args: list[bytes]) -> None:
    raise ValueError("boom")


FAILING = Script("test.failing", "return redis.error_reply('boom')", _fail)

def _expiry_times_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
    at = int(ops.time() * 1000) + 60_000
    ops.set(keys[0], b"v")
    ops.set(keys[1], b"v")
    ops.set(keys[2], b"v")
    ops.pexpireat(keys[0], at)
    ops.pexpireat(keys[2], at - 120_000)  # a time already past deletes the key
    ops.pexpireat(keys[3], at)  # never created: nothing to expire
    return [_pttl(ops, key) for key in keys]


def _pttl(ops: LocalOps, key: str) -> int:
    """PTTL: ms left, -1 without expiry, -2 when missing."""
    left = ops.ttl(key)
    if left is not None:
        return round(left * 1000)
    return -1 if ops.get(key) is not None else -2


EXPIRY_TIMES = Script(
    "test.expiry_times",
    """
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 60000
for i = 1, 3 do redis.call('SET', KEYS[i], 'v') end
redis.call('PEXPIREAT', KEYS[1], at)
redis.call('PEXPIREAT', KEYS[3], at - 120000)
redis.call('PEXPIREAT', KEYS[4], at)
local out = {}
for _, key in ipairs(KEYS) do out[#out + 1] = redis.call('PTTL', key) end
return out
""",
    _expiry_times_local,
)

GET = Script("test.get", "return redis.call('GET', KEYS[1])", lambda ops, keys, args: ops.get(keys[0]))


@all_stores
class TestKeys:
    async def test_ping(self, store: Store) -> None:
        await store.ping()

    async def test_get_missing_is_none(self, store: Store) -> None:
        assert await store.get("missing") is None

    async def test_set_then_get_binary(self, store: Store) -> None:
        assert await store.set("k", b"\x00\xffvalue") is True
        assert await store.get("k") == b"\x00\xffvalue"

    async def test_set_ttl_expires(self, store: Store) -> None:
        await store.set("k", b"v", ttl_s=0.2)
        assert await store.get("k") == b"v"
        await anyio.sleep(0.3)
        assert await store.get("k") is None

    async def test_set_without_ttl_clears_previous_ttl(self, store: Store) -> None:
        await store.set("k", b"1", ttl_s=0.2)
        await store.set("k", b"2")
        await anyio.sleep(0.3)
        assert await store.get("k") == b"2"

    async def test_set_nx_only_when_absent(self, store: Store) -> None:
        assert await store.set("k", b"first", nx=True) is True
        assert await store.set("k", b"second", nx=True) is False
        assert await store.get("k") == b"first"

    async def test_set_nx_after_expiry(self, store: Store) -> None:
        await store.set("k", b"old", ttl_s=0.1)
        await anyio.sleep(0.2)
        assert await store.set("k", b"new", nx=True) is True
        assert await store.get("k") == b"new"

    @pytest.mark.parametrize("ttl_s", [0, -1.0])
    async def test_non_positive_ttl_is_a_value_error(self, store: Store, ttl_s: float) -> None:
        with pytest.raises(ValueError, match="ttl_s"):
            await store.set("k", b"v", ttl_s=ttl_s)
        with pytest.raises(ValueError, match="ttl_s"):
            await store.incr("k", ttl_s=ttl_s)

    async def test_delete_counts_existing_keys(self, store: Store) -> None:
        await store.set("a", b"1")
        await store.set("b", b"2")
        assert await store.delete("a", "b", "missing") == 2
        assert await store.get("a") is None
        assert await store.delete() == 0

    async def test_delete_skips_expired(self, store: Store) -> None:
        await store.set("a", b"1", ttl_s=0.1)
        await anyio.sleep(0.2)
        assert await store.delete("a") == 0


@all_stores
class TestCounters:
    async def test_incr_creates_and_adds(self, store: Store) -> None:
        assert await store.incr("n") == 1
        assert await store.incr("n", 5) == 6
        assert await store.incr("n", -10) == -4
        assert await store.get("n") == b"-4"

    async def test_incr_ttl_applies_only_on_create(self, store: Store) -> None:
        assert await store.incr("n", ttl_s=0.4) == 1
        await anyio.sleep(0.25)
        # Not extended: the window stays anchored at the first increment.
        assert await store.incr("n", ttl_s=0.4) == 2
        await anyio.sleep(0.25)
        assert await store.get("n") is None
        assert await store.incr("n", ttl_s=0.4) == 1

    async def test_incr_without_ttl_keeps_existing_ttl(self, store: Store) -> None:
        await store.set("n", b"1", ttl_s=0.2)
        assert await store.incr("n") == 2
        await anyio.sleep(0.3)
        assert await store.get("n") is None

    async def test_incr_with_ttl_on_existing_key_without_ttl(self, store: Store) -> None:
        await store.set("n", b"7")
        assert await store.incr("n", ttl_s=0.1) == 8
        await anyio.sleep(0.2)
        assert await store.get("n") == b"8"

    @pytest.mark.parametrize("value", [b"abc", b"1.5", b" 7", b"07"])
    async def test_incr_on_non_integer_is_store_error(self, store: Store, value: bytes) -> None:
        await store.set("n", value)
        with pytest.raises(StoreError):
            await store.incr("n")
        with pytest.raises(StoreError):
            await store.incr("n", ttl_s=1)
        assert await store.get("n") == value

    async def test_incr_past_64_bits_is_store_error(self, store: Store) -> None:
        await store.set("n", str(2**63 - 1).encode())
        with pytest.raises(StoreError):
            await store.incr("n")


@all_stores
class TestScripts:
    async def test_capped_incr(self, store: Store) -> None:
        results = [await store.run(CAPPED_INCR, ["c"], [3, 10_000]) for _ in range(4)]
        assert [r[:2] for r in results] == [[1, 1], [1, 2], [1, 3], [0, 3]]
        assert all(0 < r[2] <= 10_000 for r in results)

    async def test_capped_incr_window_expires(self, store: Store) -> None:
        assert (await store.run(CAPPED_INCR, ["c"], [1, 200]))[:2] == [1, 1]
        assert (await store.run(CAPPED_INCR, ["c"], [1, 200]))[:2] == [0, 1]
        await anyio.sleep(0.3)
        assert (await store.run(CAPPED_INCR, ["c"], [1, 200]))[:2] == [1, 1]

    async def test_run_is_atomic_under_concurrency(self, store: Store) -> None:
        results: list[list[int]] = []

        async def one() -> None:
            results.append(await store.run(CAPPED_INCR, ["c"], [150, 60_000]))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert sum(r[0] for r in results) == 150
        assert sorted(r[1] for r in results if r[0]) == list(range(1, 151))
        assert await store.get("c") == b"150"

    async def test_keys_and_args_arrive_as_redis_sends_them(self, store: Store) -> None:
        # One hash tag: a cluster refuses a script whose keys span slots.
        reply = await store.run(ECHO, ["{t}k1", "{t}k2"], ["text", 12, 0.5, b"\x00bin"])
        assert reply == [[b"{t}k1", b"{t}k2"], [b"text", b"12", b"0.5", b"\x00bin"]]

    async def test_reply_types_agree(self, store: Store) -> None:
        assert await store.run(REPLY_TYPES, [], []) == [1, b"text", None, [2, 3], 1, -4]

    async def test_script_error_is_store_error(self, store: Store) -> None:
        with pytest.raises(StoreError, match="boom"):
            await store.run(FAILING, [], [])

    async def test_expiry_set_and_read_in_absolute_milliseconds(self, store: Store) -> None:
        left, *times = await store.run(EXPIRY_TIMES, ["{t}at", "{t}plain", "{t}past", "{t}missing"], [])
        assert 59_000 < left <= 60_000 and times == [-1, -2, -2]  # a minute on; no expiry; deleted; never created

    async def test_register_then_run(self, store: Store) -> None:
        await store.register(CAPPED_INCR, ECHO)
        assert (await store.run(CAPPED_INCR, ["c"], [1, 1000]))[:2] == [1, 1]


@all_stores
class TestRunMany:
    async def test_replies_come_in_order(self, store: Store) -> None:
        replies = await store.run_many([(CAPPED_INCR, ["c"], [3, 10_000]), (ECHO, ["k"], ["a"])])
        assert replies[0][:2] == [1, 1]
        assert replies[1] == [[b"k"], [b"a"]]

    async def test_nothing_to_run(self, store: Store) -> None:
        assert await store.run_many([]) == []

    async def test_a_call_sees_the_writes_of_those_before_it(self, store: Store) -> None:
        for expected in (b"1", b"2"):
            reply, value = await store.run_many([(CAPPED_INCR, ["c"], [5, 10_000]), (GET, ["c"], [])])
            assert value == expected == str(reply[1]).encode()
        replies = await store.run_many([(CAPPED_INCR, ["c"], [5, 10_000]), (CAPPED_INCR, ["c"], [5, 10_000])])
        assert [reply[1] for reply in replies] == [3, 4]

    async def test_a_failure_is_a_store_error_in_its_place_and_the_others_count(self, store: Store) -> None:
        first = await store.run_many([(FAILING, [], []), (CAPPED_INCR, ["c"], [5, 10_000])])
        second = await store.run_many([(CAPPED_INCR, ["c"], [5, 10_000]), (FAILING, [], [])])
        assert isinstance(first[0], StoreError) and "boom" in str(first[0]) and first[1][:2] == [1, 1]
        assert second[0][:2] == [1, 2] and isinstance(second[1], StoreError)
        assert await store.get("c") == b"2"

    async def test_replies_stay_in_step_after_a_failure(self, store: Store) -> None:
        await store.set("a", b"A")
        await store.set("b", b"B")
        failed, value = await store.run_many([(FAILING, [], []), (GET, ["a"], [])])
        assert isinstance(failed, StoreError) and value == b"A"
        assert await store.run_many([(ECHO, [], ["x"]), (GET, ["b"], [])]) == [[[], [b"x"]], b"B"]
        assert await store.get("a") == b"A"

    async def test_wrong_type_is_store_error(self, store: Store) -> None:
        await store.hset("h", "f", b"v")
        echoed, wrong = await store.run_many([(ECHO, [], []), (GET, ["h"], [])])
        assert echoed == [[], []] and isinstance(wrong, StoreError)
        with pytest.raises(StoreError):
            await store.run(GET, ["h"], [])

    async def test_concurrent_calls_get_their_own_replies(self, store: Store) -> None:
        for i in range(200):
            await store.set(f"v{i}", str(i).encode())
        results: dict[int, list[object]] = {}

        async def one(i: int) -> None:
            results[i] = await store.run_many([(ECHO, [f"k{i}"], [i]), (GET, [f"v{i}"], [])])

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert results == {i: [[[f"k{i}".encode()], [str(i).encode()]], str(i).encode()] for i in range(200)}


@all_stores
class TestHashes:
    async def test_set_get_all_and_delete(self, store: Store) -> None:
        assert await store.hgetall("h") == {} and await store.hget("h", "a") is None
        await store.hset("h", "a", b"1")
        await store.hset("h", "b", b"\x00two")
        await store.hset("h", "a", b"one")
        assert await store.hget("h", "a") == b"one"
        assert await store.hgetall("h") == {"a": b"one", "b": b"\x00two"}
        assert await store.hdel("h", "a") is True
        assert await store.hdel("h", "a") is False
        assert await store.hdel("h", "b") is True
        assert await store.delete("h") == 0  # an emptied hash is gone

    async def test_hincrby_adds_in_one_call_and_expires(self, store: Store) -> None:
        await store.hincrby("u", {"a": 2, "b": 5}, ttl_s=0.3)
        await store.hincrby("u", {"a": 3}, ttl_s=0.3)
        assert await store.hgetall("u") == {"a": b"5", "b": b"5"}
        await anyio.sleep(0.45)
        assert await store.hgetall("u") == {}
        with pytest.raises(ValueError):
            await store.hincrby("u", {"a": 1}, ttl_s=0)

    async def test_wrong_type_is_store_error(self, store: Store) -> None:
        await store.set("s", b"x")
        with pytest.raises(StoreError):
            await store.hset("s", "f", b"v")
        await store.hset("h", "f", b"v")
        with pytest.raises(StoreError):
            await store.get("h")
        assert await store.delete("h") == 1


@all_stores
class TestPubSub:
    async def test_publish_counts_receivers(self, store: Store) -> None:
        assert await store.publish("nobody", b"x") == 0
        first = await store.subscribe("counted", lambda m: None)
        second = await store.subscribe("counted", lambda m: None)
        assert await store.publish("counted", b"x") >= 1
        await first.aclose()
        await second.aclose()

    async def test_messages_arrive_in_order(self, store: Store) -> None:
        received: list[bytes] = []
        subscription = await store.subscribe("events", received.append)
        sent = [f"message {i}".encode() for i in range(50)]
        for message in sent:
            await store.publish("events", message)
        await eventually(lambda: len(received) == len(sent))
        assert received == sent
        await subscription.aclose()

    async def test_unsubscribe_stops_delivery(self, store: Store) -> None:
        closed: list[bytes] = []
        kept: list[bytes] = []
        subscription = await store.subscribe("events", closed.append)
        await store.subscribe("events", kept.append)
        await store.publish("events", b"one")
        await eventually(lambda: closed == kept == [b"one"])
        await subscription.aclose()
        await subscription.aclose()  # idempotent
        await store.publish("events", b"two")
        await eventually(lambda: kept == [b"one", b"two"])
        assert closed == [b"one"]

    async def test_last_unsubscribe_then_resubscribe(self, store: Store) -> None:
        first: list[bytes] = []
        subscription = await store.subscribe("events", first.append)
        await subscription.aclose()
        second: list[bytes] = []
        await store.subscribe("events", second.append)
        await store.publish("events", b"again")
        await eventually(lambda: second == [b"again"])
        assert first == []

    async def test_channels_are_separate(self, store: Store) -> None:
        a: list[bytes] = []
        b: list[bytes] = []
        await store.subscribe("a", a.append)
        await store.subscribe("b", b.append)
        await store.publish("a", b"for a")
        await store.publish("b", b"for b")
        await store.publish("nobody", b"lost")
        await eventually(lambda: a == [b"for a"] and b == [b"for b"])

    async def test_raising_handler_does_not_stop_delivery(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        def broken(message: bytes) -> None:
            raise RuntimeError("handler bug")

        received: list[bytes] = []
        await store.subscribe("events", broken)
        await store.subscribe("events", received.append)
        with caplog.at_level(logging.ERROR, logger="gateway.store"):
            await store.publish("events", b"one")
            await store.publish("events", b"two")
            await eventually(lambda: received == [b"one", b"two"])
        assert "handler bug" in caplog.text


@all_stores
class TestLogs:
    async def test_read_from_the_start_and_on(self, store: Store) -> None:
        assert await store.xread("log", "0") == []
        await store.xadd("log", b"one", b"\x00two", ttl_s=10)
        first = await store.xread("log", "0")
        assert [value for _, value in first] == [b"one", b"\x00two"]
        assert first[0][0] != first[1][0]
        await store.xadd("log", b"three", ttl_s=10)
        assert [value for _, value in await store.xread("log", first[-1][0])] == [b"three"]
        assert [value for _, value in await store.xread("log", first[0][0])] == [b"\x00two", b"three"]

    async def test_blocking_read_wakes_on_append(self, store: Store) -> None:
        got: list[list[tuple[str, bytes]]] = []

        async def reader() -> None:
            got.append(await store.xread("log", "0", block_s=5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.sleep(0.1)
            assert got == []
            await store.xadd("log", b"late", ttl_s=10)
        assert [value for _, value in got[0]] == [b"late"]

    async def test_blocking_read_gives_up_after_block_s(self, store: Store) -> None:
        started = anyio.current_time()
        assert await store.xread("log", "0", block_s=0.2) == []
        assert 0.15 <= anyio.current_time() - started < 2

    async def test_many_blocked_readers_leave_commands_free(self, store: Store) -> None:
        got: list[int] = []

        async def reader() -> None:
            got.append(len(await store.xread("log", "0", block_s=5)))

        async with anyio.create_task_group() as tg:
            for _ in range(60):  # more than the command pool holds
                tg.start_soon(reader)
            await anyio.sleep(0.2)
            with anyio.fail_after(1):
                await store.set("k", b"v")
            await store.xadd("log", b"go", ttl_s=10)
        assert got == [1] * 60

    async def test_log_expires_after_its_last_write(self, store: Store) -> None:
        await store.xadd("log", b"a", ttl_s=0.3)
        await anyio.sleep(0.2)
        await store.xadd("log", b"b", ttl_s=0.3)
        await anyio.sleep(0.2)
        assert len(await store.xread("log", "0")) == 2
        await anyio.sleep(0.2)
        assert await store.xread("log", "0") == []
        with pytest.raises(ValueError):
            await store.xadd("log", b"c", ttl_s=0)

    async def test_wrong_type_is_store_error(self, store: Store) -> None:
        await store.set("s", b"x")
        with pytest.raises(StoreError):
            await store.xadd("s", b"v", ttl_s=1)
        await store.xadd("log", b"v", ttl_s=10)
        with pytest.raises(StoreError):
            await store.get("log")


@bounded_tests
class TestMemoryStore:
    """Memory-only behaviour, on a clock the test moves."""

    @pytest.fixture
    def clock(self) -> list[float]:
        return [1_000.0]

    @pytest.fixture
    def memory(self, clock: list[float]) -> MemoryStore:
        return MemoryStore(clock=lambda: clock[0])

    async def test_expired_keys_are_swept_without_being_read(
        self, memory: MemoryStore, clock: list[float]
    ) -> None:
        for i in range(1_000):
            await memory.set(f"k{i}", b"v", ttl_s=1)
        await memory.set("forever", b"v")
        clock[0] += 2
        for _ in range(100):
            await memory.get("forever")
        assert len(memory._keys) == 1

    async def test_refreshed_ttls_keep_the_heap_bounded(
        self, memory: MemoryStore, clock: list[float]
    ) -> None:
        for _ in range(10_000):
            await memory.run(CAPPED_INCR, ["c"], [10**9, 60_000])
            await memory.set("refreshed", b"v", ttl_s=60)
        assert len(memory._keys._heap) <= 2 * 2 + 64

    async def test_an_expired_key_is_gone_even_before_the_sweep_reaches_it(
        self, memory: MemoryStore, clock: list[float]
    ) -> None:
        for i in range(500):
            await memory.set(f"k{i:03}", b"v", ttl_s=1)
        clock[0] += 2
        # One call sweeps a bounded batch (k000...); k499 is still in the heap.
        assert await memory.get("k499") is None
        assert await memory.delete("k498") == 0

    async def test_local_ttl_is_none_without_key_or_expiry(self, memory: MemoryStore) -> None:
        def ttls(ops: LocalOps, keys: list[str], args: list[bytes]) -> list[int]:
            ops.set("plain", b"v")
            ops.set("expiring", b"v", 5)
            return [-1 if ops.ttl(key) is None else 1 for key in ("missing", "plain", "expiring")]

        assert await memory.run(Script("test.ttls", "", ttls), [], []) == [-1, -1, 1]

    async def test_script_time_is_the_store_clock(self, memory: MemoryStore, clock: list[float]) -> None:
        now = Script("test.now", "return redis.call('TIME')[1]", lambda ops, keys, args: int(ops.time()))
        assert await memory.run(now, [], []) == 1_000

    async def test_expire_with_non_positive_ttl_deletes(self, memory: MemoryStore) -> None:
        def expire_now(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
            ops.set(keys[0], b"v")
            ops.expire(keys[0], 0)
            ops.expire("missing", 10)
            return int(ops.delete(keys[0])) + int(ops.delete("missing"))

        assert await memory.run(Script("test.expire_now", "", expire_now), ["k"], []) == 0
        assert await memory.get("k") is None

    @pytest.mark.parametrize("arg", [True, None, [1]])
    async def test_rejects_arguments_redis_would(self, memory: MemoryStore, arg: object) -> None:
        with pytest.raises(StoreError, match="argument"):
            await memory.run(ECHO, [], [arg])  # type: ignore[list-item]

    async def test_rejects_replies_redis_cannot_carry(self, memory: MemoryStore) -> None:
        with pytest.raises(StoreError, match="dict"):
            await memory.run(Script("test.bad_reply", "", lambda ops, keys, args: {"a": 1}), [], [])

    async def test_aclose_ends_subscriptions(self, memory: MemoryStore) -> None:
        received: list[bytes] = []
        await memory.subscribe("events", received.append)
        await memory.publish("events", b"in flight")
        await memory.aclose()
        await anyio.sleep(0.01)
        assert received == []


def test_public_surface() -> None:
    assert set(gateway.store.__all__) == {
        "Call",
        "Confirmed",
        "LocalOps",
        "MemoryStore",
        "RedisStore",
        "Script",
        "ScriptArg",
        "Store",
        "StoreError",
        "StoreStats",
        "Subscription",
        "lua_source",
        "store_from_url",
    }
    for name in gateway.store.__all__:
        assert getattr(gateway.store, name) is not None
    assert repr(CAPPED_INCR) == f"Script('test.capped_incr', sha={CAPPED_INCR.sha[:12]})"


def test_lua_source_joins_a_concerns_scripts_in_order() -> None:
    common = (Path(gateway.routing.__file__).parent / "lua" / "breaker_common.lua").read_text()
    probe = (Path(gateway.routing.__file__).parent / "lua" / "breaker_probe.lua").read_text()
    assert gateway.store.lua_source("gateway.routing", "breaker_common.lua", "breaker_probe.lua") == common + probe
