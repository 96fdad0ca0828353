"""CPU of the auth layer per request, key lookup among 1,000 keys (run pinned: taskset -c 0).

.venv/bin/python -m bench.auth_cpu
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.auth.keys import KeyStore
from gateway.auth.middleware import AuthMiddleware
from gateway.config import KeyConfig
from gateway.context import RequestContext
from gateway.store import MemoryStore

N = 100_000


async def main() -> None:
    keys = [KeyConfig(name=f"k{i}", key=f"sk-bench-key-{i:08d}-abcdef") for i in range(1000)]
    store = KeyStore(MemoryStore(), b"x" * 32, keys, [f"m{i}" for i in range(20)])

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        pass

    auth = AuthMiddleware(inner, keys=store)
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-bench-key-00000500-abcdef"),
    ]

    async def run(app: Any) -> float:
        start = time.process_time()
        for _ in range(N):
            scope = {"type": "http", "path": "/v1/chat/completions", "headers": headers}
            scope["gateway"] = RequestContext(b"r", 0.0)
            await app(scope, None, None)
        return time.process_time() - start

    spent, baseline = await run(auth), await run(inner)
    print(f"auth: {(spent - baseline) / N * 1e6:.2f} us CPU per request (API key among 1,000)")


if __name__ == "__main__":
    asyncio.run(main())
