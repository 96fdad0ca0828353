"""`--failover`: one of two deployments fails for 10 s under steady load.

Two mock upstreams (bench/mock_upstream.py --record) and one alias with a deployment on each,
strategy `priority` (the first takes all the traffic while it is healthy), breaker {failures: 5,
window_s: 10, cooldown_s: 2}, router.retries 0 (failover on), active probes every 0.5 s (the cooldown doubles
after each failed probe, so the probes are what bring traffic back soon after recovery). A closed
loop of non-stream chats at 8 connections runs 25 s against a fresh gateway per mode; 5 s in, the
first mock fails for 10 s:
  503     it answers 503 to every request
  refuse  it closes its listening socket and every open connection
Reported per mode: failed client requests, overall and during the outage (target < 1%); the time
from the first mock's recovery to the first answer it served, both from its own clock (target
≤ cooldown_s + 1 s); the breaker's cooldown in force at that moment (it doubles after each failed
probe; polled from /health/providers); the share each deployment answered (x-gateway-deployment)
before, during the outage, after it until the first deployment is back, and after that.
Request times are CLOCK_MONOTONIC in the harness and in the mocks alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import httptools
import orjson

from bench.harness import (
    GATEWAY_CPU,
    HOST,
    LOAD_CPU,
    REQUEST_TIMEOUT_S,
    BenchError,
    Proc,
    Target,
    chat_body,
    ensure_alive,
    free_port,
    progress,
    start_gateway,
    start_mock,
)
from bench.loadgen import TraceEntry, build_request, chat_validator, fetch, run_load

MODES = ("503", "refuse")
BEFORE_S, OUTAGE_S, AFTER_S = 5.0, 10.0, 10.0
CONCURRENCY = 8
# retries 0: a failed attempt on `primary` fails over to `secondary` at once (router.failover).
FAILURES, WINDOW_S, COOLDOWN_S, RETRIES, PROBE_S = 5, 10, 2, 0, 0.5
TARGET_FAILED_PCT = 1.0  # during the outage, less than this
TARGET_BACK_S = COOLDOWN_S + 1.0
DEPLOYMENTS = ("primary", "secondary")  # provider names; the ids are "<provider>/<model>"
MODEL = "mock-gpt-upstream"
PHASES = ("before", "outage", "recovering", "after")  # recovering: up again, not yet answering
POLL_S = 0.1


def gateway_config(port: int, mock_ports: list[int], key: str, store: str) -> str:
    providers = "".join(
        f'  {name}: {{type: openai, base_url: "http://{HOST}:{p}/v1", api_key: sk-mock}}\n'
        for name, p in zip(DEPLOYMENTS, mock_ports, strict=True)
    )
    deployments = ", ".join(f"{{provider: {name}, model: {MODEL}}}" for name in DEPLOYMENTS)
    return f"""\
server: {{host: {HOST}, port: {port}}}
store: {{url: "{store}"}}
auth:
  keys: [{{name: bench, key: {key}, models: [failover]}}]
providers:
{providers}models:
  - {{name: failover, strategy: priority, deployments: [{deployments}]}}
breaker: {{failures: {FAILURES}, window_s: {WINDOW_S}, cooldown_s: {COOLDOWN_S}}}
router: {{retries: {RETRIES}, probe_interval_s: {PROBE_S}}}
"""


async def control(port: int, request: bytes) -> Any:
    status, body = await fetch(HOST, port, request, REQUEST_TIMEOUT_S)
    if status != 200:
        raise BenchError(
            f"mock on port {port}: {request.split(b' ', 2)[1].decode()} answered {status}: {body!r}"
        )
    return orjson.loads(body)


async def watch_breaker(port: int, deployment: str, out: list[dict[str, Any]]) -> None:
    """Appends each change of the deployment's breaker (state, cooldown) with its time; until cancelled."""
    request = build_request("GET", HOST, port, "/health/providers", {})
    last = None
    while True:
        with contextlib.suppress(OSError, TimeoutError, httptools.HttpParserError, KeyError, ValueError):
            _, body = await fetch(HOST, port, request, 2.0)
            info = orjson.loads(body)["deployments"][deployment]
            if (info["state"], info["cooldown_s"]) != last:
                last = (info["state"], info["cooldown_s"])
                out.append({"t": time.perf_counter(), "state": last[0], "cooldown_s": last[1]})
        await asyncio.sleep(POLL_S)


