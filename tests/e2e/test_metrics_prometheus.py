"""A real Prometheus (Debian's package) scrapes a real gateway: the exposition parses, and the
README's PromQL gives the numbers the requests made."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import debian_executable, free_port
from tests.e2e.conftest import TEAM_A_KEY, TEAM_B_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e

WAIT_S = 30.0
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "gateway-dashboard.json"
HIT_RATIO = 'sum(gateway_cache_lookups_total{result=~"hit|coalesced"}) / sum(gateway_cache_lookups_total{result!="bypass"})'


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    executable = debian_executable("prometheus", "prometheus")
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start(*target_ports: int) -> str:
        config = tmp_path / "prometheus.yml"
        targets = ", ".join(f"'127.0.0.1:{p}'" for p in target_ports)
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"  - {{job_name: gateway, static_configs: [{{targets: [{targets}]}}]}}\n"
        )
        with (tmp_path / "prometheus.log").open("wb") as log:  # the child keeps its own descriptor
            processes.append(
                subprocess.Popen(
                    [
                        executable,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    log_path = tmp_path / "prometheus.log"
    if log_path.exists():
        print(log_path.read_text(errors="replace")[-3000:])


def query(base: str, promql: str) -> float | None:
    try:
        r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return None  # not listening yet
    result = r.json()["data"]["result"] if r.status_code == 200 else []
    return float(result[0]["value"][1]) if result else None


def wait_for(base: str, promql: str, expected: float) -> float | None:
    deadline = time.monotonic() + WAIT_S
    seen = query(base, promql)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.25)
        seen = query(base, promql)
    return seen


def chat(gw: GatewayProcess, **extra: Any) -> httpx.Response:
    with gw.http(api_key=TEAM_A_KEY) as c:
        body = {"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
        return c.post("/v1/chat/completions", json=body)


def test_prometheus_scrapes_the_gateway(
    gateway_factory: Any, mock_upstream: MockOpenAI, prometheus: Any
) -> None:
    config = default_config(mock_upstream)
    config["cache"] = {"enabled": True}
    gw = gateway_factory(config)
    assert chat(gw, temperature=0).headers["x-cache"] == "miss"
    time.sleep(0.3)  # the fill lands after the answer
    assert chat(gw, temperature=0).headers["x-cache"] == "hit"
    for _ in range(2):
        assert chat(gw).headers["x-cache"] == "bypass"
    with gw.http(api_key="sk-not-a-key-000000000000") as c:
        assert c.post("/v1/chat/completions", json={"model": "gpt-mini", "messages": []}).status_code == 401

    base = prometheus(gw.port)
    assert wait_for(base, 'up{job="gateway"}', 1.0) == 1.0
    targets = httpx.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    assert [t["lastError"] for t in targets] == [""]  # Prometheus parsed the exposition
    assert wait_for(base, 'sum(gateway_requests_total{status_class="2xx", key="team-a"})', 4.0) == 4.0
    assert query(base, 'sum(gateway_requests_total{status_class="4xx"})') == 1.0
    assert query(base, HIT_RATIO) == 0.5
    assert (
        query(
            base,
            'sum(gen_ai_client_token_usage_count{gen_ai_provider_name="openai", gen_ai_token_type="input"})',
        )
        == 3.0
    )
    p99 = query(base, "histogram_quantile(0.99, sum by (le) (gateway_request_duration_seconds_bucket))")
    assert p99 is not None and 0 < p99 <= 81.92
    assert query(base, "gateway_store_up") == 1.0


def dashboard_queries() -> list[str]:
    return [e for panel in dashboard_panels().values() for e in panel]


def dashboard_panels() -> dict[str, list[str]]:
    """Each panel's queries, Grafana's variables filled in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: [
            t["expr"].replace("$__rate_interval", "1m").replace("$alias", ".*") for t in panel["targets"]
        ]
        for panel in dashboard["panels"]
    }


def as_counts(promql: str) -> str:
    """A dashboard query over the counters themselves: what its rates add up to since the start."""
    return re.sub(r"rate\((.+?)\[1m\]\)", r"\1", promql)


def vector(base: str, promql: str) -> dict[str, float]:
    """A query's result, keyed by its labels' values joined (one series: the empty key)."""
    r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5).json()
    return {",".join(x["metric"].values()): float(x["value"][1]) for x in r["data"]["result"]}


