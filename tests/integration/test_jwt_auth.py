"""JWT bearer tokens through the whole app, beside API keys."""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt
import pytest

from gateway import build_app, parse
from tests.integration.conftest import Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

SECRET = "integration-hs256-secret-0123456789abcdef"


@pytest.fixture
async def gw(config_text: str) -> Any:
    issuer = (
        "  jwt:\n"
        "    - {issuer: https://idp.test/, audience: gateway, algorithms: [HS256], secret: " + SECRET + ",\n"
        "       tier_claim: tier, models: ['gpt-*', emb], tiers: {free: [gpt-mini], pro: ['*']}}\n"
    )
    app = build_app(parse(config_text.replace("auth:\n", "auth:\n" + issuer), {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


def token(**claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.test/", "aud": "gateway", "sub": "svc-42", "iat": now, "exp": now + 60,
            "tier": "pro", **claims}
    return pyjwt.encode(body, SECRET, algorithm="HS256")


async def test_token_tiers_map_to_models(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, token(tier="free")) as c:
        assert (await c.chat()).status_code == 200
        assert (await c.chat(model="gpt-other")).status_code == 403
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["gpt-mini"]
    async with Client(gw, token(tier="pro")) as c:
        models = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert models == {"gpt-mini", "gpt-other", "emb"}


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"aud": "other"}, "invalid_audience"),
        ({"iss": "https://evil.test/"}, "invalid_issuer"),
    ],
)
async def test_bad_tokens_are_401(gw: Any, claims: dict[str, Any], code: str) -> None:
    async with Client(gw, token(**claims)) as c:
        r = await c.chat()
    assert r.status_code == 401 and r.json()["error"]["code"] == code


async def test_api_keys_still_work_beside_tokens(client: Client) -> None:
    assert (await client.chat()).status_code == 200
