"""redis+cluster:// on a real 3-primary / 3-replica cluster: slots, routing, redirections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from gateway.config import Limits
from gateway.limits.specs import ADMIT, deployment_base, key_base, specs_of
from gateway.store import Call, RedisStore, ScriptArg, StoreError, store_from_url
from gateway.store.cluster import ClusterClient
from gateway.store.slots import key_slot

from . import bounded, within
from .test_store import CAPPED_INCR, ECHO

if TYPE_CHECKING:
    from tests.redis_setups import ClusterSetup

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEYS = [
    "foo",
    "bar",
    "{user1000}.following",
    "foo{}{bar}",
    "foo{{bar}}zap",
    "foo{bar}{zap}",
    "gw:{k:1}:rpm:7",
]


def test_key_slot_agrees_with_cluster_keyslot(cluster_setup: ClusterSetup) -> None:
    with cluster_setup.nodes[0].client() as node:
        for key in [*KEYS, *(f"key-{i}" for i in range(200))]:
            assert key_slot(key) == node.cluster("keyslot", key), key


def _lean(store: object) -> ClusterClient:
    assert isinstance(store, RedisStore) and isinstance(store._lean, ClusterClient)
    return store._lean


@bounded
async def test_run_many_spreads_over_the_primaries_in_one_parallel_round_trip(
    cluster_setup: ClusterSetup,
) -> None:
    cluster_setup.flush()
    keys = [f"c{i}" for i in range(30)]  # 30 slots: every primary gets some
    async with store_from_url(cluster_setup.url) as store:
        replies = await store.run_many([(CAPPED_INCR, [key], [100, 60_000]) for key in keys])
        assert [reply[:2] for reply in replies] == [[1, 1]] * len(keys)
        lean = _lean(store)
        owners = {key: await lean.owner(key) for key in keys}
        assert len(set(owners.values())) == 3 and set(lean._nodes) >= set(owners.values())
    for key, (_, port) in owners.items():  # each counter lives on its slot's primary
        assert _holder(cluster_setup, key) == port


@bounded
async def test_limit_counters_spread_over_the_primaries(cluster_setup: ClusterSetup) -> None:
    # The limits of 150 keys and 20 deployments, as the limiter charges them: one ADMIT per tag.
    cluster_setup.flush()
    limits = Limits(rpm=100, tpm=10_000, budget_usd=5.0, concurrency=4)
    scopes = [specs_of(limits, key_base(f"team-{i}"), "this key", 60_000) for i in range(150)]
    scopes += [specs_of(limits, deployment_base(f"openai/model-{i}"), "d", 0) for i in range(20)]
    calls: list[Call] = []
    for specs in scopes:
        args: list[ScriptArg] = ["member", 1]
        for spec in specs:
            args += spec.args(1)
        calls.append((ADMIT, [spec.name for spec in specs], args))
    async with store_from_url(cluster_setup.url) as store:
        replies = await store.run_many(calls)
    assert [int(reply[0]) for reply in replies] == [1] * len(calls)
    held = []
    for node in cluster_setup.primaries():
        with node.client() as client:
            held.append(client.dbsize())
    assert sum(held) >= 3 * len(scopes)  # a counter per limit (a budget charged 1 nano-USD too)
    assert max(held) < 0.5 * sum(held), held  # no primary holds most of the state


def _holder(cluster_setup: ClusterSetup, key: str) -> int:
    """The port of the primary holding `key`, asked of the nodes themselves."""
    holders = []
    for node in cluster_setup.primaries():
        with node.client() as client:
            if client.cluster("countkeysinslot", key_slot(key)) and client.exists(key):
                holders.append(node.port)
    assert len(holders) == 1, holders
    return holders[0]


@bounded
async def test_keys_spanning_slots_are_a_programming_error(cluster_setup: ClusterSetup) -> None:
    async with store_from_url(cluster_setup.url) as store:
        with pytest.raises(ValueError, match="share a slot"):
            await store.run(ECHO, ["a", "b"], [])
        assert await store.run(ECHO, ["{a}1", "{a}2"], []) == [[b"{a}1", b"{a}2"], []]


@bounded
async def test_moved_updates_the_map_and_resends(cluster_setup: ClusterSetup) -> None:
    cluster_setup.flush()
    async with store_from_url(cluster_setup.url) as store:
        lean = _lean(store)
        right = await lean.owner("k")
        wrong = next(address for address in set(filter(None, lean._owners or ())) if address != right)
        assert lean._owners is not None
        lean._owners[key_slot("k")] = wrong  # as after a resharding the client has not seen
        assert await store.set("k", b"v") is True  # MOVED, then sent to the owner
        assert lean._owners[key_slot("k")] == right
        assert await store.get("k") == b"v"
        # Blocking log reads find their node through the same map.
        await store.xadd("k-log", b"entry", ttl_s=10)
        log_owner = await lean.owner("k-log")
        lean._owners[key_slot("k-log")] = next(a for a in set(filter(None, lean._owners)) if a != log_owner)
        assert [value for _, value in await store.xread("k-log", "0", block_s=0.5)] == [b"entry"]


@bounded
async def test_ask_sends_asking_and_the_call_to_the_importing_node(cluster_setup: ClusterSetup) -> None:
    cluster_setup.flush()
    slot = key_slot("{ask}k")
    ids = {}
    for node in cluster_setup.primaries():
        with node.client() as client:
            ids[node.port] = client.cluster("myid")
    async with store_from_url(cluster_setup.url) as store:
        lean = _lean(store)
        source_port = (await lean.owner("{ask}k"))[1]
        target_port = next(port for port in ids if port != source_port)
        source = next(node for node in cluster_setup.nodes if node.port == source_port)
        target = next(node for node in cluster_setup.nodes if node.port == target_port)
        with source.client() as s, target.client() as t:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source_port])
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target_port])
            try:
                # A key the source does not hold, in a migrating slot: ASK, answered on the target.
                assert await store.set("{ask}k", b"v") is True
                assert await store.run(ECHO, ["{ask}k"], ["x"]) == [[b"{ask}k"], [b"x"]]
                assert t.cluster("countkeysinslot", slot) == 1 and s.cluster("countkeysinslot", slot) == 0
                assert lean._owners is not None and lean._owners[slot] == ("127.0.0.1", source_port)
            finally:
                pipe = t.pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.delete("{ask}k")
                pipe.execute()
                s.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
                t.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


@bounded
async def test_tryagain_waits_while_the_keys_are_split_and_follows_the_slot_when_it_has_moved(
    cluster_setup: ClusterSetup,
) -> None:
    """A multi-key call in a migrating slot whose keys are on both sides is answered TRYAGAIN (it
    did not run): resent until the slot has moved; past the timeout, the error is the caller's."""
    cluster_setup.flush()
    slot = key_slot("{split}a")
    ids = {}
    for node in cluster_setup.primaries():
        with node.client() as client:
            ids[node.port] = client.cluster("myid")
    async with store_from_url(cluster_setup.url, timeout_s=0.3) as store:
        lean = _lean(store)
        source_port = (await lean.owner("{split}a"))[1]
        target_port = next(port for port in ids if port != source_port)
        nodes = {node.port: node for node in cluster_setup.nodes if node.port in ids}
        assert await store.set("{split}a", b"here") is True  # on the source; {split}b is nowhere
        with nodes[source_port].client() as s, nodes[target_port].client() as t:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source_port])
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target_port])
            try:
                with pytest.raises(StoreError, match="TRYAGAIN"):  # split for longer than the timeout
                    await store.run(ECHO, ["{split}a", "{split}b"], [])
                tried = _tryagains(s)
                call = asyncio.ensure_future(store.run(ECHO, ["{split}a", "{split}b"], ["x"]))
                while _tryagains(s) == tried:  # the call is waiting on the split slot
                    await anyio.sleep(0.005)
                assert not call.done()
                s.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", "{split}a")
                for port in (
                    target_port,
                    source_port,
                    *(p for p in ids if p not in (source_port, target_port)),
                ):
                    with nodes[port].client() as client:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target_port])
                assert await call == [[b"{split}a", b"{split}b"], [b"x"]]  # MOVED to the target
                assert lean._owners is not None and lean._owners[slot] == ("127.0.0.1", target_port)
                assert await store.get("{split}a") == b"here"
            finally:  # the session's cluster as it was: the slot back on its source, empty
                t.delete("{split}a")
                for port in ids:
                    with nodes[port].client() as client:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[source_port])