def test_two_replicas_on_redis_one_with_two_workers_as_the_dashboard_sees_them(
    gateway_factory: Any, mock_upstream: MockOpenAI, prometheus: Any, redis_url: str
) -> None:
    """The issue's live proof: the dashboard's key queries give what the SDK's traffic implies."""
    config = default_config(mock_upstream, store_url=redis_url)
    config["cache"] = {"enabled": True}
    config["auth"]["keys"][0]["models"].append("gpt-failover")
    config["auth"]["keys"][1]["limits"] = {"rpm": 1}  # team-b: its second request is a 429
    config["models"].append(
        {
            "name": "gpt-failover",
            "deployments": [
                {"provider": "dead", "model": "dead-model"},
                {"provider": "mock", "model": "mock-gpt-upstream"},
            ],
        }
    )
    config["breaker"] = {"failures": 1, "cooldown_s": 300, "max_cooldown_s": 300}  # one failure opens it
    config["telemetry"] = {"metrics": {"share_interval_s": 0.1}}
    one = gateway_factory(config)
    two = gateway_factory(config, args=("--workers", "2"))
    a1, a2, b2 = one.client(), two.client(), two.client(TEAM_B_KEY)
    ask = [{"role": "user", "content": "cache me, prometheus"}]
    assert (
        a1.chat.completions.with_raw_response.create(model="gpt-mini", messages=ask, temperature=0).headers[
            "x-cache"
        ]
        == "miss"
    )
    time.sleep(0.3)  # the fill lands after the answer
    hit = a2.chat.completions.with_raw_response.create(model="gpt-mini", messages=ask, temperature=0)
    assert hit.headers["x-cache"] == "hit"  # the other replica's entry, in the shared Redis
    stream = a2.chat.completions.create(
        model="gpt-mini", messages=[{"role": "user", "content": "s"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    failover = a1.chat.completions.with_raw_response.create(model="gpt-failover", messages=ask)
    assert failover.headers["x-gateway-deployment"] == "mock/mock-gpt-upstream"
    assert b2.chat.completions.create(model="gpt-mini", messages=ask).choices
    with pytest.raises(openai.RateLimitError):
        b2.chat.completions.create(model="gpt-mini", messages=ask)

    base = prometheus(one.port, two.port)
    assert wait_for(base, 'sum(up{job="gateway"})', 2.0) == 2.0
    panels = {title: [as_counts(q) for q in queries] for title, queries in dashboard_panels().items()}
    expected_by_status = {"2xx": 5.0, "4xx": 1.0}
    deadline = time.monotonic() + WAIT_S
    while (
        vector(base, panels["Requests by status class"][0]) != expected_by_status
        and time.monotonic() < deadline
    ):
        time.sleep(0.25)  # the second replica's workers share their counts every 0.1 s
    assert vector(base, panels["Requests by status class"][0]) == expected_by_status
    assert vector(base, panels["Requests by key"][0]) == {"team-a": 4.0, "team-b": 2.0}
    assert vector(base, panels["Cache hit ratio"][0]) == {"": 0.5}  # one hit, one miss, the rest bypass
    assert vector(base, panels["Limit refusals by kind"][0]) == {"rpm": 1.0}
    assert vector(base, panels["Upstream retries and failovers by reason"][0]) == {"failover,error": 1.0}
    tokens = vector(base, panels["Tokens per second by key and model"][0])
    assert (
        set(tokens) == {"gpt-mini,team-a", "gpt-failover,team-a", "gpt-mini,team-b"}
        and min(tokens.values()) > 0
    )
    breakers = vector(base, panels["Open breakers"][0])  # every deployment, 0 unless open or half open
    assert {d: v for d, v in breakers.items() if v} == {"dead/dead-model": 1.0}  # both replicas, counted once
    assert vector(base, panels["Store: up, round trip p99, errors/s"][0]) == {"": 1.0}


def test_every_dashboard_query_runs_on_metrics_the_gateway_exposes(
    gateway_factory: Any, mock_upstream: MockOpenAI, prometheus: Any
) -> None:
    gw = gateway_factory(default_config(mock_upstream))
    assert chat(gw).status_code == 200
    exposed = httpx.get(gw.url + "/metrics", timeout=10).text
    base = prometheus(gw.port)
    assert wait_for(base, 'up{job="gateway"}', 1.0) == 1.0
    queries = dashboard_queries()
    assert len(queries) >= 13
    for promql in queries:
        for name in re.findall(r"\b(?:gateway|gen_ai)_[a-z_]+", promql):
            family = re.sub(r"_(bucket|count|sum)$", "", name)  # a histogram's samples
            assert f"# TYPE {family} " in exposed, f"{name} (dashboard) is not a metric the gateway exposes"
        r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "success", (promql, r.text)
