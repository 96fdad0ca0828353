"""Per-key rate limits through the whole app."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(config_text: str) -> Any:
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",", "{name: team-a, key: " + KEY_A + ", limits: {rpm: 3, tpm: 100000},"
    ).replace("{name: team-b, key: " + KEY_B + ",", "{name: team-b, key: " + KEY_B + ", limits: {tpm: 400},")
    app = build_app(parse(text + "cache: {enabled: true}\n", {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


async def test_rpm_counts_down_then_429_with_retry_after(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw) as c:
        remaining = []
        for _ in range(3):
            r = await c.chat()
            assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert remaining == ["2", "1", "0"]
        r = await c.chat()
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "requests per minute (rpm)" in err["message"]
    assert len(mock.requests) == 3  # the refused request never reached upstream


async def test_tokens_are_reconciled_and_cache_hits_cost_none(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, KEY_B) as c:
        first = await c.chat(max_tokens=100, temperature=0)
        await gw.cache.flush()
        # Charged an estimate (~100), then corrected to the answer's real usage (a handful).
        second = await c.chat(max_tokens=100, temperature=0)
        assert second.headers["x-cache"] == "hit"
        third = await c.chat(max_tokens=100, temperature=0)
    left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in (first, second, third)]
    assert left[0] < 400 - 100
    assert left[1] > left[0] - 100 and left[2] > left[0] - 100  # the first was reconciled down
    assert left[2] == left[1]  # the hit's estimate was returned


async def test_over_the_token_limit_is_refused_before_upstream(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, KEY_B) as c:
        r = await c.chat(max_tokens=1000)
    assert r.status_code == 429 and "tokens per minute (tpm)" in r.json()["error"]["message"]
    assert mock.requests == []


async def test_keys_without_limits_get_no_headers(config_text: str) -> None:
    app = build_app(parse(config_text, {}))
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        r = await c.chat()
    assert r.status_code == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)
