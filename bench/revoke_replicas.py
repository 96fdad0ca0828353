"""Key changes across replicas: two gateway processes on one redis-server (redis-server on PATH).

Times create-on-A -> usable-on-B and revoke-on-A -> refused-on-B, 30 times each.

    .venv/bin/python -m bench.revoke_replicas
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

from tests.mock_openai import MockOpenAI

ADMIN = "adm-measure-0123456789abc"
ROUNDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def processes(commands: list[list[str]]) -> Iterator[None]:
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(10)


def wait_healthy(port: int) -> None:
    for _ in range(100):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"gateway on {port} did not start")


def main() -> None:
    redis_port, ports = free_port(), [free_port(), free_port()]
    redis = [
        "redis-server",
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with MockOpenAI() as mock, processes([redis]):
        time.sleep(0.5)
        path = os.path.join(tempfile.mkdtemp(), "gw.yaml")
        with open(path, "w") as f:
            f.write(f"""
store: {{url: "redis://127.0.0.1:{redis_port}/0"}}
server: {{access_log: false}}
auth: {{admin_key: {ADMIN}, hash_secret: measure-hash-secret-0123456789abcdef}}
providers:
  mock: {{type: openai, base_url: "{mock.base_url}", api_key: {mock.api_key}}}
models:
  - {{name: m, deployments: [{{provider: mock, model: mock-gpt-upstream}}]}}
""")
        os.chmod(path, 0o600)
        serve = [sys.executable, "-m", "gateway", "serve", "--config", path, "--port"]
        with processes([[*serve, str(p)] for p in ports]):
            for p in ports:
                wait_healthy(p)
            admin = httpx.Client(
                base_url=f"http://127.0.0.1:{ports[0]}", headers={"authorization": f"Bearer {ADMIN}"}
            )
            other = httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}")
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

            def chat_on_b(secret: str) -> int:
                headers = {"authorization": f"Bearer {secret}"}
                return other.post("/v1/chat/completions", json=body, headers=headers).status_code

            created, revoked = [], []
            for _ in range(ROUNDS):
                started = time.perf_counter()
                made = admin.post("/admin/keys", json={"name": "svc"}).json()
                assert chat_on_b(made["secret"]) == 200
                created.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                admin.delete(f"/admin/keys/{made['id']}")
                assert chat_on_b(made["secret"]) == 401, "a revoked key was accepted on the other replica"
                revoked.append((time.perf_counter() - started) * 1000)
    print(f"create on A -> 200 on B: median {statistics.median(created):.2f} ms, max {max(created):.2f}")
    print(
        f"revoke on A -> 401 on B (admin call incl. acks + next request): median "
        f"{statistics.median(revoked):.2f} ms, max {max(revoked):.2f}; {ROUNDS}/{ROUNDS} refused at once"
    )


if __name__ == "__main__":
    main()
