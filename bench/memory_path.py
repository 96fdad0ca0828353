"""Gateway CPU per request, pass-through with auth on the memory store, for two or more variants side by side.

    .venv/bin/python -m bench.memory_path --rounds 5 --variant 'base=cd /tmp/base && {gateway}' \\
        --variant 'new={gateway}'

Each variant is a gateway command run from the repo root, `{gateway}` standing for the default one,
`taskset -c 0 {python} -m gateway serve --config {config} --port {port}` (`{python}`: this one);
the config the suite's (`bench.run.gateway_config`, memory store, auth on) plus `--extra` YAML lines.
Per round, each variant in turn (the order rotated every round, so drift hits all alike): a fresh
gateway, non-stream chat at 32 connections (`--stream`: 20-chunk streams at 8), `--warmup` discarded,
then `--duration` measured, its CPU per request from /proc. Reported: per variant the median over
rounds, every round's figure, and the machine's other load. The gateway on CPU 0 alone, the mock
and the load generator on CPU 1.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

from bench.harness import (
    LOAD_CPU,
    ROOT,
    Proc,
    Target,
    chat_body,
    free_port,
    measure,
    probes,
    progress,
    start_gateway,
    start_mock,
)
from bench.loadgen import Validator, chat_validator, sse_validator
from bench.run import gateway_config

DEFAULT = "taskset -c 0 {python} -m gateway serve --config {config} --port {port}"


async def run(args: argparse.Namespace, logs: Path, procs: list[Proc]) -> dict[str, list[dict[str, Any]]]:
    chat = chat_body(args.chunks)
    # --stream: 20-chunk streams at 8 connections (the suite's stream_c8) instead of chat at 32.
    load, validate = chat, cast(Validator, chat_validator)
    if args.stream:
        load, validate = chat_body(args.chunks, True), sse_validator(args.chunks + 3)
    mock, mock_port = await start_mock(logs, procs, "mock", "--chunks", str(args.chunks))
    key = "sk-bench-" + secrets.token_hex(16)
    variants = [v.partition("=")[::2] for v in args.variant] or [("ours", "{gateway}")]
    out: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    python = shlex.quote(sys.executable)
    default = DEFAULT.replace("{python}", python)
    for r in range(args.rounds):
        shift = r % len(variants)
        for name, cmd in variants[shift:] + variants[:shift]:
            port = free_port()
            gateway = Target("gateway", port, key, "mock-gpt")
            config = gateway_config(port, mock_port, key, "memory://") + "".join(x + "\n" for x in args.extra)
            args.gateway_cmd = cmd.replace("{gateway}", default).replace("{python}", python)
            gw, _ = await start_gateway(
                args,
                logs,
                procs,
                port,
                config,
                f"{name}-r{r + 1}",
                [(gateway.post("/v1/chat/completions", chat), chat_validator)],
            )
            s = await measure(gateway, load, validate, 8 if args.stream else 32, args, probes(mock, gw))
            gw.stop()
            procs.remove(gw)
            errors = sum(s["errors"].values())
            cpu = s["cpu_ms_per_request"]["gateway"]
            others = s["cpu_pct"].get("others")
            ttfb = s["ttfb_ms"]["p50"]
            row = {"cpu_ms": cpu, "rps": s["rps"], "ttfb_ms": ttfb, "others": others, "errors": errors}
            out[name].append(row)
            progress(f"round {r + 1} {name}: {cpu:.4f} ms/request, {s['rps']:,.0f} req/s, TTFB {ttfb:.3f} ms")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="name=command (repeatable)")
    ap.add_argument("--extra", action="append", default=[], help="YAML line appended to every config")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--stream", action="store_true", help="streams at 8 connections instead of chat at 32")
    args = ap.parse_args()
    os.sched_setaffinity(0, {LOAD_CPU})
    logs = ROOT / "bench" / "results" / ("memory-path-" + time.strftime("%Y%m%d-%H%M%S"))
    logs.mkdir(parents=True)
    procs: list[Proc] = []
    try:
        result = uvloop.run(run(args, logs, procs))
    finally:
        for proc in reversed(procs):
            proc.stop()
    (logs / "result.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    for name, rounds in result.items():
        cpus = [x["cpu_ms"] for x in rounds]
        others = [x["others"] for x in rounds if x["others"] is not None]
        print(
            f"{name}: median {statistics.median(cpus):.4f} ms/request "
            f"(rounds {', '.join(f'{c:.4f}' for c in cpus)}), "
            f"median {statistics.median(x['rps'] for x in rounds):,.0f} req/s, "
            f"TTFB p50 {statistics.median(x['ttfb_ms'] for x in rounds):.3f} ms, "
            f"others {statistics.median(others) if others else 0:.0f}% of a core, "
            f"errors {sum(x['errors'] for x in rounds)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
