"""Hot reload: validated first, swapped at once, requests in flight finish on the old config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway import build_app, load
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

ADMIN = "adm-reload-0123456789abcd"


def write(path: Path, mock: MockOpenAI, alias: str, extra_provider: str = "") -> None:
    path.write_text(f"""
auth:
  admin_key: {ADMIN}
  keys: [{{name: a, key: {KEY_A}}}]
providers:
  mock: {{type: openai, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
{extra_provider}
models:
  - {{name: {alias}, deployments: [{{provider: mock, model: mock-gpt-upstream}}]}}
router: {{timeouts: {{connect_s: 1, first_byte_s: 3, total_s: 10}}}}
""")
    path.chmod(0o600)


@pytest.fixture
async def gw(tmp_path: Path, mock: MockOpenAI) -> Any:
    mock.reset()
    path = tmp_path / "gw.yaml"
    write(path, mock, "before")
    app = build_app(load(path), str(path))
    async with app.lifespan():
        yield app, path


async def test_admin_reload_swaps_and_keeps_unchanged_pools(gw: Any, mock: MockOpenAI) -> None:
    app, path = gw
    pool = app.pools["mock"]
    write(path, mock, "after", extra_provider=f'  other: {{type: openai, base_url: "{mock.base_url}", api_key: k}}')
    async with Client(app, ADMIN) as admin:
        r = await admin.post("/admin/reload")
    assert r.status_code == 200 and r.json() == {"reloaded": True}
    assert app.pools["mock"] is pool and "other" in app.pools
    async with Client(app) as c:
        assert (await c.chat(model="after")).status_code == 200
        assert (await c.chat(model="before")).status_code == 404


async def test_bad_file_changes_nothing_and_says_why(gw: Any, mock: MockOpenAI) -> None:
    app, path = gw
    before = app.snapshot
    path.write_text(path.read_text().replace("provider: mock", "provider: nope"))
    async with Client(app, ADMIN) as admin:
        r = await admin.post("/admin/reload")
    assert r.status_code == 400 and "unknown provider 'nope'" in r.json()["error"]["message"]
    assert app.snapshot is before
    async with Client(app) as c:
        assert (await c.chat(model="before")).status_code == 200


async def test_request_in_flight_finishes_on_the_old_config(gw: Any, mock: MockOpenAI) -> None:
    app, path = gw
    mock.behave(delay_head=0.5)
    async with Client(app) as c:
        slow = asyncio.create_task(c.chat(model="before"))
        await asyncio.sleep(0.1)
        write(path, mock, "after")
        assert await app.reload() == []
        r = await slow
    assert r.status_code == 200 and r.json()["choices"]


async def test_sighup_reloads(gw: Any, mock: MockOpenAI) -> None:
    import os
    import signal

    app, path = gw
    write(path, mock, "after")
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        if "after" in app.routes:
            break
        await asyncio.sleep(0.02)
    assert "after" in app.routes


async def test_reload_without_a_file_is_refused(config_text: str) -> None:
    from gateway import parse

    app = build_app(parse(config_text, {}))
    assert await app.reload() == ["the gateway was not started from a config file"]
