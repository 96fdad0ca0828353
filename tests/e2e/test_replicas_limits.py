"""Two real gateway processes on one real redis-server: a key's rpm is exact across them."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from tests.e2e.conftest import TEAM_A_KEY, default_config
from tests.mock_openai import MockOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def test_rpm_admits_exactly_the_limit_over_two_replicas(
    gateway_factory: Any, mock_upstream: MockOpenAI, redis_url: str
) -> None:
    config = default_config(mock_upstream, store_url=redis_url)
    config["auth"]["keys"][0]["limits"] = {"rpm": 10}
    replicas = gateway_factory(config), gateway_factory(config)
    body = {"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]}

    def one(i: int) -> int:
        with replicas[i % 2].http(api_key=TEAM_A_KEY, timeout=10) as c:
            return c.post("/v1/chat/completions", json=body).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(30)))
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(mock_upstream.requests) == 10  # refused requests never reached upstream
