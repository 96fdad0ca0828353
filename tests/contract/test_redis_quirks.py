"""What only the Redis backend has: lost scripts, outages, restarts, URLs, the pool."""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import pytest

from gateway.store import MemoryStore, RedisStore, Script, Store, StoreError, StoreStats, store_from_url

from . import bounded, eventually, redis_stores
from .test_store import CAPPED_INCR, ECHO

if TYPE_CHECKING:
    from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio

PASSWORD = "s3cr3t-Pa55word"


def _full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@redis_stores
class TestScriptCache:
    async def test_noscript_after_script_flush_reloads(self, store: Store) -> None:
        assert isinstance(store, RedisStore)
        assert (await store.run(CAPPED_INCR, ["c"], [5, 10_000]))[:2] == [1, 1]
        await store.client.script_flush()
        assert (await store.run(CAPPED_INCR, ["c"], [5, 10_000]))[:2] == [1, 2]

    async def test_noscript_in_run_many_reloads_every_lost_script(self, store: Store) -> None:
        assert isinstance(store, RedisStore)
        calls = [(CAPPED_INCR, ["c"], [5, 10_000]), (ECHO, ["k"], ["a"])]
        assert (await store.run_many(calls))[0][:2] == [1, 1]
        await store.client.script_flush()
        replies = await store.run_many(calls)
        assert (replies[0][:2], replies[1]) == ([1, 2], [[b"k"], [b"a"]])

    async def test_noscript_for_one_call_of_run_many_keeps_the_others(self, store: Store) -> None:
        assert isinstance(store, RedisStore)
        calls = [(CAPPED_INCR, ["c"], [5, 10_000]), (ECHO, ["k"], ["a"])]
        await store.run_many(calls)
        await store.client.script_flush()
        await store.client.script_load(ECHO.lua)  # only the first call's script is lost
        replies = await store.run_many(calls)
        assert (replies[0][:2], replies[1]) == ([1, 2], [[b"k"], [b"a"]])
        assert await store.get("c") == b"2"

    async def test_lua_syntax_error_is_store_error(self, store: Store) -> None:
        broken = Script("test.broken", "return {", lambda ops, keys, args: None)
        with pytest.raises(StoreError):
            await store.run(broken, [], [])
        counted, failed = await store.run_many([(CAPPED_INCR, ["c"], [5, 10_000]), (broken, [], [])])
        assert counted[:2] == [1, 1] and isinstance(failed, StoreError)
        assert await store.get("c") == b"1"

    async def test_register_loads_ahead(self, store: Store) -> None:
        assert isinstance(store, RedisStore)
        await store.register(CAPPED_INCR)
        assert await store.client.script_exists(CAPPED_INCR.sha) == [True]


@pytest.mark.parametrize(
    "url, kind",
    [
        ("memory://", MemoryStore),
        ("redis://localhost:6379/0", RedisStore),
        (f"rediss://:{PASSWORD}@localhost:6380/1", RedisStore),
        ("unix:///run/redis.sock?db=2", RedisStore),
    ],
)
@bounded
async def test_store_from_url_picks_the_backend(url: str, kind: type[Store]) -> None:
    async with store_from_url(url) as store:
        assert type(store) is kind


@pytest.mark.parametrize("url", [f"mongodb://admin:{PASSWORD}@db:27017", f"{PASSWORD}@host", ""])
def test_unknown_scheme_is_a_value_error_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="scheme") as caught:
        store_from_url(url)
    assert PASSWORD not in _full_text(caught.value)


def test_malformed_redis_url_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        store_from_url(f"redis://:{PASSWORD}@localhost:notaport/0")
    assert PASSWORD not in _full_text(caught.value)


@pytest.mark.redis
@bounded
async def test_unix_socket_url(redis_url: str, redis_process: RedisServer) -> None:
    async with store_from_url(redis_process.unix_url) as store:
        await store.set("via-unix", b"1")
        assert await store.get("via-unix") == b"1"


