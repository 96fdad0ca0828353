"""rediss:// against a real TLS redis-server: verified, on both clients, and never plain."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from gateway.store import RedisStore, StoreError, store_from_url

from . import bounded
from .test_store import ECHO

if TYPE_CHECKING:
    from tests.redis_setups import TestPKI, TLSRedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PASSWORD = "s3cr3t-Pa55word"


def _client_cert(pki: TestPKI) -> str:
    return f"ssl_cert={pki.client_cert}&ssl_key={pki.client_key}"


async def _every_path_fails(url: str, reason: str, timeout_s: float = 2.0) -> None:
    """Both clients (ping: redis.asyncio; get and scripts: the lean one) refuse, naming `reason`."""
    async with store_from_url(url, timeout_s=timeout_s) as store:
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping,
            lambda: store.get("k"),
            lambda: store.run(ECHO, ["k"], ["a"]),
        ]
        for call in calls:
            with pytest.raises(StoreError, match=reason) as caught:
                await call()
            assert PASSWORD not in "".join(traceback.format_exception(caught.value))


@bounded
async def test_both_clients_speak_tls(tls_redis_process: TLSRedisServer) -> None:
    async with store_from_url(tls_redis_process.url) as store:
        assert isinstance(store, RedisStore)
        await store.set("k", b"v")  # the lean client
        assert await store.client.get("k") == b"v"  # redis.asyncio
        with tls_redis_process.client() as admin:
            clients = admin.client_list()
        assert (
            len(clients) >= 3
        )  # the lean client's, the pool's and the admin's: all over TLS (no plain port)


@bounded
async def test_system_trust_honours_ssl_cert_file(
    tls_redis_process: TLSRedisServer, test_pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"rediss://localhost:{tls_redis_process.port}/0?{_client_cert(test_pki)}"
    await _every_path_fails(url, "CERTIFICATE_VERIFY_FAILED")  # the test CA is not in the system store
    monkeypatch.setenv("SSL_CERT_FILE", str(test_pki.ca))
    async with store_from_url(url) as store:
        await store.ping()
        assert await store.set("k", b"v") is True


@bounded
async def test_untrusted_certificate_is_not_ready(
    tls_redis_process: TLSRedisServer, test_pki: TestPKI
) -> None:
    url = (
        f"rediss://gw:{PASSWORD}@localhost:{tls_redis_process.port}/0"
        f"?ssl_ca={test_pki.other_ca}&{_client_cert(test_pki)}"
    )
    await _every_path_fails(url, "CERTIFICATE_VERIFY_FAILED")


@bounded
async def test_wrong_hostname_fails(tls_redis_process: TLSRedisServer, test_pki: TestPKI) -> None:
    # The certificate names localhost only; 127.0.0.1 is the same server under another name.
    url = f"rediss://127.0.0.1:{tls_redis_process.port}/0?ssl_ca={test_pki.ca}&{_client_cert(test_pki)}"
    await _every_path_fails(url, "mismatch")


@bounded
async def test_client_certificate_is_sent(tls_redis_process: TLSRedisServer, test_pki: TestPKI) -> None:
    url = f"rediss://localhost:{tls_redis_process.port}/0?ssl_ca={test_pki.ca}"
    await _every_path_fails(url, "redis")  # the server requires one: the handshake is refused


@bounded
async def test_plain_server_is_never_used_in_the_clear(redis_url: str, test_pki: TestPKI) -> None:
    url = (
        redis_url.replace("redis://", "rediss://").replace("127.0.0.1", "localhost")
        + f"?ssl_ca={test_pki.ca}"
    )
    # A plain server takes the TLS hello for a partial command and waits: the handshake times out.
    await _every_path_fails(url, "(?i)timed? ?out", timeout_s=0.3)


def test_unreadable_tls_file_fails_at_start_without_the_password(test_pki: TestPKI) -> None:
    for query in ("ssl_ca=/nonexistent/ca.pem", f"ssl_cert=/nonexistent/c.pem&ssl_key={test_pki.client_key}"):
        with pytest.raises(ValueError, match="ssl_") as caught:
            store_from_url(f"rediss://:{PASSWORD}@localhost:6380/0?{query}")
        assert PASSWORD not in "".join(traceback.format_exception(caught.value))
