"""The lean RESP client (gateway/store/resp.py) against a real redis-server."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import pytest
import redis

from gateway.store import StoreError, store_from_url
from gateway.store.connect import lean_for
from gateway.store.resp import ReplyError, RespClient, encode
from gateway.store.url import parse

from . import bounded

if TYPE_CHECKING:
    from tests.conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture(params=[pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both event loops: the gateway serves on uvloop, whose transports differ from asyncio's."""
    return "asyncio", request.param


@pytest.fixture
async def lean(redis_url: str) -> AsyncIterator[RespClient]:
    client = _lean(redis_url, timeout_s=2.0)
    yield client
    await client.aclose()


def _lean(url: str, *, timeout_s: float) -> RespClient:
    return lean_for(parse(url), tls=None, sentinels=None, timeout_s=timeout_s)


async def call(client: RespClient, *args: str | int | bytes) -> object:
    return await client.execute(encode(args))


def test_encode() -> None:
    assert encode(("SET", "k", b"\x00v", 12, 0.5)) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$2\r\n12\r\n$3\r\n0.5\r\n"
    )
    with pytest.raises(StoreError, match="bool"):
        encode(("SET", "k", True))  # type: ignore[arg-type]


@bounded
async def test_concurrent_calls_pipeline_on_one_connection_in_order(lean: RespClient, redis_url: str) -> None:
    await call(lean, "PING")
    results: list[tuple[int, object, object]] = []

    async def one(i: int) -> None:
        reply = await lean.execute(encode(("INCR", "n")), encode(("CLIENT", "ID")))
        results.append((i, *reply))

    with redis.Redis.from_url(redis_url) as admin:
        admin.client_pause(5000, all=False)  # writes only, so UNPAUSE below is not itself paused
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
            for _ in range(200):
                if lean._conn is not None and len(lean._conn._pending) == 200:
                    break
                await anyio.sleep(0.01)
            # All written while the server is paused: 200 calls in flight on the socket, none waiting.
            assert lean._conn is not None and len(lean._conn._pending) == 200 and not results
            admin.client_unpause()
    # Answered in the order written, all on one connection.
    assert [count for _, count, _ in sorted(results)] == list(range(1, 201))
    assert len({client_id for _, _, client_id in results}) == 1


@bounded
async def test_error_replies_are_values_and_the_stream_stays_in_step(lean: RespClient) -> None:
    await call(lean, "HSET", "h", "f", "v")
    reply, after = await lean.execute(encode(("INCR", "h")), encode(("HGET", "h", "f")))
    assert isinstance(reply, ReplyError) and str(reply).startswith("WRONGTYPE")
    assert after == b"v"
    unknown = await call(lean, "NOSUCHCOMMAND")
    assert isinstance(unknown, ReplyError)
    assert await call(lean, "PING") == b"PONG"


@bounded
async def test_noscript_after_script_flush(lean: RespClient) -> None:
    sha = await call(lean, "SCRIPT", "LOAD", "return 7")
    assert isinstance(sha, bytes)
    assert await call(lean, "EVALSHA", sha, 0) == 7
    await call(lean, "SCRIPT", "FLUSH")
    reply = await call(lean, "EVALSHA", sha, 0)
    assert isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


@bounded
async def test_timeout_fails_pending_calls_and_later_replies_stay_in_step(redis_url: str) -> None:
    lean = _lean(redis_url, timeout_s=0.3)
    try:
        await call(lean, "SET", "a", "A")
        await call(lean, "SET", "b", "B")
        with redis.Redis.from_url(redis_url) as admin:
            admin.client_pause(700)
        failures: list[str] = []

        async def stuck(key: str) -> None:
            with pytest.raises(StoreError, match="timed out") as caught:
                await call(lean, "GET", key)
            failures.append(key)
            assert "0.3s" in str(caught.value)

        with anyio.fail_after(0.6):  # every call bounded by the timeout, not by the pause
            async with anyio.create_task_group() as tg:
                tg.start_soon(stuck, "a")
                tg.start_soon(stuck, "b")
        assert sorted(failures) == ["a", "b"]
        await anyio.sleep(0.2)  # the pause ends; the late replies must not be taken as the next ones
        assert await call(lean, "GET", "b") == b"B"
        assert await call(lean, "GET", "a") == b"A"
    finally:
        await lean.aclose()


