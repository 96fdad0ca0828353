"""Two real gateway processes on one real redis-server share the response cache."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.conftest import ADMIN_KEY, TEAM_A_KEY, default_config
from tests.mock_openai import MockOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

BODY = {"model": "gpt-mini", "temperature": 0, "messages": [{"role": "user", "content": "shared answer"}]}


def test_answer_cached_on_a_is_a_hit_on_b_until_purged(
    gateway_factory: Any, mock_upstream: MockOpenAI, redis_url: str
) -> None:
    config = default_config(mock_upstream, store_url=redis_url)
    config["cache"] = {"enabled": True, "ttl_s": 60}
    a, b = gateway_factory(config), gateway_factory(config)
    with a.http(api_key=TEAM_A_KEY, timeout=10) as ca, b.http(api_key=TEAM_A_KEY, timeout=10) as cb:
        first = ca.post("/v1/chat/completions", json=BODY)
        assert first.headers["x-cache"] == "miss"
        for _ in range(50):  # the fill lands just after the answer
            hit = cb.post("/v1/chat/completions", json=BODY)
            if hit.headers["x-cache"] == "hit":
                break
            time.sleep(0.02)
        assert hit.headers["x-cache"] == "hit" and hit.json() == first.json()
        with a.http(api_key=ADMIN_KEY, timeout=10) as admin:
            assert admin.post("/admin/cache/purge", json={"model": "gpt-mini"}).status_code == 200
        for _ in range(50):  # B learns the new generation by pub/sub
            if cb.post("/v1/chat/completions", json=BODY).headers["x-cache"] == "miss":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("B still served the purged entry")
