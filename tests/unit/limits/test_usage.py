from __future__ import annotations

import asyncio
import time

import pytest

from gateway.limits.usage import UsageRecorder
from gateway.providers.base import find_usage
from gateway.store import MemoryStore, StoreError


@pytest.mark.parametrize(
    ("data", "usage"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,'
         b'"completion_tokens_details":{"reasoning_tokens":5}}}', (12, 30)),
        (b'{"data":[],"usage":{"prompt_tokens": 7, "total_tokens": 7}}', (7, 0)),
        (b'data: {"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
         b'data: [DONE]\n\n', (3, 4)),
        (b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\ndata: {"usage":null}\n\n', None),
        (b'{"choices":[]}', None),
    ],
)
def test_find_usage(data: bytes, usage: tuple[int, int] | None) -> None:
    assert find_usage(data) == usage


def test_counts_costs_and_reads_by_range() -> None:
    async def main() -> None:
        store = MemoryStore()
        recorder = UsageRecorder(store, {"gpt": (2.0, 8.0)})  # USD per million tokens
        recorder.add("key_1", "gpt", (1000, 500))
        recorder.add("key_1", "gpt", None)
        recorder.add("key_1", "emb", (10, 0))
        recorder.add("key_2", "gpt", (1, 1))
        await recorder.flush()
        now = time.time()
        report = await recorder.read("key_1", now - 60, now + 1)
        assert report["gpt"] == {"requests": 2, "prompt_tokens": 1000, "completion_tokens": 500,
                                 "total_tokens": 1500, "cost_usd": 0.006}
        assert report["emb"]["cost_usd"] == 0 and report["emb"]["requests"] == 1
        assert await recorder.read("key_1", now - 7200, now - 3601) == {}
        assert list(await recorder.read("key_2", now - 60, now + 1)) == ["gpt"]

    asyncio.run(main())


def test_a_failed_flush_keeps_the_counts() -> None:
    async def main() -> None:
        store = MemoryStore()
        recorder = UsageRecorder(store, {})
        recorder.add("k", "m", (5, 6))
        real = store.hincrby

        async def down(*args: object, **kwargs: object) -> None:
            raise StoreError("unreachable")

        store.hincrby = down  # type: ignore[method-assign]
        await recorder.flush()
        store.hincrby = real  # type: ignore[method-assign]
        recorder.add("k", "m", (1, 1))
        recorder.start()
        await recorder.aclose()  # the final flush sends both
        now = time.time()
        assert (await recorder.read("k", now - 60, now + 1))["m"]["prompt_tokens"] == 6

    asyncio.run(main())
