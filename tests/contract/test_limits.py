"""The rate-limit scripts on every backend: exact under concurrency, all-or-none, on the store's clock."""

from __future__ import annotations

import anyio
import pytest

from gateway.limits import ADJUST, ADMIT
from gateway.store import Store

from . import all_stores, bounded_tests

pytestmark = pytest.mark.anyio
PREFIX = "gw:{rl:k}"


@all_stores
@bounded_tests
class TestAdmission:
    async def test_exactly_the_limit_under_concurrency(self, store: Store) -> None:
        results: list[int] = []

        async def one() -> None:
            results.append(int((await store.run(ADMIT, [PREFIX], ["rpm", 50, 60_000, 1]))[0]))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert results.count(1) == 50 and results.count(0) == 150

    async def test_all_or_none_and_the_refusing_limit(self, store: Store) -> None:
        args = ["rpm", 10, 60_000, 1, "tpm", 100, 60_000, 80]
        first = await store.run(ADMIT, [PREFIX], args)
        assert [int(x) for x in first[:3]] == [1, 0, 0]
        assert [int(first[3]), int(first[5])] == [9, 20]  # remaining requests, tokens
        second = await store.run(ADMIT, [PREFIX], args)
        assert int(second[0]) == 0 and int(second[1]) == 2 and 0 < int(second[2]) <= 60_000
        third = await store.run(ADMIT, [PREFIX], ["rpm", 10, 60_000, 1])
        assert int(third[3]) == 8  # the refused request charged nothing

    async def test_adjust_corrects_and_never_goes_negative(self, store: Store) -> None:
        await store.run(ADMIT, [PREFIX], ["tpm", 100, 60_000, 90])
        assert int(await store.run(ADJUST, [PREFIX + ":tpm"], [-60, 60_000])) == 30
        assert int(await store.run(ADJUST, [PREFIX + ":tpm"], [-500, 60_000])) == 0
        reply = await store.run(ADMIT, [PREFIX], ["tpm", 100, 60_000, 100])
        assert int(reply[0]) == 1

    async def test_window_slides(self, store: Store) -> None:
        args = ["rps", 2, 300, 1]
        assert [int((await store.run(ADMIT, [PREFIX], args))[0]) for _ in range(3)] == [1, 1, 0]
        await anyio.sleep(0.65)  # two windows later nothing is left of them
        assert int((await store.run(ADMIT, [PREFIX], args))[0]) == 1