def analyse(
    trace: list[TraceEntry], outage: dict[str, Any], served: list[float], breaker: list[dict[str, Any]]
) -> dict[str, Any]:
    down, up = outage["down"], outage["up"]
    back = min((t for t in served if t >= up), default=None)  # the first mock's first answer since
    never = float("inf")
    bounds = {"before": down, "outage": up, "recovering": never if back is None else back, "after": never}
    start = min((t for t, _, _ in trace), default=0) / 1e9
    end = max((t for t, _, _ in trace), default=0) / 1e9
    phases: dict[str, dict[str, Any]] = {
        p: {"requests": 0, "failed": 0, "errors": {}, "by_deployment": {}} for p in PHASES
    }
    for t_ns, kind, deployment in trace:
        t = t_ns / 1e9
        phase = phases[next(p for p in PHASES if t < bounds[p])]
        phase["requests"] += 1
        if kind is None:
            phase["by_deployment"][deployment] = phase["by_deployment"].get(deployment, 0) + 1
        else:
            phase["failed"] += 1
            phase["errors"][kind] = phase["errors"].get(kind, 0) + 1
    edges = [start, down, up, end if back is None else back, end]
    for i, p in enumerate(PHASES):
        phases[p]["seconds"] = round(max(0.0, edges[i + 1] - edges[i]), 3)
    in_force = [b for b in breaker if b["t"] <= up]
    opened = next((b["t"] for b in breaker if b["state"] == "open"), None)
    total = sum(p["requests"] for p in phases.values())
    return {
        "outage": outage,
        "requests": total,
        "failed": sum(p["failed"] for p in phases.values()),
        "back_after_s": None if back is None else round(back - up, 3),
        "breaker_opened_after_s": None if opened is None else round(opened - down, 3),
        "cooldown_in_force_s": in_force[-1]["cooldown_s"] if in_force else None,
        "phases": phases,
        "breaker": [{**b, "t": round(b["t"] - down, 3)} for b in breaker],  # seconds from the outage
    }


async def run(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    mock_ports = [(await start_mock(logs, procs, f"mock-{name}", "--record"))[1] for name in DEPLOYMENTS]
    primary = Target("mock", mock_ports[0], "sk-mock", "")
    key = "sk-bench-" + secrets.token_hex(16)
    body = chat_body(8)
    modes: dict[str, Any] = {}
    record["failover"] = {"modes": modes}
    for mode in MODES:
        port = free_port()
        gateway = Target("gateway", port, key, "failover")
        request = gateway.post("/v1/chat/completions", body)
        gw, _ = await start_gateway(
            args,
            logs,
            procs,
            port,
            gateway_config(port, mock_ports, key, args.store),
            f"gateway-failover-{mode}",
            [(request, chat_validator)],
        )
        await control(primary.port, primary.get("/_bench/log"))  # forget the readiness checks' answers
        trace: list[TraceEntry] = []
        breaker: list[dict[str, Any]] = []
        watcher = asyncio.ensure_future(watch_breaker(port, f"{DEPLOYMENTS[0]}/{MODEL}", breaker))
        load = asyncio.ensure_future(
            run_load(
                HOST,
                port,
                request,
                chat_validator,
                concurrency=CONCURRENCY,
                warmup=0,
                duration=BEFORE_S + OUTAGE_S + AFTER_S,
                timeout=REQUEST_TIMEOUT_S,
                trace=trace,
            )
        )
        try:
            await asyncio.sleep(BEFORE_S)
            progress(f"failover {mode}: {DEPLOYMENTS[0]} down for {OUTAGE_S:g} s")
            await control(primary.port, primary.post("/_bench/outage", {"mode": mode, "seconds": OUTAGE_S}))
            res = await load
        finally:
            load.cancel()
            watcher.cancel()
        ensure_alive(gw, f"failover {mode}")
        log = await control(primary.port, primary.get("/_bench/log"))
        result = modes[mode] = analyse(trace, log["outages"][-1], log["served"], breaker)
        result["error_examples"] = res.error_examples
        progress(
            f"failover {mode}: {result['failed']} of {result['requests']} failed; "
            f"{DEPLOYMENTS[0]} back {result['back_after_s']} s after it recovered"
        )
        gw.stop()
        procs.remove(gw)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}" if whole else "—"


