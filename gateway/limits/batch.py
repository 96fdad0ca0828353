"""Settlements batched: what arrives while one is on its way to the store goes with the next.

A request's settlement (corrections to its estimates, its lease released) and the
give-backs of a refused admission are SETTLE arguments grouped by hash tag.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.limits.specs import SETTLE
from gateway.store import Call, Store, StoreError
from gateway.tasks import Background

log = logging.getLogger("gateway.limiter")


class Batch:
    """Settlements that arrive while one is on its way to the store go together: one SETTLE per
    tag, all in one round trip (pipelined; on a cluster, in parallel per node).

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
                merged: dict[str, list[str | int | bytes]] = {}
                for groups, _ in batch:
                    for tag, args in groups.items():
                        merged.setdefault(tag, []).extend(args)
                calls: list[Call] = [(SETTLE, [tag], args) for tag, args in merged.items()]
                try:
                    await (self.store.run(*calls[0]) if len(calls) == 1 else self.store.run_many(calls))
                except StoreError as exc:
                    log.warning("limits of %d requests not settled (estimates stand): %s", len(batch), exc)
                for _, done in batch:
                    done.set_result(None)
        finally:
            self._draining = False