@bounded
async def test_unreachable_redis_fails_fast_without_the_password(free_tcp_port: int) -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:{free_tcp_port}/0"
    async with store_from_url(url, timeout_s=0.2) as store:
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping,
            lambda: store.get("k"),
            lambda: store.set("k", b"v"),
            lambda: store.delete("k"),
            lambda: store.incr("k"),
            lambda: store.incr("k", ttl_s=1),
            lambda: store.run(CAPPED_INCR, ["c"], [1, 1000]),
            lambda: store.run_many([(CAPPED_INCR, ["c"], [1, 1000]), (ECHO, ["k"], ["a"])]),
            lambda: store.register(CAPPED_INCR),
            lambda: store.publish("events", b"m"),
            lambda: store.subscribe("events", lambda message: None),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                await call()
            assert time.monotonic() - started < 1.0
            assert PASSWORD not in _full_text(caught.value)


@bounded
async def test_cancelled_subscribe_leaves_nothing_subscribed(free_tcp_port: int) -> None:
    async with store_from_url(f"redis://127.0.0.1:{free_tcp_port}/0", timeout_s=5) as store:
        assert isinstance(store, RedisStore)
        with anyio.move_on_after(0.1) as scope:
            await store.subscribe("events", lambda message: None)
        assert scope.cancelled_caught
        assert store._pubsub._handlers == {}


@pytest.mark.redis
@bounded
async def test_recovers_from_a_restart_without_being_rebuilt(spawn_redis: Callable[[], RedisServer]) -> None:
    server = spawn_redis()
    async with store_from_url(server.url, timeout_s=0.5) as store:
        received: list[bytes] = []
        await store.subscribe("events", received.append)
        assert (await store.run(CAPPED_INCR, ["c"], [5, 10_000]))[:2] == [1, 1]
        await store.publish("events", b"before")
        await eventually(lambda: received == [b"before"])

        server.stop()
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.subscribe("other", received.append)
        server.start()

        await store.ping()
        # Data and script cache died with the process: the script is reloaded.
        assert (await store.run(CAPPED_INCR, ["c"], [5, 10_000]))[:2] == [1, 1]

        # The reader resubscribes in the background; publish until it is back.
        async def republish() -> None:
            while b"after" not in received:
                await store.publish("events", b"after")
                await anyio.sleep(0.02)

        with anyio.fail_after(5):
            await republish()
        assert received[0] == b"before"
        assert set(received[1:]) == {b"after"}


@pytest.mark.redis
@bounded
async def test_full_pool_waits_instead_of_failing(redis_url: str) -> None:
    async with store_from_url(redis_url, max_connections=1) as store:
        await store.set("k", b"v")
        results: list[bytes | None] = []

        async def get() -> None:
            results.append(await store.get("k"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get)
        assert results == [b"v"] * 10


@redis_stores
class TestStats:
    async def test_round_trips_on_the_request_path_are_counted(self, store: Store) -> None:
        store.stats = stats = StoreStats()
        await store.set("k", b"v")
        assert await store.get("k") == b"v"
        await store.run_many([(CAPPED_INCR, ["c"], [1, 1000]), (ECHO, ["k"], ["a"])])  # one trip
        await store.incr("counted-elsewhere")  # off the request path: redis.asyncio, not counted
        assert sum(stats.buckets) == 3 and stats.errors == 0 and stats.seconds > 0


@bounded
async def test_failed_round_trips_count_as_errors(free_tcp_port: int) -> None:
    async with store_from_url(f"redis://127.0.0.1:{free_tcp_port}/0", timeout_s=0.2) as store:
        store.stats = stats = StoreStats()
        for call in (lambda: store.get("k"), lambda: store.run(CAPPED_INCR, ["c"], [1, 1000])):
            with pytest.raises(StoreError):
                await call()
    assert sum(stats.buckets) == 2 and stats.errors == 2
