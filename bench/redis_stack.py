"""`--redis`: the full stack on a real redis-server: limits, a deployment quota and the cache.

One redis-server (no persistence) runs on the load CPU beside the mock; the gateway, on CPU 0
alone, uses it as its store. The key has rpm, tpm, rpd and concurrency limits (high enough
never to refuse), its deployment a quota, and the cache is on. Per round, back to back:

  direct     the mock, no gateway (the baseline of the ratios)
  limits     non-stream chat, 32 connections, not cacheable (no temperature): admission and settling
  hit        the same with temperature 0: after the first fill, every request is a cache hit

For each gateway scenario the Redis commands a request costs are counted apart from the timed run,
over 2,000 requests with background flushes included: the commands the gateway sends (MONITOR,
not counting what scripts call inside Redis) and, beside them, every command Redis ran for them
(INFO commandstats: the scripts' own calls included).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import shutil
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from bench.harness import (
    HOST,
    LOAD_CPU,
    REQUEST_TIMEOUT_S,
    BenchError,
    Proc,
    Target,
    chat_body,
    ensure_alive,
    failed_requests,
    free_port,
    measure,
    probes,
    progress,
    report,
    start_gateway,
    start_mock,
)
from bench.loadgen import chat_validator, fetch

COUNTED_REQUESTS = 2000
CONCURRENCY = 32
HUGE = 10**12


def config(port: int, mock_port: int, key: str, store: str) -> str:
    return f"""\
server: {{host: {HOST}, port: {port}}}
store: {{url: "{store}"}}
auth:
  keys:
    - name: bench
      key: {key}
      models: [mock-gpt]
      limits: {{rpm: {HUGE}, tpm: {HUGE}, rpd: {HUGE}, concurrency: 1000}}
providers:
  mock: {{type: openai, base_url: "http://{HOST}:{mock_port}/v1", api_key: sk-mock}}
models:
  - name: mock-gpt
    deployments: [{{provider: mock, model: mock-gpt-upstream, limits: {{rpm: {HUGE}, tpm: {HUGE}}}}}]
