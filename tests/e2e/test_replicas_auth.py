"""Two real gateway processes on one real redis-server: key changes reach both at once."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CHAT = {"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def replicas(gateway_factory: Any, mock_upstream: MockOpenAI, redis_url: str) -> tuple[GatewayProcess, ...]:
    config = default_config(mock_upstream, store_url=redis_url)
    return gateway_factory(config), gateway_factory(config)


def admin(gw: GatewayProcess) -> httpx.Client:
    return gw.http(api_key=ADMIN_KEY, timeout=10)


def chat_status(gw: GatewayProcess, secret: str) -> int:
    with gw.http(api_key=secret, timeout=10) as c:
        return c.post("/v1/chat/completions", json=CHAT).status_code


def test_key_created_on_a_works_on_b_and_revoke_on_a_stops_b(replicas: tuple[GatewayProcess, ...]) -> None:
    a, b = replicas
    with admin(a) as c:
        made = c.post("/admin/keys", json={"name": "svc", "models": ["gpt-*"]}).json()
    assert made["propagation"] == {"replicas": 2, "applied": 2}
    assert chat_status(b, made["secret"]) == 200
    with admin(a) as c:
        started = time.perf_counter()
        assert c.delete(f"/admin/keys/{made['id']}").json()["propagation"]["applied"] == 2
        revoke_ms = (time.perf_counter() - started) * 1000
    # The very next request on the other replica is refused.
    assert chat_status(b, made["secret"]) == 401
    assert chat_status(a, made["secret"]) == 401
    assert revoke_ms < 1000


def test_disable_and_policy_change_on_b_apply_on_a(replicas: tuple[GatewayProcess, ...]) -> None:
    a, b = replicas
    with admin(a) as c:
        made = c.post("/admin/keys", json={"name": "svc"}).json()
    with admin(b) as c:
        c.patch(f"/admin/keys/{made['id']}", json={"models": ["emb"]})
    assert chat_status(a, made["secret"]) == 403
    with admin(b) as c:
        c.patch(f"/admin/keys/{made['id']}", json={"enabled": False})
    assert chat_status(a, made["secret"]) == 401


def test_rotate_with_grace_across_replicas(replicas: tuple[GatewayProcess, ...]) -> None:
    a, b = replicas
    with admin(a) as c:
        made = c.post("/admin/keys", json={"name": "svc"}).json()
        new = c.post(f"/admin/keys/{made['id']}/rotate", json={"grace_s": 1}).json()["secret"]
    assert chat_status(b, made["secret"]) == 200 and chat_status(b, new) == 200
    time.sleep(1.1)
    assert chat_status(b, made["secret"]) == 401 and chat_status(b, new) == 200


def test_keys_survive_a_restart(
    gateway_factory: Any, mock_upstream: MockOpenAI, redis_url: str
) -> None:
    config = default_config(mock_upstream, store_url=redis_url)
    first = gateway_factory(config)
    with admin(first) as c:
        made = c.post("/admin/keys", json={"name": "svc"}).json()
    first.stop()
    second = gateway_factory(config)
    assert chat_status(second, made["secret"]) == 200
    with admin(second) as c:
        listed = c.get("/admin/keys").json()["data"]
    assert made["id"] in {k["id"] for k in listed}
    logs = first.log_text() + second.log_text()
    assert made["secret"] not in logs and ADMIN_KEY not in logs
