from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.telemetry.exposition import MetricsEndpoint
from gateway.telemetry.metrics import Counts, Deployment
from gateway.telemetry.server import serve
from gateway.telemetry.workers import Gauges
from tests.unit.asgi import call, scope

ADMIN = "adm-unit-0123456789abcdef"


async def _scrape() -> tuple[Counts, Gauges, dict[str, Deployment]]:
    return Counts(), {"gateway_store_up": {(): 1.0}}, {}


def endpoint(key: str | None = None) -> MetricsEndpoint:
    return MetricsEndpoint(_scrape, lambda: key)


def get(app: MetricsEndpoint, method: str = "GET", headers: list[tuple[bytes, bytes]] = ()) -> object:  # type: ignore[assignment]
    return asyncio.run(call(app, scope("/metrics", method, headers)))


def test_open_by_default() -> None:
    r = get(endpoint())
    assert r.status == 200 and b"gateway_store_up 1.0" in r.body  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "headers",
    [[], [(b"authorization", b"Bearer wrong-key-0123456789")], [(b"x-api-key", ADMIN[:-1].encode())]],
)
def test_the_admin_guard_refuses_without_the_key(headers: list[tuple[bytes, bytes]]) -> None:
    r = get(endpoint(ADMIN), headers=headers)
    assert r.status == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}  # type: ignore[attr-defined]
    assert ADMIN.encode() not in r.body  # type: ignore[attr-defined]


@pytest.mark.parametrize("header", [b"authorization", b"x-api-key"])
def test_the_admin_guard_admits_the_key(header: bytes) -> None:
    value = b"Bearer " + ADMIN.encode() if header == b"authorization" else ADMIN.encode()
    assert get(endpoint(ADMIN), headers=[(header, value)]).status == 200  # type: ignore[attr-defined]


def test_an_empty_admin_key_refuses_everyone() -> None:
    assert get(endpoint(""), headers=[(b"authorization", b"Bearer ")]).status == 401  # type: ignore[attr-defined]


def test_methods() -> None:
    assert get(endpoint(), "POST").status == 405  # type: ignore[attr-defined]
    head = get(endpoint(), "HEAD")
    assert head.status == 200 and head.body == b""  # type: ignore[attr-defined]


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_separate_port() -> None:
    async def main() -> list[bytes]:
        port = _free_port()
        server = await serve(endpoint(ADMIN), "127.0.0.1", port)
        try:
            return [
                await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
                                + b"\r\nAccept: application/openmetrics-text\r\n\r\n"),
                await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                await _exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
                await _exchange(port, b"nonsense\r\n\r\n"),
            ]
        finally:
            server.close()
            await server.wait_closed()

    ok, unauthorized, elsewhere, bad = asyncio.run(main())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-type: application/openmetrics-text" in ok
    assert ok.endswith(b"# EOF\n")
    assert unauthorized.startswith(b"HTTP/1.1 401 ")
    assert elsewhere.startswith(b"HTTP/1.1 404 ")
    assert bad.startswith(b"HTTP/1.1 400 ")


def test_a_client_that_never_finishes_its_head_is_dropped_not_fatal() -> None:
    async def main() -> bytes:
        port = _free_port()
        server = await serve(endpoint(), "127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n" + b"x" * 20000)  # past the head limit
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer + await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()).startswith(b"HTTP/1.1 200 OK")  # the first got nothing; the server lives
