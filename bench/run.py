"""`make bench`: what the gateway adds over a direct call to a zero-delay mock upstream, in one run.

The mock upstream and the load generator (this process) run on CPU 1, the gateway on CPU 0 alone.
Each round starts a fresh gateway, then runs every scenario against the mock directly and through
the gateway back to back, in the opposite order every other round so that drift hits both alike:

  chat_c1    non-stream chat, 1 connection: latency p50/p99
  chat_c32   non-stream chat, 32 connections: throughput, gateway CPU ms per request
  stream_c8  20-chunk SSE streams, 8 connections: TTFB and total p50, gateway CPU ms per stream

Instead of that suite, `--providers` (bench/providers.py) measures what stream translation costs per
provider, `--failover` (bench/failover.py) takes one of two deployments down under load, and
`--metrics` (bench/metrics_cost.py) measures the metrics' CPU per request, on against off.

Medians over rounds go to one markdown table on stdout, every round's raw numbers to
bench/results/<timestamp>.json (server logs and the generated config in bench/results/<timestamp>/).
Exit status: 0; 1 when a request failed (the run is flagged; not for the failures `--failover`
measures); 2 when a server did not start or died.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

from bench import failover, hold, metrics_cost, providers, redis_stack
from bench.harness import (
    GATEWAY_CPU,
    HOST,
    LOAD_CPU,
    REQUEST_TIMEOUT_S,
    ROOT,
    BenchError,
    Proc,
    Target,
    chat_body,
    ensure_alive,
    free_port,
    measure,
    noise,
    noisy,
    ok_200,
    probes,
    progress,
    report,
    start_gateway,
    start_mock,
)
from bench.loadgen import chat_validator, fetch, sse_validator

DEFAULT_GATEWAY_CMD = "taskset -c 0 .venv/bin/python -m gateway serve --config {config} --port {port}"
TARGETS = ("direct", "gateway")


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    stream: bool


SCENARIOS = (Scenario("chat_c1", 1, False), Scenario("chat_c32", 32, False), Scenario("stream_c8", 8, True))


async def sanity(target: Target, chat: dict[str, Any], events: int) -> dict[str, str]:
    """Untimed checks of the routes the scenarios do not load: "ok" or what went wrong."""
    checks = {
        "models": (target.get("/v1/models"), ok_200),
        "embeddings": (target.post("/v1/embeddings", {"input": ["bench"]}), ok_200),
        "stream_usage": (
            target.post(
                "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
            ),
            sse_validator(events + 1),
        ),
    }
    out = {}
    for name, (request, validate) in checks.items():
        try:
            status, body = await fetch(HOST, target.port, request, REQUEST_TIMEOUT_S)
            err = validate(status, body)
            out[name] = "ok" if err is None else f"{err}: {body[:200]!r}"
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            out[name] = repr(exc)
    return out


def gateway_config(port: int, mock_port: int, key: str, store: str, heartbeat: bool = True) -> str:
    return f"""\
server: {{host: {HOST}, port: {port}}}
router: {{heartbeat_s: {5 if heartbeat else 0}}}
store: {{url: "{store}"}}
auth:
  keys: [{{name: bench, key: {key}, models: [mock-gpt]}}]
providers:
  mock: {{type: openai, base_url: "http://{HOST}:{mock_port}/v1", api_key: sk-mock}}
models:
  - name: mock-gpt
    deployments: [{{provider: mock, model: mock-gpt-upstream}}]
