"""`--providers`: what stream translation costs, per provider, over the OpenAI pass-through path.

One mock upstream speaks every provider's stream (bench/mock_upstream.py); one gateway per round has
an alias per provider kind, all on that mock. Each round measures a 50-chunk stream at 8 connections
through every alias (in the opposite order every other round): the gateway's CPU per stream, and
what each translating provider adds over the `openai` alias (relayed untouched) in the same round, so
that drift between rounds cancels. Every stream is parsed: OpenAI chunks, 50 with content, [DONE].
Target (the translation issue): at most 0.2 ms CPU added per stream.
Untimed, each round: one stream per provider whose events the mock spaces 20 ms apart (an alias on
a "-slow" model); it must reach the client spread over at least its content deltas' span, not at once.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
from pathlib import Path
from typing import Any

import httptools

from bench.harness import (
    GATEWAY_CPU,
    HOST,
    LOAD_CPU,
    REQUEST_TIMEOUT_S,
    Proc,
    Target,
    chat_body,
    ensure_alive,
    free_port,
    measure,
    noise,
    noisy,
    probes,
    report,
    start_gateway,
    start_mock,
)
from bench.loadgen import TimedConn, chunks_validator, exchange
from bench.mock_upstream import SLOW_DELAY_S, SLOW_SUFFIX

CHUNKS = 50
CONCURRENCY = 8
TARGET_ADDED_MS = 0.2
REFERENCE = "openai"  # the pass-through path the others are compared with
SLOW_CHUNKS = 5
MIN_SPREAD_MS = (SLOW_CHUNKS - 1) * SLOW_DELAY_S * 1000  # from the first content delta to the last
# Provider kind (also its alias and provider name) -> (base_url path on the mock, upstream model).
PROVIDERS = {
    "openai": ("/v1", "mock-gpt-upstream"),
    "anthropic": ("", "claude-mock"),  # the adapter appends /v1/messages
    "cohere": ("", "command-mock"),  # ... /v2/chat
    "azure_openai": ("", "chat-dep"),  # the resource origin: ... /openai/deployments/chat-dep/...
}


def gateway_config(port: int, mock_port: int, key: str, store: str) -> str:
    providers = "".join(
        f'  {kind}: {{type: {kind}, base_url: "http://{HOST}:{mock_port}{path}", api_key: sk-mock}}\n'
        for kind, (path, _) in PROVIDERS.items()
    )
    models = "".join(
        f"  - {{name: {kind}{slow}, deployments: [{{provider: {kind}, model: {model}{slow}}}]}}\n"
        for kind, (_, model) in PROVIDERS.items()
        for slow in ("", SLOW_SUFFIX)
    )
    return f"""\
server: {{host: {HOST}, port: {port}}}
store: {{url: "{store}"}}
auth:
  keys: [{{name: bench, key: {key}}}]
