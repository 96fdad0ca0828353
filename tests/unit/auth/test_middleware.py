from __future__ import annotations

import asyncio
import hmac

import pytest

from gateway.auth import keys as keys_module
from gateway.auth.keys import KeyStore
from gateway.auth.middleware import AuthMiddleware, credential
from gateway.config import KeyConfig
from gateway.store import MemoryStore
from tests.unit.asgi import call, ok_app, scope

KEYS = [
    KeyConfig(name="team-a", key="sk-team-a-0123456789", models=["gpt-mini", "emb"]),
    KeyConfig(name="team-b", key="sk-team-b-0123456789", models=["gpt-*"]),
]
ALIASES = ["gpt-mini", "gpt-big", "emb", "claude"]


def table() -> KeyStore:
    return KeyStore(MemoryStore(), b"s" * 32, KEYS, ALIASES)


def run(headers, path="/v1/chat/completions"):  # type: ignore[no-untyped-def]
    seen: list[dict] = []  # type: ignore[type-arg]
    app = AuthMiddleware(ok_app(seen), keys=table())
    result = asyncio.run(call(app, scope(path, headers=headers), [b"{}"]))
    return result, seen


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer sk-team-a-0123456789")],
        [(b"authorization", b"bearer   sk-team-a-0123456789 ")],
        [(b"x-api-key", b"sk-team-a-0123456789")],
    ],
)
def test_valid_key_sets_policy(headers) -> None:  # type: ignore[no-untyped-def]
    result, seen = run(headers)
    assert result.status == 200
    policy = seen[0]["gateway"].policy
    assert policy.name == "team-a" and policy.models == {"gpt-mini", "emb"}


def test_globs_expand_to_configured_aliases() -> None:
    _, seen = run([(b"x-api-key", b"sk-team-b-0123456789")])
    assert seen[0]["gateway"].policy.models == {"gpt-mini", "gpt-big"}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([], "missing_api_key"),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], "missing_api_key"),
        ([(b"authorization", b"Bearer ")], "missing_api_key"),
        ([(b"authorization", b"Bearer sk-team-a-0123456780")], "invalid_api_key"),
        ([(b"x-api-key", b"sk-unknown")], "invalid_api_key"),
    ],
)
def test_missing_or_wrong_key_is_401(headers, code) -> None:  # type: ignore[no-untyped-def]
    result, seen = run(headers)
    assert not seen and result.status == 401
    err = result.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert b"sk-team" not in result.body
    assert result.headers[b"x-request-id"] == b"req_test"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/admin/keys"])
def test_paths_outside_v1_are_not_checked_here(path: str) -> None:
    result, seen = run([], path=path)
    assert result.status == 200 and seen[0]["gateway"].policy is None


def test_keys_held_only_as_keyed_digests() -> None:
    keys = table()
    assert not any(b"sk-team" in digest for digest in keys._by_digest)
    assert all(len(d) == 32 for d in keys._by_digest)
    assert "sk-team" not in repr(keys.records())
    # Another secret derives other digests from the same key.
    other = KeyStore(MemoryStore(), b"t" * 32, KEYS, ALIASES)
    assert other.digest(b"sk-team-a-0123456789") != keys.digest(b"sk-team-a-0123456789")


def test_final_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    assert table().lookup(b"sk-team-a-0123456789") is not None
    assert len(calls) == 1


def test_credential_header_order() -> None:
    assert credential([(b"x-api-key", b"k1"), (b"authorization", b"Bearer k2")]) == b"k1"
    assert credential([(b"authorization", b"Bearer k2"), (b"x-api-key", b"k1")]) == b"k2"
    assert credential([(b"accept", b"*/*")]) is None