"""


async def bench(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    chat = chat_body(args.chunks)
    events = args.chunks + 3  # role chunk, content chunks, finish chunk, [DONE]
    bodies = {stream: chat_body(args.chunks, stream) for stream in (False, True)}
    validators = {False: chat_validator, True: sse_validator(events)}

    mock, mock_port = await start_mock(logs, procs, "mock", "--chunks", str(args.chunks))
    direct = Target("direct", mock_port, "sk-mock", "mock-gpt-upstream")
    record["sanity"] = {"direct": await sanity(direct, chat, events)}
    key = "sk-bench-" + secrets.token_hex(16)

    for r in range(args.rounds):
        port = free_port()
        gateway = Target("gateway", port, key, "mock-gpt")
        gw, startup = await start_gateway(
            args,
            logs,
            procs,
            port,
            gateway_config(port, mock_port, key, args.store, not args.no_heartbeat),
            f"gateway-r{r + 1}",
            [(gateway.post("/v1/chat/completions", chat), chat_validator)],
        )
        order = [direct, gateway] if r % 2 == 0 else [gateway, direct]
        cpu = probes(mock, gw)
        rnd: dict[str, Any] = {
            "round": r + 1,
            "order": [t.name for t in order],
            "gateway": {
                "cmd": gw.cmd,
                "pids": gw.pids,
                "cpus": gw.cpus(),
                "startup_s": round(startup, 2),
                "sanity": await sanity(gateway, chat, events),
            },
            "runs": {},
        }
        record["rounds"].append(rnd)
        for sc in SCENARIOS:
            for target in order:
                s = await measure(target, bodies[sc.stream], validators[sc.stream], sc.concurrency, args, cpu)
                rnd["runs"].setdefault(sc.name, {})[target.name] = s
                report(f"round {r + 1}/{args.rounds} {sc.name:9} {target.name:7}", s)
                ensure_alive(gw, sc.name)
        rnd["gateway"]["rss_hwm_mib"] = gw.hwm_mib()
        gw.stop()
        procs.remove(gw)


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    path: tuple[str, ...]
    fmt: str
    both: bool = True  # False: a gateway-only number
    target: tuple[str, str, float] | None = None  # (column, "<=" or ">=", limit)


ROWS = (
    Row("chat c1 latency p50 (ms)", "chat_c1", ("latency_ms", "p50"), "{:.3f}", target=("added", "<=", 0.5)),
    Row("chat c1 latency p99 (ms)", "chat_c1", ("latency_ms", "p99"), "{:.3f}"),
    Row("chat c32 throughput (req/s)", "chat_c32", ("rps",), "{:,.0f}", target=("gateway", ">=", 4000)),
    Row("chat c32 latency p50 (ms)", "chat_c32", ("latency_ms", "p50"), "{:.3f}"),
    Row(
        "chat c32 gateway CPU (ms/request)",
        "chat_c32",
        ("cpu_ms_per_request", "gateway"),
        "{:.3f}",
        both=False,
        target=("gateway", "<=", 0.25),
    ),
    Row("stream c8 TTFB p50 (ms)", "stream_c8", ("ttfb_ms", "p50"), "{:.3f}"),
    Row("stream c8 total p50 (ms)", "stream_c8", ("latency_ms", "p50"), "{:.3f}"),
    Row("stream c8 throughput (streams/s)", "stream_c8", ("rps",), "{:,.0f}"),
    Row(
        "stream c8 gateway CPU (ms/stream)",
        "stream_c8",
        ("cpu_ms_per_request", "gateway"),
        "{:.3f}",
        both=False,
        target=("gateway", "<=", 0.4),
    ),
)


def _median(rounds: list[dict[str, Any]], row: Row, target: str) -> float | None:
    values = []
    for rnd in rounds:
        v: Any = rnd["runs"].get(row.scenario, {}).get(target)
        for key in row.path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            values.append(float(v))
    return statistics.median(values) if values else None


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per ROWS line: medians over rounds; added and ratio from those medians."""
    rows = []
    for row in ROWS:
        direct = _median(rounds, row, "direct") if row.both else None
        gateway = _median(rounds, row, "gateway")
        added = ratio = None
        if direct is not None and gateway is not None:
            added, ratio = gateway - direct, (gateway / direct if direct else None)
        cell: dict[str, Any] = {
            "metric": row.label,
            "direct": direct,
            "gateway": gateway,
            "added": added,
            "ratio": ratio,
        }
        if row.target:
            column, op, limit = row.target
            value = cell[column]
            cell["target"] = (
                f"{'added' if column == 'added' else ''} {'≤' if op == '<=' else '≥'} {limit:,g}".strip()
            )
            cell["met"] = None if value is None else (value <= limit if op == "<=" else value >= limit)
        rows.append(cell)
    return rows


