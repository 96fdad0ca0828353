"""Hot reload of a real gateway process under load: SIGHUP and the admin call lose no request."""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import ADMIN_KEY, TEAM_A_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e


def test_reloads_under_load_lose_no_request(gateway_factory: Any, mock_upstream: MockOpenAI) -> None:
    config = default_config(mock_upstream)
    gw: GatewayProcess = gateway_factory(config)
    mock_upstream.behave(delay_head=0.05)
    stop = threading.Event()

    def client() -> list[int]:
        statuses = []
        with gw.http(api_key=TEAM_A_KEY, timeout=10) as c:
            while not stop.is_set() and len(statuses) < 200:
                body = {"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]}
                statuses.append(c.post("/v1/chat/completions", json=body).status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        for round_ in range(3):
            time.sleep(0.3)
            config["router"]["timeouts"]["first_byte_s"] = 3 + round_  # a change that rebuilds the pools
            gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            if round_ % 2:
                with gw.http(api_key=ADMIN_KEY, timeout=10) as admin:
                    assert admin.post("/admin/reload").json() == {"reloaded": True}
            else:
                gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        stop.set()
        statuses = [s for f in futures for s in f.result()]
    assert len(statuses) > 20 and set(statuses) == {200}
    assert gw.log_text().count("config reloaded") == 3


def test_bad_reload_keeps_serving(gateway_factory: Any, mock_upstream: MockOpenAI) -> None:
    gw: GatewayProcess = gateway_factory(default_config(mock_upstream))
    gw.config_path.write_text("models: [{name: x, deployments: [{provider: nope, model: m}]}]\n")
    gw.proc.send_signal(signal.SIGHUP)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(50):
            if "config reload refused" in gw.log_text():
                break
            time.sleep(0.05)
        r = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEAM_A_KEY}"},
                   json={"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]})
    assert "unknown provider 'nope'" in gw.log_text() and r.status_code == 200


@pytest.mark.redis
def test_admin_reload_reaches_every_replica(gateway_factory: Any, mock_upstream: MockOpenAI, redis_url: str) -> None:
    config = default_config(mock_upstream, store_url=redis_url)
    a: GatewayProcess = gateway_factory(config)
    b: GatewayProcess = gateway_factory(config)
    config["models"].append({"name": "gpt-new", "deployments": [{"provider": "mock", "model": "mock-gpt-upstream"}]})
    config["auth"]["keys"][0]["models"].append("gpt-new")
    for gw in (a, b):
        gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with a.http(api_key=ADMIN_KEY, timeout=10) as admin:
        assert admin.post("/admin/reload").json() == {"reloaded": True}
    body = {"model": "gpt-new", "messages": [{"role": "user", "content": "x"}]}
    with b.http(api_key=TEAM_A_KEY, timeout=10) as c:
        for _ in range(50):
            if c.post("/v1/chat/completions", json=body).status_code == 200:
                break
            time.sleep(0.05)
        assert c.post("/v1/chat/completions", json=body).status_code == 200
