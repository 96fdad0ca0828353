"""What a scrape reads: this process's counts, the gauges read now, and the other workers' shares.

`MetricsService` lives as long as the process (reloads keep it). Its lifespan
shares this worker's state with the others (`workers.py`) and, with
`metrics.port`, serves GET /metrics on that port (`server.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.routing.breaker import Breakers
from gateway.routing.router import Alias
from gateway.store import Store, StoreError
from gateway.telemetry.exposition import (
    BREAKER,
    BREAKER_STATES,
    CONNECTIONS,
    INFLIGHT,
    PROVIDER_KEYS,
    STORE_UP,
    STREAMS,
    WORKERS,
    MetricsEndpoint,
)
from gateway.telemetry.metrics import PROVIDER_NAMES, TRANSITIONS, Counts, Deployment, Metrics
from gateway.telemetry.server import serve
from gateway.telemetry.settings import MetricsSettings
from gateway.telemetry.workers import Gauges, WorkerShare
from gateway.upstream import UpstreamPool

log = logging.getLogger("gateway.metrics")

_PING_S = 0.5  # a scrape during a store outage answers after this, with gateway_store_up 0


class Source(Protocol):
    """The parts of the current config's snapshot (gateway.app.Snapshot) a scrape reads."""

    store: Store
    breakers: Breakers
    pools: dict[str, UpstreamPool]
    routes: dict[str, Alias]


class MetricsService:
    def __init__(self, metrics: Metrics, source: Callable[[], Source], directory: str | None = None) -> None:
        self.metrics = metrics
        self.source = source
        self.share = WorkerShare(directory) if directory else None
        self._task: asyncio.Task[None] | None = None
        self._server: asyncio.AbstractServer | None = None

    def attach(
        self,
        settings: MetricsSettings,
        store: Store,
        breakers: Breakers,
        routes: Mapping[str, Alias],
        prices: Mapping[str, tuple[float, float]],
    ) -> Metrics | None:
        """Point a new config's store and breakers at the counts; the recorder, or None when off."""
        if not settings.enabled:
            return None
        # The counts outlive this config's store and breakers, so a reload never takes them back.
        store.stats = self.metrics.counts.store
        breakers.transitions = self.metrics.counts.counters[TRANSITIONS.name]
        self.metrics.configure(
            key_names=settings.key_names,
            max_key_names=settings.max_key_names,
            aliases=routes,
            deployments=deployments(routes),
            prices=prices,
        )
        return self.metrics

    async def start(self, settings: MetricsSettings, host: str, admin_key: Callable[[], str | None]) -> None:
        if self.share is not None:
            self.share.open()
            self._task = asyncio.create_task(self._share_every(settings.share_interval_s))
        if settings.port is not None:
            endpoint = MetricsEndpoint(self.collect, admin_key)
            self._server = await serve(endpoint, settings.host or host, settings.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.share is not None:
            self.share.write(self.metrics.counts, self.summed())  # the last counts of this worker
            self.share.close()

    async def _share_every(self, interval_s: float) -> None:
        assert self.share is not None
        while True:
            self.share.write(self.metrics.counts, self.summed())
            await asyncio.sleep(interval_s)

    def summed(self) -> Gauges:
        """This worker's gauges that add up over workers."""
        inflight = self.metrics.inflight
        streams = 0
        for scope in list(inflight.values()):
            ctx = scope.get("gateway")
            if ctx is not None and ctx.responded and ctx.streamed is None and ctx.body.get("stream") is True:
                streams += 1
        connections: dict[tuple[str, ...], float] = {}
        for provider, pool in self.source().pools.items():
            connections[(provider, "in_use")] = pool.in_use
            connections[(provider, "idle")] = pool.idle
        return {
            INFLIGHT.name: {(): len(inflight)},
            STREAMS.name: {(): streams},
            CONNECTIONS.name: connections,
        }

    async def collect(self) -> tuple[Counts, Gauges, Mapping[str, Deployment]]:
        """Everything one scrape reports: the sum over this replica's workers."""
        source = self.source()
        gauges = self.summed()
        counts = self.metrics.counts
        workers = 1
        if self.share is not None:
            # Ours first, as reported here: a later scrape answered by another worker then sees at
            # least these counts of ours, so no counter goes back between two scrapes.
            self.share.write(counts, gauges)
            others, shared, alive = self.share.others()
            counts = _sum(counts, others)
            workers += alive
            for name, series in shared.items():
                mine = gauges.setdefault(name, {})
                for labels, value in series.items():
                    mine[labels] = mine.get(labels, 0.0) + value
        # The breaker's state is shared by every process: this worker's copy is the replica's.
        deployments = {route.id for alias in source.routes.values() for route in alias.routes}
        gauges[BREAKER.name] = {
            (d, s): float(source.breakers.state(d) == s) for d in sorted(deployments) for s in BREAKER_STATES
        }
        # Keys are retired per worker: this one's view, as with the breakers.
        keys: dict[tuple[str, ...], float] = {}
        for ring in {route.adapter.keys for alias in source.routes.values() for route in alias.routes}:
            if ring.secrets:
                keys[(ring.provider, "usable")] = len(ring.usable)
                keys[(ring.provider, "retired")] = len(ring.keys) - len(ring.usable)
        gauges[PROVIDER_KEYS.name] = keys
        gauges[STORE_UP.name] = {(): float(await _store_up(source.store))}
        gauges[WORKERS.name] = {(): workers}
        return counts, gauges, self.metrics.deployments


def _sum(mine: Counts, others: Counts) -> Counts:
    total = Counts()
    total.add(mine)
    total.add(others)
    return total


async def _store_up(store: Store) -> bool:
    try:
        await asyncio.wait_for(store.ping(), _PING_S)
    except (StoreError, TimeoutError) as exc:
        log.debug("metrics: store ping failed: %r", exc)
        return False
    return True


def deployments(routes: Mapping[str, Alias]) -> dict[str, Deployment]:
    """Deployment id -> gen_ai.provider.name and the upstream model, for the GenAI labels."""
    table = {}
    for alias in routes.values():
        for route in alias.routes:
            kind: str = route.adapter.config.__struct_config__.tag  # type: ignore[assignment]
            table[route.id] = Deployment(PROVIDER_NAMES.get(kind, kind), route.target.model)
    return table
