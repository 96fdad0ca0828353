"""CPU per access-log line through the gateway's logging set-up, in-process (run pinned: taskset -c 0).

The line a relayed chat answer gets, through the handler and secret masker `gateway serve` installs:
`logging` as a record of `gateway.access` (the path under any other logging set-up), `queued` as the
access log writes it there, queued and written once per event-loop turn (1 and 8 lines a turn).
stderr goes wherever the shell sends it (send it to /dev/null to leave the terminal out). Best of
5 runs of 50,000 lines, the JSON encoding included.

.venv/bin/python -m bench.log_cpu 2>/dev/null
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import orjson

from gateway.telemetry import logs

N = 50_000
RUNS = 5
LINE = {
    "request_id": "req_abcdef0123456789",
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "key": "bench",
    "model": "mock-gpt",
    "deployment": "mock/mock-gpt-upstream",
    "latency_ms": 0.345,
    "tokens": {"input": 12, "output": 20},
}


async def queued(per_turn: int) -> float:
    handler = logs.handler()
    assert handler is not None and handler.takes(logging.getLogger("gateway.access"))
    start = time.process_time()
    for _ in range(N // per_turn):
        for _ in range(per_turn):
            handler.add("gateway.access", orjson.dumps(LINE).decode())
        await asyncio.sleep(0)  # the turn ends: the queue is written
    return (time.process_time() - start) / N * 1e6


def main() -> None:
    logs.configure(["sk-secret-0123456789abcdef", "adm-0123456789abcdef"])
    log = logging.getLogger("gateway.access")
    best = float("inf")
    for _ in range(RUNS):
        start = time.process_time()
        for _ in range(N):
            log.info(orjson.dumps(LINE).decode())
        best = min(best, (time.process_time() - start) / N * 1e6)
    print(f"access log, logging: {best:.2f} us CPU per line (best of {RUNS} x {N:,})", file=sys.stdout)
    for per_turn in (1, 8):
        best = min(asyncio.run(queued(per_turn)) for _ in range(RUNS))
        print(f"access log, queued {per_turn}/turn: {best:.2f} us CPU per line", file=sys.stdout)


if __name__ == "__main__":
    main()