def render(record: dict[str, Any]) -> str:
    args, rounds = record["args"], record["rounds"]

    def num(v: float | None, fmt: str, sign: bool = False) -> str:
        if v is None:
            return "—"
        text = fmt.format(v)
        if float(text.replace(",", "")) == 0:
            text = fmt.format(0.0)  # not "-0.000"
        return ("+" if sign and not text.startswith("-") else "") + text

    lines = [
        f"Gateway vs direct, {len(rounds)} round(s) x "
        f"({args['warmup']:g} s warm-up + {args['duration']:g} s), "
        f"medians; streams of {args['chunks']} chunks; gateway on CPU {GATEWAY_CPU}, "
        f"mock upstream + load generator on CPU {LOAD_CPU}; "
        f"store `{args['store']}`; `{args['gateway_cmd']}`",
        "",
        "| metric | direct | gateway | added | ratio | target | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for row, c in zip(ROWS, record["summary"], strict=True):
        met = (
            "" if "met" not in c else "no data" if c["met"] is None else "met" if c["met"] else "**not met**"
        )
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        lines.append(
            f"| {c['metric']} | {num(c['direct'], row.fmt)} | {num(c['gateway'], row.fmt)} | "
            f"{num(c['added'], row.fmt, sign=True)} | {ratio} | {c.get('target', '')} | {met} |"
        )
    rss = [r["gateway"]["rss_hwm_mib"] for r in rounds if "rss_hwm_mib" in r["gateway"]]
    lines.append(f"| gateway peak RSS (MiB, VmHWM, max of rounds) | — | {max(rss) if rss else '—'} | | | | |")
    errors = record["errors"]
    lines.append(f"| failed requests (all runs) | {errors['direct']} | {errors['gateway']} | | | | |")
    pcts = {t: noise(run[t] for rnd in rounds for run in rnd["runs"].values() if t in run) for t in TARGETS}
    cells = " | ".join(f"{statistics.median(v):.0f}" if v else "—" for v in pcts.values())
    lines.append(f"| noise: other processes' CPU + steal (% of a core, median) | {cells} | | | | |")
    return "\n".join(lines + noisy(max(pcts["direct"] + pcts["gateway"], default=0.0)))


async def run_selected(
    args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]
) -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the run like Ctrl-C does: cancel, then main() stops the servers.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.providers:
        await providers.run(args, logs, record, procs)
    if args.failover:
        await failover.run(args, logs, record, procs)
    if args.redis:
        await redis_stack.run(args, logs, record, procs)
    if args.hold:
        await hold.run(args, logs, record, procs)
    if args.metrics:
        await metrics_cost.run(args, logs, record, procs)
    if not (args.providers or args.failover or args.redis or args.hold or args.metrics):
        await bench(args, logs, record, procs)


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        description="gateway vs direct call against a zero-delay mock upstream "
        "(options also from BENCH_* environment variables)"
    )
    ap.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", "3")))
    ap.add_argument(
        "--duration",
        type=float,
        default=float(env("BENCH_DURATION", "8")),
        help="measured seconds per scenario and target",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=float(env("BENCH_WARMUP", "3")),
        help="discarded seconds before each measurement",
    )
    ap.add_argument(
        "--chunks", type=int, default=int(env("BENCH_CHUNKS", "20")), help="content chunks per stream"
    )
    ap.add_argument(
        "--store", default=env("BENCH_STORE", "memory://"), help="store.url of the gateway config"
    )
    ap.add_argument(
        "--gateway-cmd",
        default=env("BENCH_GATEWAY_CMD", DEFAULT_GATEWAY_CMD),
        help="bash command, run from the repo root; {config} and {port} are filled in; "
        "pin it to CPU 0 yourself (default: %(default)s)",
    )

    def flag(name: str, help: str) -> None:
        """An on/off option, also on when BENCH_<NAME> is set to anything but 0."""
        on = env("BENCH_" + name.upper(), "0") not in ("", "0")
        ap.add_argument(f"--{name}", action="store_true", default=on, help=help)

    flag("quick", "smoke run: 1 round, 1 s warm-up, 2 s per scenario")
    flag("providers", "instead of the suite: 50-chunk streams, one alias per provider (translation cost)")
    flag("failover", "instead of the suite: one of two deployments down for 10 s under steady load (~1 min)")
    flag("redis", "instead of the suite: the full stack (limits, quota, cache) on a real redis-server")
    flag("hold", "instead of the suite: 1,000 streams held open 30 s at once (RSS per stream, CPU per chunk)")
    ap.add_argument("--hold-clients", type=int, default=int(env("BENCH_HOLD_CLIENTS", str(hold.CLIENTS))))
    flag("no_heartbeat", "router.heartbeat_s: 0 (streams watched by no heartbeat clock), to measure its cost")
    flag("metrics", "instead of the suite: CPU per request with metrics on vs off, chat at 32 connections")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.duration = 1, 1.0, 2.0
    return args


def main() -> int:
    args = parse_args()
    if not {GATEWAY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(
            f"needs CPUs {GATEWAY_CPU} and {LOAD_CPU}, has {sorted(os.sched_getaffinity(0))}",
            file=sys.stderr,
        )
        return 2
    os.sched_setaffinity(0, {LOAD_CPU})  # the load generator runs in this process
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results"
    if (results / stamp).exists():  # two runs in the same second
        stamp += f"-{os.getpid()}"
    logs = results / stamp
    logs.mkdir(parents=True)
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
        "host": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
        },
        "rounds": [],
    }
    procs: list[Proc] = []
    status = 0
    t0 = time.monotonic()
    try:
        uvloop.run(run_selected(args, logs, record, procs))
    except BenchError as exc:
        record["aborted"] = str(exc)
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        record["aborted"] = "interrupted"
        status = 130
    finally:
        for proc in reversed(procs):
            proc.stop()
    record["elapsed_s"] = round(time.monotonic() - t0, 1)
    record["errors"] = {
        t: sum(
            sum(run[t]["errors"].values())
            for rnd in record["rounds"]
            for run in rnd["runs"].values()
            if t in run
        )
        for t in TARGETS
    }
    # The failover scenario's failed requests are its result, not a fault of the run.
    scenarios = (providers, redis_stack, hold, metrics_cost)
    failed = sum(record["errors"].values()) + sum(m.failed(record) for m in scenarios)
    reasons = [record["aborted"].partition("\n")[0]] if "aborted" in record else []
    if failed:
        reasons.append(f"{failed} failed request(s), see the JSON")
    record["flagged"] = "; ".join(reasons)
    record["summary"] = summarize(record["rounds"])
    out = results / f"{stamp}.json"
    out.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    tables = [render(record)] if record["rounds"] else []
    extra = tuple(m.render(record) for m in (providers, failover, redis_stack, hold, metrics_cost))
    tables += [table for table in extra if table]
    if record["flagged"]:
        tables.append(f"**FLAGGED**: {record['flagged']}")
    print("\n\n".join(tables))
    progress(
        f"raw numbers: {out.relative_to(ROOT)}; logs: {logs.relative_to(ROOT)}/; {record['elapsed_s']} s"
    )
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
