"""redis+sentinel:// against real sentinels: discovery, demotion (READONLY), and a SIGKILLed primary."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import pytest
import redis

from gateway.store import StoreError, store_from_url
from gateway.store.resp import RespClient, encode

from . import bounded, eventually, within
from .test_store import CAPPED_INCR

if TYPE_CHECKING:
    from tests.conftest import RedisServer
    from tests.redis_setups import SentinelSetup, TestPKI

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PROMOTED_WITHIN_S = 5.0


@bounded
async def test_unknown_service_is_a_store_error(sentinel_setup: SentinelSetup) -> None:
    url = sentinel_setup.url.replace("/gw-primary/", "/no-such-service/")
    async with store_from_url(url, timeout_s=0.5) as store:
        with pytest.raises(StoreError, match="no sentinel named the primary of 'no-such-service'"):
            await store.get("k")
        with pytest.raises(StoreError, match="no-such-service"):
            await store.ping()


@bounded
async def test_no_sentinel_answering_is_a_store_error_without_the_passwords(free_tcp_port: int) -> None:
    url = f"redis+sentinel://gw:node-pw@127.0.0.1:{free_tcp_port}/gw-primary?sentinel_password=sentinel-pw"
    async with store_from_url(url, timeout_s=0.3) as store:
        for call in (lambda: store.set("k", b"v"), store.ping):
            with pytest.raises(StoreError, match="no sentinel named the primary") as caught:
                await call()
            text = "".join(traceback.format_exception(caught.value))
            assert "node-pw" not in text and "sentinel-pw" not in text


@bounded
async def test_a_demoted_node_sends_the_calls_from_its_readonly_reply_on_to_the_new_primary(
    spawn_redis: Callable[[], RedisServer],
) -> None:
    old, new = spawn_redis(), spawn_redis()
    primary = [old]

    async def locate() -> tuple[str, int]:
        return "127.0.0.1", primary[0].port

    lean = RespClient(host="127.0.0.1", port=old.port, locate=locate, timeout_s=2.0)
    try:
        assert await lean.execute(encode(("SET", "k", "old"))) == b"OK"
        with old.client() as admin:
            admin.replicaof("127.0.0.1", new.port)  # demoted; `new` is empty, so `old` will be too
        primary[0] = new
        await anyio.sleep(0.2)
        # The GET runs on the demoted node; the SET's READONLY sends it (alone) to the new primary.
        replies = await lean.execute(encode(("GET", "missing")), encode(("SET", "k", "new")))
        assert replies == [None, b"OK"]
        with new.client() as admin:
            assert admin.get("k") == b"new"
    finally:
        await lean.aclose()


@bounded
async def test_a_replica_named_as_primary_is_refused(spawn_redis: Callable[[], RedisServer]) -> None:
    primary, replica = spawn_redis(), spawn_redis()
    with replica.client() as admin:
        admin.replicaof("127.0.0.1", primary.port)

    async def locate() -> tuple[str, int]:
        return "127.0.0.1", replica.port

    lean = RespClient(host="127.0.0.1", port=replica.port, locate=locate, timeout_s=2.0)
    try:
        with pytest.raises(StoreError, match="is a slave, not the primary"):
            await lean.execute(encode(("GET", "k")))
    finally:
        await lean.aclose()


@within(30)
async def test_graceful_failover_moves_the_store_to_the_new_primary(
    spawn_sentinel_setup: Callable[..., SentinelSetup],
) -> None:
    setup = spawn_sentinel_setup()
    old = setup.primary()
    async with store_from_url(setup.url, timeout_s=0.5) as store:
        assert await store.set("k", b"1") is True
        with redis.Redis(host="127.0.0.1", port=setup.sentinel_ports[0]) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", "gw-primary")
        await eventually(lambda: setup.primary() is not old, seconds=8.0)
        new = setup.primary()

        async def written_on_new() -> bool:
            try:
                await store.set("k", b"2")
            except StoreError:
                return False
            with new.client() as admin:
                return bool(admin.get("k") == b"2")

        with anyio.fail_after(PROMOTED_WITHIN_S):
            while not await written_on_new():
                await anyio.sleep(0.05)


@within(40)
async def test_sigkilled_primary_recovers_on_the_promoted_replica_within_5s(
    spawn_sentinel_setup: Callable[..., SentinelSetup],
) -> None:
    setup = spawn_sentinel_setup()
    old = setup.primary()
    received: list[bytes] = []
    async with store_from_url(setup.url, timeout_s=0.3) as store:
        await store.subscribe("events", received.append)
        assert (await store.run(CAPPED_INCR, ["c"], [1000, 60_000]))[:2] == [1, 1]
        calls: list[tuple[float, bool]] = []  # (when, succeeded)

        async def one_call() -> None:
            try:
                await store.set("k", b"v")
                assert await store.get("k") == b"v"
                await store.run(CAPPED_INCR, ["c"], [1000, 60_000])
            except StoreError:
                calls.append((time.monotonic(), False))
            else:
                calls.append((time.monotonic(), True))

        for _ in range(5):
            await one_call()
        assert all(ok for _, ok in calls)
        killed_at = time.monotonic()
        assert old.process is not None
        old.stop()  # SIGKILL
        promoted_at: float | None = None
        deadline = killed_at + 15.0
        while time.monotonic() < deadline:  # bounded: ~20 calls a second at most
            await one_call()
            if promoted_at is None:
                with redis.Redis(host="127.0.0.1", port=setup.sentinel_ports[0]) as sentinel:
                    _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "gw-primary")
                if int(port) != old.port:
                    promoted_at = time.monotonic()
            elif time.monotonic() > promoted_at + PROMOTED_WITHIN_S + 1.0:
                break
            await anyio.sleep(0.05)
        assert promoted_at is not None, "sentinel did not promote a replica within 15 s"
        after = [(when, ok) for when, ok in calls if when > promoted_at + PROMOTED_WITHIN_S]
        assert after and all(ok for _, ok in after), "calls still fail 5 s after the promotion"
        first_ok = min(when for when, ok in calls if ok and when > killed_at)
        assert first_ok <= promoted_at + PROMOTED_WITHIN_S
        new = setup.primary()
        assert new is not old
        with new.client() as admin:
            assert admin.get("k") == b"v"  # the store writes on the promoted replica

        async def republish() -> None:
            while b"after" not in received:
                await store.publish("events", b"after")
                await anyio.sleep(0.05)

        with anyio.fail_after(PROMOTED_WITHIN_S):
            await republish()


@within(30)
async def test_over_tls_sentinels_and_nodes_alike(
    spawn_sentinel_setup: Callable[..., SentinelSetup], test_pki: TestPKI
) -> None:
    setup = spawn_sentinel_setup(test_pki)
    received: list[bytes] = []
    async with store_from_url(setup.url) as store:
        await store.ping()  # redis.asyncio, via the sentinels
        await store.subscribe("events", received.append)
        assert await store.set("k", b"v") is True  # the lean client, via the sentinels
        assert (await store.run(CAPPED_INCR, ["c"], [5, 10_000]))[:2] == [1, 1]
        await store.publish("events", b"m")
        await eventually(lambda: received == [b"m"])
    with setup.primary().client() as admin:
        assert admin.get("k") == b"v"
    untrusted = setup.url.replace(f"ssl_ca={test_pki.ca}", f"ssl_ca={test_pki.other_ca}")
    async with store_from_url(untrusted, timeout_s=1.0) as store:
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            await store.get("k")  # the sentinels' certificate is refused: never asked in the clear
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            await store.ping()