@bounded
async def test_a_cancelled_call_keeps_its_slot(redis_url: str) -> None:
    lean = _lean(redis_url, timeout_s=2.0)
    try:
        await call(lean, "SET", "a", "A")
        await call(lean, "SET", "b", "B")
        with redis.Redis.from_url(redis_url) as admin:
            admin.client_pause(300)
        with anyio.move_on_after(0.05) as scope:
            await call(lean, "GET", "a")
        assert scope.cancelled_caught
        # Its reply (A) comes first once the pause ends and must be dropped, not given to this call.
        assert await call(lean, "GET", "b") == b"B"
    finally:
        await lean.aclose()


@bounded
async def test_stale_socket_after_a_restart_reconnects(spawn_redis: Callable[[], RedisServer]) -> None:
    server = spawn_redis()
    lean = _lean(server.url, timeout_s=0.5)
    try:
        assert await call(lean, "SET", "k", "v") == b"OK"
        # No await in between: the client has not seen the close when it writes the next call.
        server.stop()
        server.start()
        assert await call(lean, "GET", "k") is None  # a new, empty server
        server.stop()
        server.start()
        ids: list[object] = []

        async def client_id() -> None:
            ids.append(await call(lean, "CLIENT", "ID"))

        async with anyio.create_task_group() as tg:  # every call fails on the stale socket and retries
            for _ in range(50):
                tg.start_soon(client_id)
        assert len(ids) == 50 and len(set(ids)) == 1  # all on one new connection
        server.stop()
        with pytest.raises(StoreError, match=r"redis connect to .* failed"):
            await call(lean, "GET", "k")
        server.start()
        assert await call(lean, "PING") == b"PONG"
    finally:
        await lean.aclose()


@bounded
async def test_store_rides_out_a_restart_on_its_hot_path(spawn_redis: Callable[[], RedisServer]) -> None:
    server = spawn_redis()
    async with store_from_url(server.url, timeout_s=0.5) as store:
        assert await store.set("k", b"v") is True
        server.stop()
        server.start()
        assert await store.get("k") is None
        assert await store.set("k", b"w") is True
        assert await store.get("k") == b"w"


@bounded
async def test_password_username_and_db_from_the_url(spawn_redis: Callable[[], RedisServer]) -> None:
    server = spawn_redis()
    with redis.Redis(port=server.port) as admin:
        admin.execute_command("ACL", "SETUSER", "gw", "on", f">{PASSWORD}", "~*", "&*", "+@all")
        admin.config_set("requirepass", PASSWORD)
    host = f"127.0.0.1:{server.port}"
    for url in (f"redis://:{PASSWORD}@{host}/2", f"redis://gw:{PASSWORD}@{host}/2"):
        async with store_from_url(url, timeout_s=0.5) as store:
            await store.set("k", url.encode())
            assert await store.get("k") == url.encode()
        with redis.Redis(port=server.port, password=PASSWORD, db=2) as admin:
            assert admin.get("k") == url.encode()

    async with store_from_url(f"redis://gw:wrong-{PASSWORD}@{host}/0", timeout_s=0.5) as store:
        with pytest.raises(StoreError, match="refused the connection setup") as caught:
            await store.get("k")
        assert PASSWORD not in "".join(traceback.format_exception(caught.value))


@bounded
async def test_aclose_fails_pending_calls_and_later_ones(redis_url: str) -> None:
    lean = _lean(redis_url, timeout_s=2.0)
    await call(lean, "PING")
    with redis.Redis.from_url(redis_url) as admin:
        admin.client_pause(300)
    outcome: list[BaseException] = []

    async def pending() -> None:
        try:
            await call(lean, "PING")
        except StoreError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pending)
        await anyio.sleep(0.05)
        await lean.aclose()
    assert [str(exc) for exc in outcome] == ["redis connection closed"]
    with pytest.raises(StoreError, match="closed"):
        await call(lean, "PING")
