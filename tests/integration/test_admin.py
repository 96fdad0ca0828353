from __future__ import annotations

import time
from typing import Any

import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

ADMIN = "adm-integration-0123456789"


@pytest.fixture
async def gw(config_text: str) -> Any:
    text = config_text.replace("auth:\n", f"auth:\n  admin_key: {ADMIN}\n")
    app = build_app(parse(text, {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


@pytest.fixture
async def admin(gw: Any) -> Any:
    async with Client(gw, ADMIN) as c:
        yield c


async def create(admin: Client, **spec: Any) -> dict[str, Any]:
    r = await admin.post("/admin/keys", json={"name": "svc", "models": ["gpt-*"], **spec})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_created_key_works_once_and_secret_is_shown_once(gw: Any, admin: Client, mock: MockOpenAI) -> None:
    made = await create(admin, owner={"team": "search"}, limits={"rpm": 10})
    secret = made["secret"]
    assert secret.startswith("sk-gw-") and len(secret) >= 6 + 43  # 256 bits, base64url
    assert made["propagation"] == {"replicas": 1, "applied": 1}
    assert made["durability"] == {"store_replicas": 0, "confirmed": 0}  # the memory store has no replicas
    async with Client(gw, secret) as c:
        assert (await c.chat()).status_code == 200
        assert (await c.chat(model="emb")).status_code == 403
    listed = (await admin.get("/admin/keys")).json()["data"]
    shown = (await admin.get(f"/admin/keys/{made['id']}")).json()
    for text in (str(listed), str(shown)):
        assert secret not in text and "digest" not in text
    assert shown["owner"] == {"team": "search"} and shown["limits"]["rpm"] == 10
    assert {k["source"] for k in listed} == {"config", "admin"}


async def test_update_narrows_models_and_disable_refuses(gw: Any, admin: Client) -> None:
    made = await create(admin)
    async with Client(gw, made["secret"]) as c:
        r = await admin.patch(f"/admin/keys/{made['id']}", json={"models": ["gpt-other"]})
        assert r.status_code == 200 and r.json()["models"] == ["gpt-other"]
        assert (await c.chat()).status_code == 403
        await admin.patch(f"/admin/keys/{made['id']}", json={"enabled": False})
        r = await c.chat(model="gpt-other")
        assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."


async def test_rotate_with_grace_then_revoke(gw: Any, admin: Client) -> None:
    made = await create(admin)
    old = made["secret"]
    r = await admin.post(f"/admin/keys/{made['id']}/rotate", json={"grace_s": 0.3})
    new = r.json()["secret"]
    assert new != old
    async with Client(gw, old) as c_old, Client(gw, new) as c_new:
        assert (await c_old.chat()).status_code == 200
        assert (await c_new.chat()).status_code == 200
        time.sleep(0.35)
        assert (await c_old.chat()).status_code == 401
        assert (await c_new.chat()).status_code == 200
        r = await admin.delete(f"/admin/keys/{made['id']}")
        assert r.json()["revoked"] is True
        assert (await c_new.chat()).status_code == 401
    assert (await admin.get(f"/admin/keys/{made['id']}")).status_code == 404


async def test_rotate_without_grace_retires_old_at_once(gw: Any, admin: Client) -> None:
    made = await create(admin)
    await admin.post(f"/admin/keys/{made['id']}/rotate")
    async with Client(gw, made["secret"]) as c:
        assert (await c.chat()).status_code == 401


async def test_expired_key_says_so(gw: Any, admin: Client) -> None:
    made = await create(admin, expires_in_s=0.1)
    time.sleep(0.15)
    async with Client(gw, made["secret"]) as c:
        r = await c.chat()
    assert r.status_code == 401 and r.json()["error"]["code"] == "expired_api_key"
    assert "expired" in r.json()["error"]["message"]


async def test_credentials_do_not_cross(gw: Any) -> None:
    async with Client(gw, KEY_A) as c:
        r = await c.get("/admin/keys")
        assert r.status_code == 401 and r.json()["error"]["message"] == "Invalid admin credential."
    async with Client(gw, ADMIN) as c:
        assert (await c.chat()).status_code == 401
    async with Client(gw, None) as c:
        assert (await c.get("/admin/keys")).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/admin/keys", {"models": ["x"]}, 400),
        ("post", "/admin/keys", {"name": "x", "bogus": 1}, 400),
        ("post", "/admin/keys", {"name": "x", "limits": {"budget_usd": -1}}, 400),
        ("post", "/admin/keys", {"name": "x", "model_limits": {"nope": {"rpm": 1}}}, 400),
        ("post", "/admin/keys", {"name": "x", "model_limits": {"gpt-mini": {"concurrency": 1}}}, 400),
        ("post", "/admin/keys", "not json", 400),
        ("patch", "/admin/keys/key_missing", {"name": "y"}, 404),
        ("patch", "/admin/keys/cfg-team-a", {"name": "y"}, 400),
        ("delete", "/admin/keys/cfg-team-a", None, 400),
        ("post", "/admin/keys/cfg-team-a/rotate", {}, 400),
        ("get", "/admin/keys/key_missing", None, 404),
    ],
)
async def test_admin_bad_input(admin: Client, method: str, path: str, body: Any, status: int) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    r = await admin.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.headers["x-request-id"]


async def test_admin_disabled_without_admin_key(config_text: str) -> None:
    app = build_app(parse(config_text, {}))
    async with app.lifespan(None), Client(app, "anything-at-all-here") as c:  # type: ignore[arg-type]
        r = await c.get("/admin/keys")
    assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]


async def test_store_down_is_503_not_500(gw: Any, admin: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.store import StoreError

    async def down(*args: Any) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(gw.store, "hset", down)
    r = await admin.post("/admin/keys", json={"name": "x"})
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]


async def test_usage_per_key_and_model(gw: Any, admin: Client, mock: MockOpenAI) -> None:
    made = await create(admin)
    async with Client(gw, made["secret"]) as c:
        for _ in range(2):
            assert (await c.chat()).status_code == 200
        async with c.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "one two"}]}) as r:
            await r.aread()
    await gw.usage.flush()
    r = await admin.get("/admin/usage", params={"key": made["id"]})
    assert r.status_code == 200
    usage = r.json()["models"]["gpt-mini"]
    assert usage["requests"] == 3 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for params in ({}, {"key": "x", "start": "abc"}, {"key": "x", "start": "10", "end": "5"}):
        assert (await admin.get("/admin/usage", params=params)).status_code == 400