providers:
{providers}models:
{models}"""


async def streamed(target: Target) -> dict[str, Any]:
    """One stream of spaced events: how long after its first piece its last one arrived."""
    request = target.post("/v1/chat/completions", chat_body(SLOW_CHUNKS, stream=True))
    try:
        conn = await exchange(HOST, target.port, request, REQUEST_TIMEOUT_S, TimedConn)
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        return {"error": repr(exc), "spread_ms": None}
    return {
        "error": chunks_validator(SLOW_CHUNKS)(conn.status, b"".join(conn.body)),
        "spread_ms": round((conn.arrivals[-1] - conn.arrivals[0]) * 1000, 1) if conn.arrivals else None,
        "pieces": len(conn.arrivals),
    }


async def run(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    body = chat_body(CHUNKS, stream=True)  # the mock streams CHUNKS content deltas, whatever the API
    validate = chunks_validator(CHUNKS)
    mock, mock_port = await start_mock(logs, procs, "mock-providers")
    key = "sk-bench-" + secrets.token_hex(16)
    rounds: list[dict[str, Any]] = []
    record["providers"] = {"chunks": CHUNKS, "concurrency": CONCURRENCY, "rounds": rounds}
    for r in range(args.rounds):
        port = free_port()
        targets = [Target(kind, port, key, kind) for kind in PROVIDERS]
        gw, startup = await start_gateway(
            args,
            logs,
            procs,
            port,
            gateway_config(port, mock_port, key, args.store),
            f"gateway-providers-r{r + 1}",
            [(t.post("/v1/chat/completions", body), validate) for t in targets],
        )
        order = targets if r % 2 == 0 else targets[::-1]
        cpu = probes(mock, gw)
        rnd: dict[str, Any] = {
            "round": r + 1,
            "order": [t.name for t in order],
            "gateway": {"cmd": gw.cmd, "pids": gw.pids, "startup_s": round(startup, 2)},
            "streamed": dict(
                zip(
                    PROVIDERS,
                    await asyncio.gather(
                        *(streamed(Target(t.name, port, key, t.name + SLOW_SUFFIX)) for t in targets)
                    ),
                    strict=True,
                )
            ),
            "runs": {},
        }
        rounds.append(rnd)
        for target in order:
            s = rnd["runs"][target.name] = await measure(target, body, validate, CONCURRENCY, args, cpu)
            report(f"round {r + 1}/{args.rounds} providers {target.name:12}", s)
            ensure_alive(gw, f"providers {target.name}")
        rnd["gateway"]["rss_hwm_mib"] = gw.hwm_mib()
        gw.stop()
        procs.remove(gw)


def failed(record: dict[str, Any]) -> int:
    rounds = record.get("providers", {}).get("rounds", [])
    bad_streams = sum(c["error"] is not None for rnd in rounds for c in rnd["streamed"].values())
    return bad_streams + sum(sum(s["errors"].values()) for rnd in rounds for s in rnd["runs"].values())


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def render(record: dict[str, Any]) -> str:
    rounds = record.get("providers", {}).get("rounds", [])
    if not rounds:
        return ""
    args = record["args"]

    def cpu(rnd: dict[str, Any], kind: str) -> float | None:
        s = rnd["runs"].get(kind)
        return s["cpu_ms_per_request"]["gateway"] if s else None

    def num(v: float | None, fmt: str = "{:.3f}", sign: bool = False) -> str:
        return "—" if v is None else ("+" if sign and v >= 0 else "") + fmt.format(v)

    lines = [
        f"Providers: {CHUNKS}-chunk streams at {CONCURRENCY} connections, one alias per provider kind, "
        f"all on one zero-delay mock; {len(rounds)} round(s) x ({args['warmup']:g} s warm-up + "
        f"{args['duration']:g} s), medians; `added` = that provider - `{REFERENCE}` (pass-through) "
        f"in the same round, median of rounds; gateway on CPU {GATEWAY_CPU}, mock upstream + load "
        f"generator on CPU {LOAD_CPU}; store `{args['store']}`; `{args['gateway_cmd']}`",
        "",
        "| provider | gateway CPU (ms/stream) | added vs openai (ms/stream) | TTFB p50 (ms) | "
        f"total p50 (ms) | streams/s | failed | relayed as it came (spread ms, ≥ {MIN_SPREAD_MS:g}) | "
        "target | |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for kind in PROVIDERS:
        runs = [rnd["runs"][kind] for rnd in rounds if kind in rnd["runs"]]
        pairs = [(cpu(rnd, kind), cpu(rnd, REFERENCE)) for rnd in rounds]
        added = None
        verdict = target = ""
        if kind != REFERENCE:
            added = _median([a - b if a is not None and b is not None else None for a, b in pairs])
            target = f"added ≤ {TARGET_ADDED_MS:g}"
            verdict = "no data" if added is None else "met" if added <= TARGET_ADDED_MS else "**not met**"
        label = f"{kind} (pass-through)" if kind == REFERENCE else kind
        checks = [rnd["streamed"][kind] for rnd in rounds]
        spreads = [c["spread_ms"] for c in checks if c["error"] is None and c["spread_ms"] is not None]
        relayed = "**no data**"
        if spreads:
            ok = len(spreads) == len(checks) and min(spreads) >= MIN_SPREAD_MS
            relayed = f"{'yes' if ok else '**no**'} ({min(spreads):.0f})"
        lines.append(
            f"| {label} | {num(_median([a for a, _ in pairs]))} | {num(added, sign=True)} | "
            f"{num(_median([s['ttfb_ms']['p50'] for s in runs]))} | "
            f"{num(_median([s['latency_ms']['p50'] for s in runs]))} | "
            f"{num(_median([s['rps'] for s in runs]), '{:,.0f}')} | "
            f"{sum(sum(s['errors'].values()) for s in runs) + len(checks) - len(spreads)} | {relayed} | "
            f"{target} | {verdict} |"
        )
    rss = [rnd["gateway"]["rss_hwm_mib"] for rnd in rounds if "rss_hwm_mib" in rnd["gateway"]]
    lines.append(
        f"| gateway peak RSS (MiB, VmHWM, max of rounds) | {max(rss) if rss else '—'} | | | | | | | | |"
    )
    pcts = noise(s for rnd in rounds for s in rnd["runs"].values())
    median = f"{statistics.median(pcts):.0f}" if pcts else "—"
    lines.append(f"| noise: other processes' CPU + steal (% of a core, median) | {median} | | | | | | | | |")
    return "\n".join(lines + noisy(max(pcts, default=0.0)))
