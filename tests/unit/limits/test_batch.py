"""Settlements batched: one SETTLE per tag per round trip, one correction per counter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from gateway.limits.batch import Batch
from gateway.limits.specs import CORRECT, HASH, RELEASE, SETTLE
from gateway.store import Call, MemoryStore, Script, ScriptArg, StoreError

pytestmark = pytest.mark.anyio


class Recording(MemoryStore):
    """A memory store that records each round trip's calls and can be told to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.trips: list[list[Call]] = []
        self.fail = False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        self.trips.append([(script, keys, args)])
        return await self._run([(script, keys, args)])

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        self.trips.append(list(calls))
        return await self._run(calls)

    async def _run(self, calls: Sequence[Call]) -> list[Any]:
        await anyio.sleep(0.01)  # a round trip: what comes meanwhile waits for the next
        if self.fail:
            raise StoreError("store unreachable")
        return [await MemoryStore.run(self, *call) for call in calls]


async def test_what_arrives_meanwhile_goes_in_one_trip_merged_per_counter() -> None:
    store = Recording()
    key, deployment = "gw:{k:a}", "gw:{d:east}"
    budget, quota = f"{key}:usd", f"{deployment}:usd"
    for name in (budget, quota):
        await store.hset(name, "n", b"7")  # a calendar hash counting window 7
        await store.hset(name, "v", b"500")
    batch = Batch(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.add, {key: [CORRECT, budget, "7", -10]})  # goes at once
        await anyio.sleep(0.001)
        for delta in (-20, -30, 50):  # these three wait for it, then go together
            tg.start_soon(batch.add, {key: [CORRECT, budget, "7", delta]})
        tg.start_soon(batch.add, {key: [RELEASE, f"{key}:conc", "", "r1"], deployment: [CORRECT, quota, "7", -7]})
    assert len(store.trips) == 2
    second = store.trips[1]
    assert [(c[0], list(c[1])) for c in second] == [(SETTLE, [f"{key}:conc"]), (SETTLE, [quota])]  # every key named
    assert list(second[0][2]) == [RELEASE, f"{key}:conc", "", "r1"]  # -20 - 30 + 50: nothing to correct
    assert list(second[1][2]) == [CORRECT, quota, "7", -7]
    assert await store.hget(budget, "v") == b"490" and await store.hget(quota, "v") == b"493"


async def test_a_failed_settlement_is_logged_and_releases_its_waiters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Recording()
    store.fail = True
    with anyio.fail_after(2):
        await Batch(store).add({"gw:{k:a}": [HASH, "gw:{k:a}:tpm", "1", -10]})
    assert "not settled (estimates stand)" in caplog.text
