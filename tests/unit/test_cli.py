from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from gateway import cli

GOOD = textwrap.dedent(
    """
    auth:
      keys: [{name: a, key: sk-cli-test-0123456789}]
    providers:
      up: {type: openai_compatible, base_url: "http://127.0.0.1:9/v1"}
      disabled: {type: openai, api_key: ""}
    models:
      - {name: m, deployments: [{provider: up, model: x}]}
      - {name: n, deployments: [{provider: disabled, model: y}]}
    """
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", write(tmp_path, GOOD)]) == 0
    out = capsys.readouterr().out
    assert "ok (1 of 2 models served, 1 keys)" in out


def test_check_config_notes_missing_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", write(tmp_path, "{}")]) == 0
    assert "every /v1 request will be refused" in capsys.readouterr().out


def test_check_config_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = GOOD.replace("provider: up", "provider: oai2").replace("sk-cli-test-0123456789", "sk-short")
    assert cli.main(["check-config", write(tmp_path, bad)]) == 1
    err = capsys.readouterr().err
    assert "models[0].deployments[0].provider: unknown provider 'oai2'" in err
    assert "auth.keys[0].key: shorter than 16 characters" in err
    assert "sk-short" not in err


def test_serve_refuses_invalid_config_without_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--config", write(tmp_path, "server: {port: -1}")]) == 1
    assert "server.port" in capsys.readouterr().err


def test_serve_runs_uvicorn_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls = []
    shared: list[str] = []

    def run(app: str, **kw: object) -> None:
        calls.append((app, kw))
        directory = os.environ.get("GATEWAY_METRICS_DIR")
        if directory is not None:  # the workers' metrics directory: there and empty while they run
            assert os.listdir(directory) == []
            shared.append(directory)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    path = write(tmp_path, GOOD)
    assert cli.main(["serve", "--config", path, "--port", "9123", "--workers", "2"]) == 0
    app, kw = calls[0]
    assert app == "gateway.app:app_from_env" and kw["factory"] is True
    assert kw["port"] == 9123 and kw["host"] == "127.0.0.1" and kw["workers"] == 2
    assert kw["loop"] == "uvloop" and kw["http"] == "gateway.validation.protocol:BoundedHttpToolsProtocol"
    assert kw["h11_max_incomplete_event_size"] == 32768  # the head bound, carried to every worker

    assert os.environ["GATEWAY_CONFIG"] == path
    assert len(shared) == 1 and not os.path.exists(shared[0]) and "GATEWAY_METRICS_DIR" not in os.environ
    assert cli.main(["serve", "--config", path]) == 0  # one worker: nothing to share
    assert len(shared) == 1


def test_workers_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--config", "x", "--workers", "0"])
    assert "must be 1 or more" in capsys.readouterr().err
