"""Alias -> the deployments to try, in order: the routing strategy, capabilities and fallbacks.

Strategies (per alias, `models[].strategy`):
    priority        config order
    weighted        a weighted random order (`deployments[].weight`)
    least_inflight  fewest requests in flight, counted in the store across replicas
    lowest_latency  lowest EWMA of time to the response head, as this replica measured it
A plan lists the alias's deployments by its strategy, then each `fallbacks` alias's,
without the ones that lack a needed capability. The breaker filters it as it is walked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence

from gateway.config import Limits
from gateway.limits.specs import deployment_base, specs_of
from gateway.providers import Adapter, Capability, Target
from gateway.store import LocalOps, Script, Store, StoreError
from gateway.upstream import UpstreamPool

log = logging.getLogger("gateway.router")
_EWMA_ALPHA = 0.2
NO_LIMITS = Limits()
INFLIGHT = "gw:{inflight}:"  # + deployment id: requests in flight on it, all replicas together
_INFLIGHT_TTL_MS = 600_000  # a replica that died mid-request leaks its count for at most this long


class Route:
    """One deployment of an alias: where to send it and as which model."""

    __slots__ = ("adapter", "ewma_s", "id", "pool", "quota", "target", "weight")

    def __init__(
        self,
        adapter: Adapter,
        pool: UpstreamPool,
        target: Target,
        weight: float = 1.0,
        limits: Limits = NO_LIMITS,
    ) -> None:
        self.adapter = adapter
        self.pool = pool
        self.target = target
        self.weight = weight
        self.id = f"{adapter.name}/{target.model}"
        # rpm/tpm/rpd/budget, under the deployment's own hash tag
        self.quota = specs_of(limits, deployment_base(self.id), f"deployment {self.id}", 0)
        self.ewma_s: float | None = None

    def supports(self, needed: Iterable[Capability]) -> bool:
        return all(self.adapter.config.supports(c) for c in needed)

    def observe(self, seconds: float) -> None:
        self.ewma_s = seconds if self.ewma_s is None else self.ewma_s + _EWMA_ALPHA * (seconds - self.ewma_s)


class Alias:
    """A model alias: its deployments, how to order them, and what a failed attempt may do next."""

    __slots__ = ("failover", "fallbacks", "name", "retries", "routes", "strategy")

    def __init__(
        self,
        name: str,
        routes: list[Route],
        strategy: str = "priority",
        fallbacks: Sequence[str] = (),
        *,
        retries: int = 1,
        failover: bool = True,
    ) -> None:
        self.name = name
        self.routes = routes
        self.strategy = strategy
        self.fallbacks = tuple(fallbacks)
        self.retries = retries  # extra attempts on the same deployment
        self.failover = failover  # whether a failed deployment passes the request on down the plan


def _pick_least_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    counts = [int(ops.get(k) or b"0") for k in keys]
    best = counts.index(min(counts))
    ops.incr(keys[best])
    ops.expire(keys[best], int(args[0]) / 1000)
    return best


# KEYS: the candidates' in-flight counters; ARGV: TTL ms. Takes the least loaded (first on ties).
PICK_LEAST = Script(
    "gateway.pick_least_inflight",
    lua="""
local best, low = 1, nil
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  if low == nil or n < low then best, low = i, n end
end
redis.call('INCR', KEYS[best])
redis.call('PEXPIRE', KEYS[best], ARGV[1])
return best - 1
""",
    local=_pick_least_local,
)


def _release_local(ops: LocalOps, keys: list[str], args: list[bytes]) -> int:
    value = int(ops.get(keys[0]) or b"0")
    if value > 0:
        value = ops.incr(keys[0], -1)
    return value


RELEASE = Script(
    "gateway.release_inflight",
    lua="""
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then n = redis.call('DECR', KEYS[1]) end
return n
""",
    local=_release_local,
)


class Router:
    def __init__(self, aliases: dict[str, Alias], store: Store, *, rng: Callable[[], float] = random.random):
        self.aliases = aliases
        self.store = store
        self.rng = rng

    def plan(self, alias: str, needed: Sequence[Capability]) -> list[Route]:
        """Deployments to try for `alias`, best first, fallbacks last; each at most once."""
        plan: list[Route] = []
        seen = {alias}
        chain = [alias]
        while chain:
            entry = self.aliases.get(chain.pop(0))
            if entry is None:
                continue
            plan += [r for r in self.order(entry) if r.supports(needed) and r not in plan]
            for name in entry.fallbacks:
                if name not in seen:
                    seen.add(name)
                    chain.append(name)
        return plan

    def order(self, alias: Alias) -> list[Route]:
        routes = alias.routes
        if len(routes) < 2 or alias.strategy in ("priority", "least_inflight"):
            return list(routes)
        if alias.strategy == "weighted":
            # Efraimidis-Spirakis: sorting by u^(1/w) draws a weighted order without replacement.
            return sorted(routes, key=lambda r: self.rng() ** (1 / r.weight), reverse=True)
        # lowest_latency: unmeasured deployments first, so each gets measured.
        return sorted(routes, key=lambda r: -1.0 if r.ewma_s is None else r.ewma_s)

    async def acquire(self, alias: str, candidates: list[Route]) -> tuple[list[Route], Route | None]:
        """For least_inflight: move the least loaded candidate first and count it in flight."""
        entry = self.aliases.get(alias)
        if entry is None or entry.strategy != "least_inflight" or len(candidates) < 2:
            return candidates, None
        own = [r for r in candidates if r in entry.routes]
        try:
            index = await self.store.run(PICK_LEAST, [INFLIGHT + r.id for r in own], [_INFLIGHT_TTL_MS])
        except StoreError as exc:
            log.warning("router: in-flight counts unavailable, using config order: %s", exc)
            return candidates, None
        chosen = own[int(index)]
        return [chosen, *(r for r in candidates if r is not chosen)], chosen

    async def release(self, route: Route) -> None:
        try:
            await self.store.run(RELEASE, [INFLIGHT + route.id], [])
        except StoreError as exc:
            log.warning(
                "router: in-flight count of %s not released (its TTL bounds the drift): %s", route.id, exc
            )
