from __future__ import annotations

import asyncio
import itertools

from gateway.providers import Capability, Target, build_adapter
from gateway.providers.anthropic import AnthropicConfig
from gateway.providers.openai import OpenAIConfig
from gateway.routing.router import INFLIGHT, Alias, Route, Router
from gateway.store import MemoryStore
from gateway.upstream import UpstreamPool

CHAT = [Capability.chat]
POOL = UpstreamPool("http://127.0.0.1:9/v1")


def route(name: str, weight: float = 1.0, kind: type = OpenAIConfig) -> Route:
    config = kind(api_key="k", base_url="http://127.0.0.1:9")
    return Route(build_adapter(name, config, ""), POOL, Target(f"m-{name}"), weight)


def router(**aliases: Alias) -> Router:
    return Router(aliases, MemoryStore())


def test_priority_then_fallbacks_each_once() -> None:
    a, b, c = route("a"), route("b"), route("c")
    r = router(main=Alias("main", [a, b], fallbacks=["backup", "main"]), backup=Alias("backup", [c, a], fallbacks=["main"]))
    assert [x.id for x in r.plan("main", CHAT)] == ["a/m-a", "b/m-b", "c/m-c"]
    assert r.plan("nope", CHAT) == []


def test_capabilities_filter_the_plan() -> None:
    claude, gpt = route("claude", kind=AnthropicConfig), route("gpt")
    r = router(main=Alias("main", [claude], fallbacks=["gpt"]), gpt=Alias("gpt", [gpt]))
    assert r.plan("main", [Capability.embeddings]) == [gpt]
    assert r.plan("main", CHAT) == [claude, gpt]


def test_weighted_order_follows_weights() -> None:
    heavy, light = route("heavy", 9.0), route("light", 1.0)
    r = router(main=Alias("main", [light, heavy], strategy="weighted"))
    firsts = [r.plan("main", CHAT)[0] for _ in range(2000)]
    share = firsts.count(heavy) / len(firsts)
    assert 0.85 < share < 0.95  # 9 / (9 + 1)


def test_lowest_latency_measures_unmeasured_first_then_prefers_fast() -> None:
    fast, slow, new = route("fast"), route("slow"), route("new")
    fast.observe(0.010)
    for _ in range(5):
        slow.observe(0.300)
    r = router(main=Alias("main", [slow, fast, new], strategy="lowest_latency"))
    assert r.plan("main", CHAT) == [new, fast, slow]
    fast.observe(1.0)  # EWMA moves a fifth of the way
    assert 0.2 < fast.ewma_s < 0.21  # type: ignore[operator]


def test_least_inflight_counts_across_requests_and_releases() -> None:
    async def main() -> None:
        a, b = route("a"), route("b")
        r = router(main=Alias("main", [a, b], strategy="least_inflight"))
        plan, first = await r.acquire("main", [a, b])
        assert first is a and plan == [a, b]
        plan, second = await r.acquire("main", [a, b])
        assert second is b and plan == [b, a]
        await r.release(a)
        await r.release(a)  # never below zero
        assert await r.store.get(INFLIGHT + a.id) == b"0"
        _, third = await r.acquire("main", [a, b])
        assert third is a
        # Other strategies and single candidates count nothing.
        r2 = router(main=Alias("main", [a, b]))
        assert await r2.acquire("main", [a, b]) == ([a, b], None)

    asyncio.run(main())


def test_weighted_is_reproducible_with_a_given_rng() -> None:
    values = itertools.cycle([0.9, 0.1])
    a, b = route("a"), route("b")
    r = Router({"main": Alias("main", [a, b], strategy="weighted")}, MemoryStore(), rng=lambda: next(values))
    assert r.plan("main", CHAT) == [a, b]
