from __future__ import annotations

from typing import Any

import pytest

from gateway import build_app, parse
from tests.integration.conftest import Client

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(config_text: str) -> Any:
    app = build_app(parse(config_text + "cors: {allow_origins: ['https://app.example.com']}\n", {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


async def test_preflight_answered_without_credentials(gw: Any) -> None:
    async with Client(gw, None) as c:
        r = await c.options("/v1/chat/completions", headers={
            "origin": "https://app.example.com", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


async def test_other_origins_get_no_grant(gw: Any) -> None:
    async with Client(gw, None) as c:
        r = await c.options("/v1/chat/completions", headers={
            "origin": "https://evil.example.com", "access-control-request-method": "POST"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


async def test_simple_request_carries_allow_origin_and_exposes_request_id(gw: Any) -> None:
    async with Client(gw) as c:
        r = await c.post(
            "/v1/chat/completions", headers={"origin": "https://app.example.com"},
            json={"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
