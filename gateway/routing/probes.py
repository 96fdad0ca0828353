"""Active health probes: a cheap call to each deployment whose breaker is open or half-open.

A provider that answers closes the breaker on every replica before the cooldown
would have let a client request probe it, so traffic returns sooner, and no
client request is spent finding out. Off unless `router.probe_interval_s` is set.
httpx is fine here: this is off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import httpx

from gateway.routing.breaker import Breakers
from gateway.routing.router import Route

log = logging.getLogger("gateway.probes")


class Prober:
    def __init__(
        self, routes: Iterable[Route], breakers: Breakers, interval_s: float, timeout_s: float
    ) -> None:
        self.routes = {r.id: r for r in routes}
        self.breakers = breakers
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway.probes")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            while True:
                await asyncio.sleep(self.interval_s)
                await self.probe_all(client)

    async def probe_all(self, client: httpx.AsyncClient) -> None:
        down = [r for r in self.routes.values() if self.breakers.state(r.id) != "closed"]
        await asyncio.gather(*(self.probe(client, route) for route in down))

    async def probe(self, client: httpx.AsyncClient, route: Route) -> None:
        adapter = route.adapter
        key = adapter.keys.current
        if key is None:
            return  # every key refused: the answer is known without asking
        headers = [(k.decode(), v.decode()) for k, v in key.headers]
        try:
            response = await client.get(adapter.probe_url(), headers=headers)
        except httpx.HTTPError as exc:
            log.info("probe of %s failed: %s", route.id, exc.__class__.__name__)
            return
        if response.is_success:
            log.warning("probe of %s succeeded: closing its breaker", route.id)
            await self.breakers.reset(route.id)
        else:
            log.info("probe of %s answered %d", route.id, response.status_code)
