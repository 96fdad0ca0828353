"""`Store.hset_confirmed`: a hash write acknowledged by the replicas (WAIT/WAITAOF) before it returns.

Against real servers: a lone node (no replicas: no wait), Sentinel's primary with two replicas,
a cluster (the node owning the key's slot, one replica), and a replica stopped (SIGSTOP) so the
count falls short.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from gateway.store import Confirmed, MemoryStore, Store, StoreError, store_from_url

from . import STORES, bounded, over, within

if TYPE_CHECKING:
    from tests.redis_setups import SentinelSetup

pytestmark = pytest.mark.anyio

KEY = "gw:{auth}:keys"


@over(
    [
        STORES["memory"],
        STORES["redis"],
        STORES["redis-tls"],
        STORES["redis-sentinel"],
        STORES["redis-cluster"],
    ]
)
class TestEveryBackend:
    async def test_writes_and_removes_the_field(self, store: Store) -> None:
        await store.hset_confirmed(KEY, "a", b"1", replicas=None, aof=False, timeout_s=1.0)
        await store.hset_confirmed(KEY, "b", b"2", replicas=None, aof=False, timeout_s=1.0)
        assert await store.hgetall(KEY) == {"a": b"1", "b": b"2"}
        confirmed = await store.hset_confirmed(KEY, "a", None, replicas=None, aof=False, timeout_s=1.0)
        assert confirmed.shortfall() == ""
        assert await store.hgetall(KEY) == {"b": b"2"}

    async def test_all_means_every_replica_connected_to_the_primary(
        self, store: Store, request: pytest.FixtureRequest
    ) -> None:
        confirmed = await store.hset_confirmed(KEY, "a", b"1", replicas=None, aof=False, timeout_s=2.0)
        # The lone nodes and the memory store have none; Sentinel's primary two; a cluster primary one.
        wanted = {"sentinel_store": 2, "cluster_store": 1}.get(request.node.callspec.params["store"], 0)
        assert confirmed == Confirmed(wanted=wanted, replicas=wanted)


@bounded
async def test_the_memory_store_has_nothing_to_wait_for() -> None:
    async with MemoryStore() as store:
        confirmed = await store.hset_confirmed(KEY, "a", b"1", replicas=3, aof=True, timeout_s=0.01)
    assert confirmed.shortfall() == ""


@pytest.mark.redis
@bounded
async def test_replicas_missing_on_a_lone_node_are_short_after_the_timeout_and_the_write_stands(
    redis_url: str,
) -> None:
    async with store_from_url(redis_url) as store:
        await store.hset_confirmed(KEY, "a", None, replicas=0, aof=False, timeout_s=1.0)
        confirmed = await store.hset_confirmed(KEY, "a", b"1", replicas=1, aof=False, timeout_s=0.2)
        assert confirmed == Confirmed(wanted=1, replicas=0)
        assert confirmed.shortfall() == "confirmed by 0 of 1 store replicas"
        assert await store.hget(KEY, "a") == b"1"
        # 0: no wait at all, so nothing is short.
        assert (
            await store.hset_confirmed(KEY, "a", None, replicas=0, aof=False, timeout_s=0.2)
        ).shortfall() == ""


@pytest.mark.redis
@bounded
async def test_waitaof_refused_is_reported_not_raised(redis_url: str) -> None:
    # Debian's 7.0 has no WAITAOF; 7.2+ refuses it without appendonly (the test server has none).
    async with store_from_url(redis_url) as store:
        confirmed = await store.hset_confirmed(KEY, "a", b"1", replicas=0, aof=True, timeout_s=0.2)
        assert confirmed.refused
        assert confirmed.shortfall().startswith("the store refused to confirm it: ")
        assert await store.hget(KEY, "a") == b"1"  # the write itself went through
        await store.hdel(KEY, "a")


@pytest.mark.redis
@bounded
async def test_a_write_refused_by_redis_is_a_store_error(redis_url: str) -> None:
    async with store_from_url(redis_url) as store:
        await store.set("not-a-hash", b"x")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.hset_confirmed("not-a-hash", "a", b"1", replicas=None, aof=False, timeout_s=0.2)
        # The connection is still usable afterwards (its replies were all read).
        assert (
            await store.hset_confirmed(KEY, "a", None, replicas=None, aof=False, timeout_s=0.2)
        ).wanted == 0
        await store.delete("not-a-hash")


@pytest.mark.redis
@within(40)
async def test_a_stopped_replica_makes_the_count_short_on_the_connection_that_wrote(
    spawn_sentinel_setup: Callable[..., SentinelSetup],
) -> None:
    setup = spawn_sentinel_setup()
    primary = setup.primary()
    stopped = next(node for node in setup.nodes if node is not primary)
    async with store_from_url(setup.url) as store:
        await store.ping()
        assert stopped.process is not None
        stopped.process.send_signal(signal.SIGSTOP)  # connected still, but acknowledges nothing
        try:
            # A WAIT sent on any other connection than the write's would count both replicas at once.
            confirmed = await store.hset_confirmed(KEY, "a", b"1", replicas=None, aof=False, timeout_s=0.3)
            assert confirmed == Confirmed(wanted=2, replicas=1)
            assert (
                await store.hset_confirmed(KEY, "b", b"1", replicas=1, aof=False, timeout_s=1.0)
            ).shortfall() == ""
        finally:
            stopped.process.send_signal(signal.SIGCONT)
        others = [node for node in setup.nodes if node is not primary and node is not stopped]
        with others[0].client() as replica:
            assert replica.hgetall(KEY) == {b"a": b"1", b"b": b"1"}  # confirmed: already on the replica
