"""Settlements batched: what arrives while one is on its way to the store goes with the next.

A request's settlement (corrections to its estimates, its lease released) and the
give-backs of a refused admission are SETTLE arguments grouped by hash tag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from gateway.limits.specs import RELEASE, SETTLE
from gateway.store import Call, Store, StoreError
from gateway.tasks import Background

log = logging.getLogger("gateway.limiter")


class Batch:
    """Settlements that arrive while one is on its way to the store go together: one SETTLE per
    tag, all in one round trip (pipelined; on a cluster, in parallel per node), the corrections
    of one counter summed into one.

    Nothing waits to fill a batch: at low load each goes at once; under load the
    round trips per request fall with the queue.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: list[tuple[dict[str, list[str | int | bytes]], asyncio.Future[None]]] = []
        self._draining = False
        self._background = Background()

    async def add(self, groups: dict[str, list[str | int | bytes]]) -> None:
        """Queue SETTLE arguments by tag and wait until they were applied (or failed: logged, the
        estimates stand)."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((groups, done))
        if not self._draining:
            self._draining = True
            self._background.spawn(self._drain())
        await asyncio.shield(done)  # a cancelled request must not cancel the others' batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                calls = _merged(groups for groups, _ in batch)
                try:
                    if len(calls) == 1:
                        await self.store.run(*calls[0])
                    elif calls:
                        await self.store.run_many(calls)
                except StoreError as exc:
                    log.warning("limits of %d requests not settled (estimates stand): %s", len(batch), exc)
                for _, done in batch:
                    done.set_result(None)
        finally:
            self._draining = False


def _merged(batch: Iterable[dict[str, list[str | int | bytes]]]) -> list[Call]:
    """One SETTLE per tag: every lease released, and one correction per counter (their sum)."""
    releases: dict[str, list[str | int | bytes]] = {}
    deltas: dict[str, dict[tuple[str | int | bytes, ...], int]] = {}
    for groups in batch:
        for tag, args in groups.items():
            released, corrected = releases.setdefault(tag, []), deltas.setdefault(tag, {})
            for i in range(0, len(args), 4):
                if args[i] == RELEASE:
                    released += args[i : i + 4]
                else:
                    counter = tuple(args[i : i + 3])  # op, counter, bucket
                    corrected[counter] = corrected.get(counter, 0) + int(args[i + 3])
    calls: list[Call] = []
    for tag, released in releases.items():
        args = released + [x for counter, delta in deltas[tag].items() if delta for x in (*counter, delta)]
        if args:  # every key it touches declared, as Redis Cluster requires of a script
            keys = list(dict.fromkeys(str(args[i]) for i in range(1, len(args), 4)))
            calls.append((SETTLE, keys, args))
    return calls
