"""The response cache on a real 3-primary Redis Cluster: entries and flights spread over the primaries."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

if TYPE_CHECKING:
    from tests.redis_setups import ClusterSetup

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PROMPTS = 200


async def test_no_primary_holds_most_of_the_cache(
    config_text: str, mock: MockOpenAI, cluster_setup: ClusterSetup
) -> None:
    cluster_setup.flush()
    store = {"url": cluster_setup.url}
    # Team A has a limit: its lookups ride in the admission's round trip, the two scripts in two slots.
    limited = config_text.replace(f"key: {KEY_A},", f"key: {KEY_A}, limits: {{rpm: 100000}},")
    assert limited != config_text
    text = limited + f"store: {json.dumps(store)}\ncache: {{enabled: true, ttl_s: 60}}\n"
    app = build_app(parse(text, {}))
    async with app.lifespan(None), Client(app, KEY_A) as a, Client(app, KEY_B) as b:  # type: ignore[arg-type]

        async def ask(i: int) -> Any:
            client = a if i % 2 else b
            model = "gpt-mini" if i % 2 else "gpt-other"
            return await client.chat(
                model=model, temperature=0, messages=[{"role": "user", "content": f"p{i}"}]
            )

        first = [await ask(i) for i in range(PROMPTS)]
        await app.cache.flush()  # the fills land
        again = await asyncio.gather(*(ask(i) for i in range(PROMPTS)))
    assert [r.headers["x-cache"] for r in first] == ["miss"] * PROMPTS
    assert [r.headers["x-cache"] for r in again] == ["hit"] * PROMPTS
    assert len(mock.requests) == PROMPTS
    assert [r.headers.get("x-ratelimit-remaining-requests") is not None for r in again] == [
        i % 2 == 1 for i in range(PROMPTS)
    ]

    per_primary = []
    for node in cluster_setup.primaries():
        with node.client() as client:
            per_primary.append(sum(1 for _ in client.scan_iter(match="gw:*cache*", count=1000)))
    # Each prompt left its entry and its flight's log (still within its TTL).
    assert sum(per_primary) == 2 * PROMPTS
    assert len(per_primary) == 3 and max(per_primary) <= 0.6 * sum(per_primary), per_primary
