"""`--hold`: many streaming clients held open at once, as a chat UI's users keep theirs.

One mock upstream (bench/mock_upstream.py) streams each answer's events 0.5 s apart (`--slow-delay`,
a model ending in "-slow"), so a stream of 60 content chunks lasts 30 s. A fresh gateway (memory
store, auth on, access log on, one pool big enough for every stream) serves 1,000 such streams
opened together (staggered over ~2 s so the listen backlog keeps up). Reported: streams that failed
or came back incomplete (every stream must bring all its events and `data: [DONE]`), the gateway's
resident memory per held stream (its peak RSS while they are held less its RSS just before, over
the number of streams), and its CPU per relayed chunk and per held stream-second. The gateway runs
on CPU 0, the mock and the clients on CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from bench.harness import HOST, Proc, Target, chat_body, free_port, progress, start_gateway, start_mock

CLIENTS = 1000
CHUNKS = 60
DELAY_S = 0.5
STAGGER_S = 0.002  # between stream starts
SAMPLE_S = 0.5  # RSS sampling period while the streams are held
MODEL = "mock-gpt-slow"  # "-slow": the mock spaces its events by --slow-delay
TARGET_KIB_PER_STREAM = 20.0


def gateway_config(port: int, mock_port: int, key: str, clients: int) -> str:
    return f"""\
server: {{host: {HOST}, port: {port}}}
store: {{url: "memory://"}}
auth:
  keys: [{{name: bench, key: {key}, models: [held]}}]
providers:
  mock:
    type: openai
    base_url: "http://{HOST}:{mock_port}/v1"
    api_key: sk-mock
    max_connections: {clients + 100}
models:
  - {{name: held, deployments: [{{provider: mock, model: {MODEL}}}]}}
"""


async def one_stream(port: int, request: bytes, expected: int, timeout_s: float) -> str | None:
    """Read one stream to its end; None when it was whole, else what went wrong."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        return f"connect: {exc!r}"
    try:
        writer.write(request)
        received = bytearray()
        deadline = time.monotonic() + timeout_s
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
            chunk = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - time.monotonic()))
            if not chunk:
                break
            received += chunk
        if not received.startswith(b"HTTP/1.1 200"):
            return "status: " + bytes(received[:40]).decode(errors="replace")
        events = received.count(b"data: ")
        if events != expected or b"data: [DONE]" not in received:
            return f"incomplete: {events} of {expected} events"
        return None
    except (OSError, TimeoutError) as exc:
        return f"read: {exc!r}"
    finally:
        writer.close()


async def sample_rss(gw: Proc, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak.append(gw.status_kib("VmRSS"))
        await asyncio.sleep(SAMPLE_S)


async def run(args: argparse.Namespace, logs: Path, record: dict[str, Any], procs: list[Proc]) -> None:
    clients, chunks, delay = args.hold_clients, CHUNKS, DELAY_S
    mock, mock_port = await start_mock(logs, procs, "mock", "--slow-delay", str(delay))
    key = "sk-bench-" + secrets.token_hex(8)
    port = free_port()
    config = gateway_config(port, mock_port, key, clients)
    gw, _ = await start_gateway(args, logs, procs, port, config, "hold", [])
    gw.refresh_pids()
    target = Target("gateway", port, key, "held")
    request = target.post("/v1/chat/completions", chat_body(chunks, stream=True))
    expected = chunks + 3  # role, content chunks, finish, [DONE]
    timeout_s = chunks * delay + 30.0
    # Warm up: a few streams through (imports, pool, first allocations), then the baseline.
    warm = target.post("/v1/chat/completions", chat_body(2, stream=True))
    for problem in await asyncio.gather(*(one_stream(port, warm, 5, 10.0) for _ in range(4))):
        if problem:
            progress(f"hold: warm-up stream failed: {problem}")
    await asyncio.sleep(2 * delay)
    idle_kib = gw.status_kib("VmRSS")
    cpu0 = gw.cpu_s()
    started = time.monotonic()
    progress(f"hold: opening {clients} streams of {chunks} chunks, {delay:g} s apart")
    peak: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(gw, peak, stop))

    async def staggered(i: int) -> str | None:
        await asyncio.sleep(i * STAGGER_S)
        return await one_stream(port, request, expected, timeout_s)

    problems = await asyncio.gather(*(staggered(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    cpu_s = gw.cpu_s() - cpu0
    stop.set()
    await sampler
    failed = [p for p in problems if p]
    held_kib = max(peak, default=idle_kib) - idle_kib
    record["hold"] = {
        "clients": clients,
        "chunks": chunks,
        "delay_s": delay,
        "elapsed_s": round(elapsed, 2),
        "failed": len(failed),
        "failure_examples": sorted(set(failed))[:5],
        "idle_rss_mib": round(idle_kib / 1024, 1),
        "peak_rss_mib": round(max(peak, default=idle_kib) / 1024, 1),
        "kib_per_stream": round(held_kib / clients, 1),
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_chunk": round(cpu_s * 1e6 / (clients * expected), 2),
        "cpu_pct_of_core": round(100 * cpu_s / elapsed, 1),
        "rss_samples_mib": [round(k / 1024, 1) for k in peak[:: max(1, len(peak) // 20)]],
        "mock_cpu_s": round(mock.cpu_s(), 2),
    }
    progress(f"hold: {orjson.dumps(record['hold']).decode()}")


def failed(record: dict[str, Any]) -> int:
    return int(record.get("hold", {}).get("failed", 0))


def render(record: dict[str, Any]) -> str:
    h = record.get("hold")
    if not h:
        return ""
    per_stream = "met" if h["kib_per_stream"] <= TARGET_KIB_PER_STREAM else "**not met**"
    ok = "met" if h["failed"] == 0 else "**not met**"
    rows = [
        f"Held streams: {h['clients']} clients at once, {h['chunks']} chunks {h['delay_s']:g} s apart "
        f"({h['chunks'] * h['delay_s']:g} s each), gateway on CPU 0; all done in {h['elapsed_s']} s",
        "",
        "| metric | value | target | |",
        "|---|---:|---|---|",
        f"| failed or incomplete streams | {h['failed']} | 0 | {ok} |",
        f"| gateway RSS idle → peak (MiB) | {h['idle_rss_mib']} → {h['peak_rss_mib']} | | |",
        f"| RSS per held stream (KiB) | {h['kib_per_stream']} | ≤ {TARGET_KIB_PER_STREAM:g} | {per_stream} |",
        f"| gateway CPU per relayed chunk (µs) | {h['cpu_us_per_chunk']} | | |",
        f"| gateway CPU while holding them (% of a core) | {h['cpu_pct_of_core']} | | |",
    ]
    if h["failure_examples"]:
        rows += ["", "Failures, e.g.: " + "; ".join(h["failure_examples"])]
    return "\n".join(rows)

