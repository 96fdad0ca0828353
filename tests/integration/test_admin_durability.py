"""Admin key writes wait for the store's replicas (`store.admin_writes`), against real Redis.

A lone node with no replicas answers at once; one asked for a replica it does not have answers
503 `write_not_confirmed` with the change applied; under Sentinel a primary SIGKILLed right after
the answers leaves a promoted replica that has the created key and not the revoked one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from gateway import build_app, parse
from gateway.auth.keys import RECORDS
from tests.integration.conftest import Client

if TYPE_CHECKING:
    from tests.redis_setups import SentinelSetup

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ADMIN = "adm-durability-0123456789"
HASH_SECRET = "h" * 32


@asynccontextmanager
async def gateway(config_text: str, store: str) -> AsyncIterator[Any]:
    text = config_text.replace("auth:\n", f"auth:\n  admin_key: {ADMIN}\n  hash_secret: {HASH_SECRET}\n")
    app = build_app(parse(text + f"store: {store}\n", {}))
    async with app.lifespan(None):
        yield app


async def test_a_lone_node_has_no_replica_to_wait_for(config_text: str, redis_url: str) -> None:
    async with gateway(config_text, f"{{url: '{redis_url}'}}") as gw, Client(gw, ADMIN) as admin:
        r = await admin.post("/admin/keys", json={"name": "svc"})
        assert r.status_code == 201, r.text
        assert r.json()["durability"] == {"store_replicas": 0, "confirmed": 0}


async def test_replicas_short_answer_503_and_the_change_stands(config_text: str, redis_url: str) -> None:
    store = f"{{url: '{redis_url}', admin_writes: {{replicas: 1, timeout_ms: 100}}}}"
    async with gateway(config_text, store) as gw, Client(gw, ADMIN) as admin:
        started = time.monotonic()
        r = await admin.post("/admin/keys", json={"name": "svc"})
        assert time.monotonic() - started >= 0.1  # it did wait for the replica
        assert r.status_code == 503
        error = r.json()["error"]
        assert (error["code"], error["type"]) == ("write_not_confirmed", "server_error")
        assert "confirmed by 0 of 1 store replicas" in error["message"]
        assert "secret" not in r.text and "sk-gw-" not in r.text
        [made] = [k for k in (await admin.get("/admin/keys")).json()["data"] if k["source"] == "admin"]
        assert made["id"] in error["message"]  # the operator can find the key and revoke it

        r = await admin.delete(f"/admin/keys/{made['id']}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "write_not_confirmed"
        assert (await admin.get(f"/admin/keys/{made['id']}")).status_code == 404  # revoked anyway


async def test_waitaof_on_a_node_that_cannot_do_it_answers_503(config_text: str, redis_url: str) -> None:
    store = f"{{url: '{redis_url}', admin_writes: {{aof: true, timeout_ms: 100}}}}"
    async with gateway(config_text, store) as gw, Client(gw, ADMIN) as admin:
        r = await admin.post("/admin/keys", json={"name": "svc"})
    assert r.status_code == 503
    assert "the store refused to confirm it" in r.json()["error"]["message"]


async def test_a_sigkilled_sentinel_primary_loses_no_acknowledged_key_write(
    config_text: str, spawn_sentinel_setup: Callable[..., SentinelSetup]
) -> None:
    setup = spawn_sentinel_setup()
    old = setup.primary()
    store = f"{{url: '{setup.url}', timeout_s: 0.5}}"
    with anyio.fail_after(60):
        async with gateway(config_text, store) as gw, Client(gw, ADMIN) as admin:
            made = []
            for name in ("kept", "revoked"):
                r = await admin.post("/admin/keys", json={"name": name, "models": ["gpt-*"]})
                assert r.status_code == 201, r.text
                assert r.json()["durability"] == {"store_replicas": 2, "confirmed": 2}
                made.append(r.json())
            kept, revoked = made
            r = await admin.delete(f"/admin/keys/{revoked['id']}")
            assert r.status_code == 200 and r.json()["durability"] == {"store_replicas": 2, "confirmed": 2}
            old.stop()  # SIGKILL, right after the acknowledgement
        while setup.primary() is old:
            await anyio.sleep(0.1)
        with setup.primary().client() as promoted:
            assert set(promoted.hkeys(RECORDS)) == {kept["id"].encode()}
        # A gateway starting now reads the keys from the promoted primary.
        async with gateway(config_text, store) as gw:
            async with Client(gw, kept["secret"]) as c:
                assert (await c.chat()).status_code == 200
            async with Client(gw, revoked["secret"]) as c:
                r = await c.chat()
            assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