def _verdict(ok: list[bool | None]) -> str:
    return ", ".join("no data" if v is None else "met" if v else "**not met**" for v in ok)


def render(record: dict[str, Any]) -> str:
    modes: dict[str, Any] = record.get("failover", {}).get("modes", {})
    if not modes:
        return ""
    args, results = record["args"], list(modes.values())
    first, second = DEPLOYMENTS
    outage = [r["phases"]["outage"] for r in results]
    back = [r["back_after_s"] for r in results]
    rows = [
        ("client requests", [f"{r['requests']:,}" for r in results], "", ""),
        ("failed requests, overall (%)", [_pct(r["failed"], r["requests"]) for r in results], "", ""),
        (
            "failed requests, during the outage (%)",
            [_pct(p["failed"], p["requests"]) for p in outage],
            f"< {TARGET_FAILED_PCT:g}",
            _verdict(
                [
                    100 * p["failed"] / p["requests"] < TARGET_FAILED_PCT if p["requests"] else None
                    for p in outage
                ]
            ),
        ),
        (
            f"`{first}` back: its first answer after it recovered (s)",
            ["never" if b is None else f"{b:.2f}" for b in back],
            f"≤ {TARGET_BACK_S:g} (cooldown_s + 1)",
            _verdict([b is not None and b <= TARGET_BACK_S for b in back]),
        ),
        (
            f"breaker cooldown in force when `{first}` recovered (s)",
            ["—" if r["cooldown_in_force_s"] is None else f"{r['cooldown_in_force_s']:g}" for r in results],
            "",
            "",
        ),
        (
            "breaker opened, after the outage began (s)",
            [
                "—" if r["breaker_opened_after_s"] is None else f"{r['breaker_opened_after_s']:.2f}"
                for r in results
            ],
            "",
            "",
        ),
    ]
    for phase in PHASES:
        cells = []
        for r in results:
            p = r["phases"][phase]
            answered = p["requests"] - p["failed"]
            cells.append(
                " / ".join(_pct(p["by_deployment"].get(f"{d}/{MODEL}", 0), answered) for d in DEPLOYMENTS)
            )
        rows.append((f"answered by {first} / {second} (%), {phase}", cells, "", ""))
    rows.append(
        (
            f"throughput, {' / '.join(PHASES)} (req/s)",
            [
                " / ".join(
                    f"{p['requests'] / p['seconds']:,.0f}" if p["seconds"] else "—"
                    for p in r["phases"].values()
                )
                for r in results
            ],
            "",
            "",
        )
    )
    lines = [
        f"Failover: alias `failover` = [{first}, {second}], strategy priority, breaker "
        f"{{failures: {FAILURES}, window_s: {WINDOW_S}, cooldown_s: {COOLDOWN_S}}}, router.retries "
        f"{RETRIES}, probe_interval_s {PROBE_S:g}; non-stream chat at {CONCURRENCY} connections for "
        f"{BEFORE_S + OUTAGE_S + AFTER_S:g} s, `{first}` down for {OUTAGE_S:g} s from +{BEFORE_S:g} s "
        f"(503: it answers 503; refuse: it closes its socket); phases: before, outage, recovering "
        f"(`{first}` up again, not yet answering), after; gateway on CPU {GATEWAY_CPU}, both mocks + "
        f"load generator on CPU {LOAD_CPU}; store `{args['store']}`; `{args['gateway_cmd']}`",
        "",
        f"| metric | {' | '.join(modes)} | target | |",
        f"|---|{'---:|' * len(modes)}---|---|",
    ]
    lines += [f"| {label} | {' | '.join(cells)} | {target} | {ok} |" for label, cells, target, ok in rows]
    return "\n".join(lines)
