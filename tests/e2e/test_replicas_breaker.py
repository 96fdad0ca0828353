"""Two real gateway processes on one real redis-server, or on a Redis Cluster, share each deployment's breaker."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import TEAM_A_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

COOLDOWN_S = 1.0


@pytest.fixture
def replicas(
    gateway_factory: Any, mock_upstream: MockOpenAI, shared_store_url: str
) -> tuple[GatewayProcess, ...]:
    config = default_config(mock_upstream, store_url=shared_store_url)
    config["breaker"] = {"failures": 3, "window_s": 10, "cooldown_s": COOLDOWN_S, "max_cooldown_s": 4}
    config["router"]["retries"] = 0
    return gateway_factory(config), gateway_factory(config)


def chat(gw: GatewayProcess) -> httpx.Response:
    with gw.http(api_key=TEAM_A_KEY, timeout=10) as c:
        return c.post("/v1/chat/completions", json={"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]})


def test_open_on_one_replica_is_open_on_both_and_exactly_one_probe(
    replicas: tuple[GatewayProcess, ...], mock_upstream: MockOpenAI
) -> None:
    a, b = replicas
    mock_upstream.behave(status=500)
    for _ in range(3):
        assert chat(a).status_code == 500
    time.sleep(0.3)  # the failures reach the store after the answers (off the critical path)
    mock_upstream.reset()
    # Replica B never saw a failure, yet its next request is refused without reaching the upstream.
    r = chat(b)
    assert r.status_code == 503 and r.json()["error"]["code"] == "deployments_unavailable"
    assert mock_upstream.requests == []
    # After the cooldown, 20 concurrent requests over both replicas let exactly one probe through.
    time.sleep(COOLDOWN_S + 0.1)
    # The probe still runs while the others arrive, on a busy machine too (and within first_byte_s).
    mock_upstream.behave(delay_head=1.5)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda i: chat((a, b)[i % 2]).status_code, range(20)))
    assert len(mock_upstream.requests) == 1
    assert statuses.count(200) == 1 and statuses.count(503) == 19
    time.sleep(0.3)
    assert chat(a).status_code == 200 and chat(b).status_code == 200  # recovered everywhere
