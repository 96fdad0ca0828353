"""Usage and cost per key and model: counted after each answer, kept in the store by the hour.

The answer is relayed untouched; its token counts are found by `find_usage` in
`gateway.providers.base` (two regex searches, no parse); a stream translator's own
count (see `UsageFilter` and the Anthropic and Cohere translators) comes first, so a
stream is counted whether or not its client asked for `include_usage`. Counts gather in memory and
go to the store once a second per replica, off every request's path; a replica
that dies loses at most that second. A stream that reports no usage (cut short,
or from a provider with `stream_usage` off) is counted as a request with 0 tokens.

Store schema: `gw:{usage:<key id>}:<UTC day>` a hash of `<hour>|<alias>|<field>` -> count,
fields `requests`, `prompt_tokens`, `completion_tokens`, `cost_nusd` (USD x 1e9), kept 400 days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping

from gateway.store import Store, StoreError

log = logging.getLogger("gateway.usage")

_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_nusd")
_KEEP_S = 400 * 86400
_FLUSH_S = 1.0


def day_key(key_id: str, day: int) -> str:
    return f"gw:{{usage:{key_id}}}:{day}"


class UsageRecorder:
    def __init__(self, store: Store, prices: Mapping[str, tuple[float, float]]) -> None:
        self.store = store
        self.prices = prices  # alias -> (USD per million prompt tokens, per million completion tokens)
        self._pending: defaultdict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._task: asyncio.Task[None] | None = None

    def add(self, key_id: str, alias: str, usage: tuple[int, int] | None) -> None:
        prompt, completion = usage or (0, 0)
        hour = int(time.time()) // 3600
        counts = self._pending[(key_id, alias, hour)]
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        price_in, price_out = self.prices.get(alias, (0.0, 0.0))
        counts[3] += round((prompt * price_in + completion * price_out) * 1000)  # nano-USD

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway.usage")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0])
        by_day: defaultdict[tuple[str, int], dict[str, int]] = defaultdict(dict)
        for (key_id, alias, hour), counts in pending.items():
            fields = by_day[(key_id, hour // 24)]
            for name, value in zip(_FIELDS, counts, strict=True):
                if value:
                    fields[f"{hour}|{alias}|{name}"] = value
        for (key_id, day), fields in by_day.items():
            try:
                await self.store.hincrby(day_key(key_id, day), fields, ttl_s=_KEEP_S)
            except StoreError as exc:
                log.error("usage of %s not stored (kept for the next flush): %s", key_id, exc)
                for field, value in fields.items():
                    hour, alias, name = field.split("|")
                    self._pending[(key_id, alias, int(hour))][_FIELDS.index(name)] += value

    async def read(self, key_id: str, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per alias: requests, tokens and cost of `key_id` in the hours overlapping [start, end)."""
        first, last = int(start) // 3600, int(end - 1) // 3600
        totals: defaultdict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_FIELDS, 0))
        for day in range(first // 24, last // 24 + 1):
            for field, value in (await self.store.hgetall(day_key(key_id, day))).items():
                hour, alias, name = field.split("|")
                if first <= int(hour) <= last:
                    totals[alias][name] += int(value)
        return {
            alias: {
                "requests": t["requests"],
                "prompt_tokens": t["prompt_tokens"],
                "completion_tokens": t["completion_tokens"],
                "total_tokens": t["prompt_tokens"] + t["completion_tokens"],
                "cost_usd": round(t["cost_nusd"] / 1e9, 9),
            }
            for alias, t in sorted(totals.items())
        }