def _tryagains(node: Any) -> int:
    """How many TRYAGAIN replies `node` has given."""
    return int(node.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0))


@bounded
async def test_no_seed_answering_is_a_store_error(free_tcp_port: int) -> None:
    async with store_from_url(
        f"redis+cluster://gw:pw-secret@127.0.0.1:{free_tcp_port}", timeout_s=0.3
    ) as store:
        with pytest.raises(StoreError, match="no cluster node gave the slot map") as caught:
            await store.get("k")
        assert "pw-secret" not in str(caught.value)


@within(40)
async def test_sigkilled_primary_recovers_on_its_promoted_replica(
    spawn_cluster_setup: Callable[[], ClusterSetup],
) -> None:
    setup = spawn_cluster_setup()
    victim = setup.nodes[0]  # the first seed, which pub/sub uses: it must move on too
    received: list[bytes] = []
    async with store_from_url(setup.url, timeout_s=0.3) as store:
        lean = _lean(store)
        await store.subscribe("events", received.append)
        owners = {k: await lean.owner(k) for k in (f"{{failover}}{i}" for i in range(100))}
        key = next(k for k, (_, port) in owners.items() if port == victim.port)
        assert await store.set(key, b"v") is True
        with victim.client() as node:  # the write has reached the replica
            node.wait(1, 2000)
        victim.stop()  # SIGKILL
        killed_at = time.monotonic()
        recovered_at = None
        while time.monotonic() < killed_at + 30:  # bounded: ~20 calls a second at most
            try:
                assert await store.get(key) == b"v"  # the promoted replica had it
                recovered_at = time.monotonic()
                break
            except StoreError:
                await anyio.sleep(0.05)
        assert recovered_at is not None, "the store did not recover within 30 s"
        assert (await lean.owner(key))[1] != victim.port
        replies = await store.run_many([(CAPPED_INCR, [f"c{i}"], [10, 60_000]) for i in range(12)])
        assert [reply[:2] for reply in replies] == [[1, 1]] * 12

        async def republish() -> None:
            while b"after" not in received:
                await store.publish("events", b"after")
                await anyio.sleep(0.05)

        with anyio.fail_after(10):
            await republish()