cache: {{enabled: true, ttl_s: 3600}}
"""


async def start_redis(logs: Path, procs: list[Proc]) -> tuple[Proc, str]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = Proc(
        "redis",
        f"taskset -c {LOAD_CPU} {shlex.quote(executable)} --port {port} --bind {HOST} --save '' "
        "--appendonly no",
        logs / "redis.log",
    )
    procs.append(proc)
    url = f"redis://{HOST}:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            await asyncio.sleep(0.025)
    raise BenchError("redis-server did not answer PING")


def command_calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


def monitor(client: redis.Redis, seen: Counter[str], ready: threading.Event) -> None:
    """Count the commands clients send (not those scripts run) until an `ECHO bench-done`."""
    with client.monitor() as m:
        ready.set()
        for command in m.listen():
            if command["client_type"] == "lua":
                continue
            if command["command"] == "ECHO bench-done":
                return
            seen[command["command"].split(" ", 1)[0].lower()] += 1


async def commands_per_request(
    client: redis.Redis, target: Target, body: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Redis commands per request over COUNTED_REQUESTS requests at concurrency 8 (after a warm-up):
    {"sent": what the gateway sent, "run": every command Redis ran}."""
    request = target.post("/v1/chat/completions", body)
    await fetch(HOST, target.port, request, REQUEST_TIMEOUT_S)  # fills the cache for `hit`
    await asyncio.sleep(1.2)  # let the background work of the warm-up land
    sent: Counter[str] = Counter()
    ready = threading.Event()
    watcher = threading.Thread(target=monitor, args=(client, sent, ready), daemon=True)
    watcher.start()
    ready.wait(5)
    before = command_calls(client)

    async def worker(n: int) -> None:
        for _ in range(n):
            status, answer = await fetch(HOST, target.port, request, REQUEST_TIMEOUT_S)
            if chat_validator(status, answer) is not None:
                raise BenchError(f"counting run failed: {status} {answer[:200]!r}")

    await asyncio.gather(*(worker(COUNTED_REQUESTS // 8) for _ in range(8)))
    await asyncio.sleep(1.2)  # one usage flush, so its share is in the count
    after = command_calls(client)
    client.echo("bench-done")
    watcher.join(5)
    sent.pop("info", None)
    ran = {name: calls - before.get(name, 0) for name, calls in after.items() if name not in ("info", "echo")}
    counted = {kind: per_request(counts) for kind, counts in (("sent", sent), ("run", ran))}
    # Redis CPU apart, without MONITOR (it costs Redis CPU of its own), at the timed concurrency.
    cpu_before, usec_before = redis_cpu_s(client), command_usec(client)
    await asyncio.gather(*(worker(COUNTED_REQUESTS // CONCURRENCY) for _ in range(CONCURRENCY)))
    await asyncio.sleep(1.2)  # the background work of those requests included
    used, in_commands = redis_cpu_s(client) - cpu_before, command_usec(client) - usec_before
    requests = COUNTED_REQUESTS // CONCURRENCY * CONCURRENCY
    # Beside the total: the part spent running the commands (scripts included), the rest being
    # Redis's reading, parsing and writing of the connections' traffic.
    counted["redis_cpu_us"] = {
        "per_request": round(used / requests * 1e6, 1),
        "in_commands": round(in_commands / requests, 1),
    }
    return counted


def command_usec(client: redis.Redis) -> int:
    """µs Redis spent executing commands so far (INFO commandstats), INFO itself left out."""
    stats = client.info("commandstats")
    return sum(int(v["usec"]) for name, v in stats.items() if name not in ("cmdstat_info", "cmdstat_echo"))


def redis_cpu_s(client: redis.Redis) -> float:
    """Redis's own CPU seconds so far, main thread and children (INFO cpu: user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def per_request(counts: Mapping[str, int]) -> dict[str, float]:
    out = {name: round(n / COUNTED_REQUESTS, 3) for name, n in sorted(counts.items()) if n}
    out["total"] = round(sum(out.values()), 3)
    return out


async def run(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    _, url = await start_redis(logs, procs)
    client = redis.Redis.from_url(url)
    mock, mock_port = await start_mock(logs, procs, "mock", "--chunks", str(args.chunks))
    direct = Target("direct", mock_port, "sk-mock", "mock-gpt-upstream")
    key = "sk-bench-" + secrets.token_hex(16)
    plain = chat_body(args.chunks)
    bodies = {"limits": plain, "hit": {**plain, "temperature": 0}}
    record["redis"] = {"commands_per_request": {}, "rounds": []}
    for r in range(args.rounds):
        client.flushall()
        port = free_port()
        gateway = Target("gateway", port, key, "mock-gpt")
        gw, _ = await start_gateway(
            args,
            logs,
            procs,
            port,
            config(port, mock_port, key, url),
            f"gateway-redis-r{r + 1}",
            [(gateway.post("/v1/chat/completions", plain), chat_validator)],
        )
        cpu = probes(mock, gw)
        rnd: dict[str, Any] = {"round": r + 1, "runs": {}}
        record["redis"]["rounds"].append(rnd)
        s = await measure(direct, plain, chat_validator, CONCURRENCY, args, cpu)
        rnd["runs"]["direct"] = s
        report(f"round {r + 1}/{args.rounds} direct c32", s)
        for name, body in bodies.items():
            s = await measure(gateway, body, chat_validator, CONCURRENCY, args, cpu)
            rnd["runs"][name] = s
            report(f"round {r + 1}/{args.rounds} {name:6} c32", s)
            ensure_alive(gw, name)
            if r == 0:
                counted = await commands_per_request(client, gateway, body)
                record["redis"]["commands_per_request"][name] = counted
                progress(f"redis commands per request, {name}: {counted}")
        gw.stop()
        procs.remove(gw)


def failed(record: dict[str, Any]) -> int:
    return failed_requests(record, "redis")


def render(record: dict[str, Any]) -> str:
    """The `--redis` table (medians over rounds), or "" when it did not run."""
    rounds = record.get("redis", {}).get("rounds", [])
    if not rounds:
        return ""

    def median(name: str, *path: str) -> float:
        values = []
        for rnd in rounds:
            value: Any = rnd["runs"][name]
            for part in path:
                value = value[part]
            values.append(value)
        values.sort()
        return values[len(values) // 2]

    direct_rps = median("direct", "rps")
    lines = [
        "| scenario (c32, Redis store) | req/s | vs direct | gateway CPU ms/request "
        "| Redis CPU µs/request | Redis commands/request |",
        "|---|---:|---:|---:|---:|---|",
        f"| direct | {direct_rps:,.0f} | 1.00x | | | |",
    ]
    for name in ("limits", "hit"):
        rps = median(name, "rps")
        cpu = median(name, "cpu_ms_per_request", "gateway")
        counted = record["redis"]["commands_per_request"].get(name, {})
        sent, ran = counted.get("sent", {}), counted.get("run", {})
        detail = ", ".join(f"{k} {v:g}" for k, v in sent.items() if k != "total")
        commands = f"{sent.get('total', 0):g} sent ({detail}); {ran.get('total', 0):g} run in Redis"
        redis_us = counted.get("redis_cpu_us", {})
        redis_cpu = f"{redis_us.get('per_request', 0):.1f} ({redis_us.get('in_commands', 0):.1f} in commands)"
        lines.append(
            f"| {name} | {rps:,.0f} | {rps / direct_rps:.2f}x | {cpu:.3f} | {redis_cpu} | {commands} |"
        )
    return "\n".join(lines)
