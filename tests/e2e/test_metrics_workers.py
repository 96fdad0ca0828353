"""`gateway serve --workers 2`: one scrape reports the sum over both workers, and a worker's death
takes nothing back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import TEAM_A_KEY, GatewayProcess, default_config, free_port
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e

REQUESTS = 30


def scrape(url: str) -> dict[str, float]:
    """name -> value, summed over label sets, from a fresh connection (any worker may take it)."""
    text = httpx.get(url, timeout=10, headers={"connection": "close"}).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def chat_on_new_connections(gw: GatewayProcess, count: int) -> None:
    for _ in range(count):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {TEAM_A_KEY}", "connection": "close"},
            json={"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert r.status_code == 200


def workers_of(gw: GatewayProcess) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == gw.proc.pid and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def wait_for(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_scrape_sums_the_workers_and_survives_one_dying(gateway_factory: Any, mock_upstream: MockOpenAI) -> None:
    config = default_config(mock_upstream)
    config["telemetry"] = {"metrics": {"share_interval_s": 0.1, "port": free_port()}}
    gw = gateway_factory(config, args=("--workers", "2"))
    metrics_url = f"http://127.0.0.1:{config['telemetry']['metrics']['port']}/metrics"
    assert wait_for(lambda: len(workers_of(gw)) == 2)
    chat_on_new_connections(gw, REQUESTS)

    def settled() -> bool:
        seen = scrape(metrics_url)
        return seen["gateway_workers"] == 2 and seen["gateway_requests_total"] == REQUESTS

    assert wait_for(settled)
    for _ in range(6):  # whichever worker takes the scrape, the same sums
        seen = scrape(metrics_url)
        assert seen["gateway_requests_total"] == REQUESTS and seen["gateway_workers"] == 2
        assert seen["gen_ai_client_token_usage_count"] == 2 * REQUESTS  # input and output per answer
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 404  # served on its own port only

    victim = workers_of(gw)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(workers_of(gw)) == 2 and victim not in workers_of(gw))  # uvicorn replaced it
    for _ in range(6):
        assert scrape(metrics_url)["gateway_requests_total"] == REQUESTS  # the dead worker's counts stay
    chat_on_new_connections(gw, 4)
    assert wait_for(lambda: scrape(metrics_url)["gateway_requests_total"] == REQUESTS + 4)
    assert wait_for(lambda: scrape(metrics_url)["gateway_workers"] == 2)
