"""`--metrics`: what the metrics cost per request, metrics on against metrics off, in the same run.

Each round starts two gateways with the suite's config (memory store, auth on, the access log as
configured by default), one with `telemetry: {metrics: {enabled: false}}`, and measures non-stream chat at 32
connections through each (in the opposite order every other round). Reported: gateway CPU per
request for both and `added` = on - off, the median of the rounds' differences, so that drift between
rounds cancels. Target (the observability issue): at most 5 µs CPU added per request.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
from pathlib import Path
from typing import Any

from bench.harness import (
    GATEWAY_CPU,
    LOAD_CPU,
    Proc,
    Target,
    chat_body,
    ensure_alive,
    failed_requests,
    free_port,
    measure,
    noise,
    noisy,
    probes,
    report,
    start_gateway,
    start_mock,
)
from bench.loadgen import chat_validator

CONCURRENCY = 32
TARGET_ADDED_US = 5.0
MODES = ("on", "off")


def gateway_config(port: int, mock_port: int, key: str, store: str, metrics: bool) -> str:
    return f"""\
server: {{host: 127.0.0.1, port: {port}}}
store: {{url: "{store}"}}
auth:
  keys: [{{name: bench, key: {key}, models: [mock-gpt]}}]
providers:
  mock: {{type: openai, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: sk-mock}}
models:
  - name: mock-gpt
    deployments: [{{provider: mock, model: mock-gpt-upstream}}]
telemetry: {{metrics: {{enabled: {str(metrics).lower()}}}}}
"""


async def run(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    body = chat_body(args.chunks)
    mock, mock_port = await start_mock(logs, procs, "mock-metrics", "--chunks", str(args.chunks))
    key = "sk-bench-" + secrets.token_hex(16)
    rounds: list[dict[str, Any]] = []
    record["metrics"] = {"concurrency": CONCURRENCY, "rounds": rounds}
    for r in range(args.rounds):
        gateways: dict[str, tuple[Target, Proc]] = {}
        for mode in MODES:
            port = free_port()
            target = Target(mode, port, key, "mock-gpt")
            gw, _ = await start_gateway(
                args,
                logs,
                procs,
                port,
                gateway_config(port, mock_port, key, args.store, mode == "on"),
                f"gateway-metrics-{mode}-r{r + 1}",
                [(target.post("/v1/chat/completions", body), chat_validator)],
            )
            gateways[mode] = (target, gw)
        rnd: dict[str, Any] = {"round": r + 1, "runs": {}}
        rounds.append(rnd)
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            target, gw = gateways[mode]
            s = await measure(target, body, chat_validator, CONCURRENCY, args, probes(mock, gw))
            rnd["runs"][mode] = s
            report(f"round {r + 1}/{args.rounds} metrics {mode:3}", s)
            ensure_alive(gw, f"metrics {mode}")
        for _, gw in gateways.values():
            gw.stop()
            procs.remove(gw)


def failed(record: dict[str, Any]) -> int:
    return failed_requests(record, "metrics")


def render(record: dict[str, Any]) -> str:
    rounds = record.get("metrics", {}).get("rounds", [])
    if not rounds:
        return ""
    args = record["args"]
    cpu = {
        mode: [rnd["runs"][mode]["cpu_ms_per_request"]["gateway"] * 1000 for rnd in rounds] for mode in MODES
    }
    added = statistics.median(on - off for on, off in zip(cpu["on"], cpu["off"], strict=True))
    rps = {mode: statistics.median(rnd["runs"][mode]["rps"] for rnd in rounds) for mode in MODES}
    verdict = "met" if added <= TARGET_ADDED_US else "**not met**"
    pcts = noise(rnd["runs"][mode] for rnd in rounds for mode in MODES)
    lines = [
        f"Metrics cost: non-stream chat at {CONCURRENCY} connections, metrics on vs off, "
        f"{len(rounds)} round(s) x ({args['warmup']:g} s warm-up + {args['duration']:g} s), medians; "
        f"`added` = on - off in the same round, median of rounds; gateway on CPU {GATEWAY_CPU}, "
        f"mock upstream + load generator on CPU {LOAD_CPU}; store `{args['store']}`",
        "",
        "| metrics | gateway CPU (µs/request) | req/s | added (µs/request) | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| off | {statistics.median(cpu['off']):.1f} | {rps['off']:,.0f} | | | |",
        f"| on | {statistics.median(cpu['on']):.1f} | {rps['on']:,.0f} | {added:+.1f} | "
        f"≤ {TARGET_ADDED_US:g} | {verdict} |",
    ]
    return "\n".join(lines + noisy(max(pcts, default=0.0)))
