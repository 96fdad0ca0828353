"""`gateway keys ...` against a real gateway process."""

from __future__ import annotations

import json

import pytest

from gateway import cli
from tests.e2e.conftest import ADMIN_KEY, GatewayProcess

pytestmark = pytest.mark.e2e


def keys(gw: GatewayProcess, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = cli.main(["keys", "--url", gw.url, "--admin-key", ADMIN_KEY, *args])
    out = capsys.readouterr()
    return code, json.loads(out.out or out.err)


def test_create_list_update_rotate_revoke(gateway: GatewayProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, made = keys(gateway, capsys, "create", "--name", "batch", "--models", "gpt-mini,emb", "--rpm", "5",
                      "--budget-usd", "12.5", "--owner", "team=search", "--expires-in-s", "3600")
    assert code == 0 and made["secret"].startswith("sk-gw-")
    assert made["limits"] == {"rpm": 5, "budget_usd": 12.5} and made["owner"] == {"team": "search"}
    key_id = made["id"]
    code, listed = keys(gateway, capsys, "list")
    assert code == 0 and key_id in {k["id"] for k in listed["data"]}
    assert made["secret"] not in json.dumps(listed)
    code, shown = keys(gateway, capsys, "show", key_id)
    assert shown["models"] == ["gpt-mini", "emb"]
    code, updated = keys(gateway, capsys, "update", key_id, "--disable", "--tpm", "100")
    # `limits` is replaced whole, as PATCH replaces any field it names.
    assert code == 0 and updated["enabled"] is False and updated["limits"] == {"tpm": 100}
    code, rotated = keys(gateway, capsys, "rotate", key_id, "--grace-s", "5")
    assert code == 0 and rotated["secret"] != made["secret"]
    code, revoked = keys(gateway, capsys, "revoke", key_id)
    assert code == 0 and revoked["revoked"] is True
    code, missing = keys(gateway, capsys, "show", key_id)
    assert code == 1 and missing["error"]["code"] == "key_not_found"


def test_errors(gateway: GatewayProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_KEY", raising=False)
    assert cli.main(["keys", "--url", gateway.url, "list"]) == 2
    assert "no admin key" in capsys.readouterr().err
    assert cli.main(["keys", "--url", gateway.url, "--admin-key", "wrong-admin-key-0000", "list"]) == 1
    assert "Invalid admin credential" in capsys.readouterr().err
    assert cli.main(["keys", "--url", "http://127.0.0.1:9", "--admin-key", ADMIN_KEY, "list"]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
