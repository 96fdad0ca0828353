"""CPU per access-log line through the gateway's logging set-up, in-process (run pinned: taskset -c 0).

The line a relayed chat answer gets, written by `gateway.access` through the handler and secret
masker `gateway serve` installs; stderr goes wherever the shell sends it (send it to /dev/null to
leave the terminal out). Best of 5 runs of 50,000 lines.

.venv/bin/python -m bench.log_cpu 2>/dev/null
"""

from __future__ import annotations

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


def main() -> None:
    logs.configure(["sk-secret-0123456789abcdef", "adm-0123456789abcdef"])
    log = logging.getLogger("gateway.access")
    best = float("inf")
    for _ in range(RUNS):
        start = time.process_time()
        for _ in range(N):
            log.info(orjson.dumps(LINE).decode())
        best = min(best, (time.process_time() - start) / N * 1e6)
    print(f"access log: {best:.2f} us CPU per line (best of {RUNS} x {N:,})", file=sys.stdout)


if __name__ == "__main__":
    main()
