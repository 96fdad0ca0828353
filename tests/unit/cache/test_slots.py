"""On a Redis Cluster every cache script call touches one slot, and entries spread over all slots."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.auth.keys import Policy
from gateway.cache import coalesce
from gateway.cache.coalesce import HEAD, log_key
from gateway.cache.middleware import Entry, ResponseCache
from gateway.context import Lookup, RequestContext
from gateway.providers import Operation
from gateway.store import MemoryStore, Script, ScriptArg
from gateway.store.slots import SLOTS, key_slot, slot_of

pytestmark = pytest.mark.anyio

LEASE_S = 0.03  # renewed every 10 ms: each flight below lives long enough to renew once


class Recording(MemoryStore):
    """The memory store, noting each script call's KEYS (`run_many` runs through `run`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Script, list[str]]] = []

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        self.calls.append((script, list(keys)))
        return await super().run(script, keys, args)


def request(i: int, *, key_id: str, model: str, stream: bool) -> RequestContext:
    ctx = RequestContext(b"req", 0.0)
    ctx.policy = Policy(key_id, key_id, frozenset({"*"}))
    ctx.operation = Operation.chat
    ctx.model = model
    ctx.body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": f"prompt {i}"}]}
    if stream:  # without include_usage: a flight lock of its own
        ctx.body["stream"] = True
    return ctx


def requests(n: int) -> list[RequestContext]:
    """`n` distinct cacheable requests: many prompts, over several keys and models, both lock kinds."""
    return [request(i, key_id=f"key-{i % 7}", model=f"model-{i % 5}", stream=i % 3 == 0) for i in range(n)]


async def serve(cache: ResponseCache, ctx: RequestContext) -> Lookup:
    """What the middleware does with a miss: claim, lead the flight, fill, then look up again."""
    lookup = cache.plan({"headers": []}, ctx)
    assert lookup is not None and lookup.call is not None
    outcome, _, token = cache.outcome(await cache.store.run(*lookup.call), lookup.token)
    assert outcome == b"lead"
    flight = cache.lead(lookup.lock, token)
    assert key_slot(flight.log) == key_slot(lookup.key)
    flight.put(HEAD, b"application/json")
    await asyncio.sleep(LEASE_S)  # the writer renews the lease and the log (RENEW) meanwhile
    flight.finish(functools.partial(cache.put, lookup.key, Entry(b"application/json", b"{}"), 60))
    await cache.flush()
    assert (await cache.claim(lookup.key, lookup.lock))[0] == b"hit"
    return lookup


async def test_every_cache_script_call_touches_one_slot() -> None:
    async with Recording() as store:
        cache = ResponseCache(store, ttl_s=60, max_entry_bytes=1 << 20, shared=False, lease_s=LEASE_S)
        served = await asyncio.gather(*(serve(cache, ctx) for ctx in requests(60)))
        await cache.purge(model="model-1")  # new generations: new entry keys, same rules
        served.append(await serve(cache, request(1, key_id="key-1", model="model-1", stream=False)))
        # A lead given back (refused by the limits after the claim), and a flight that failed.
        given_back = cache.plan({"headers": []}, request(1000, key_id="key-0", model="model-0", stream=False))
        assert given_back is not None and given_back.call is not None
        given_back.reply = await store.run(*given_back.call)
        cache.abandon(given_back)
        failed = cache.plan({"headers": []}, request(1001, key_id="key-0", model="model-0", stream=True))
        assert failed is not None and failed.call is not None
        cache.lead(failed.lock, cache.outcome(await store.run(*failed.call), failed.token)[2]).finish(None)
        await cache.flush()
        shared = ResponseCache(store, ttl_s=60, max_entry_bytes=1 << 20, shared=True, lease_s=LEASE_S)
        served.append(await serve(shared, request(2, key_id="key-2", model="model-2", stream=True)))

    scripts = {value for value in vars(coalesce).values() if isinstance(value, Script)}
    assert {script for script, _ in store.calls} == scripts  # every cache script was called
    for script, keys in store.calls:
        assert slot_of(keys) is not None, (script, keys)  # raises ValueError across slots
    for lookup in served:
        slot = key_slot(lookup.key)
        assert key_slot(lookup.lock) == slot and key_slot(log_key(lookup.lock, "0123456789abcdef")) == slot


async def test_entries_spread_over_the_slots() -> None:
    cache = ResponseCache(MemoryStore(), ttl_s=60, max_entry_bytes=1 << 20, shared=False)
    contexts = requests(600)
    slots = [key_slot(cache.key(ctx)) for ctx in contexts]
    assert len(set(slots)) > 580  # 600 entries in 16384 slots: hardly any two share one
    for third in range(3):  # as a 3-primary cluster splits the slots
        owned = sum(third * SLOTS // 3 <= slot < (third + 1) * SLOTS // 3 for slot in slots)
        assert 150 < owned < 250
    # One prompt asked under many keys spreads too: the scope is part of the digest.
    one_prompt = {
        key_slot(cache.key(request(0, key_id=f"key-{i}", model="m", stream=False))) for i in range(50)
    }
    assert len(one_prompt) > 45
