"""The README's examples run as written against `config.example.yaml` (upstream: the mock)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.fixture
def example_gateway(gateway_factory: Any, mock_upstream: MockOpenAI) -> Any:
    env = {"OPENAI_BASE_URL": mock_upstream.base_url, "OPENAI_API_KEY": mock_upstream.api_key}
    return gateway_factory((ROOT / "config.example.yaml").read_text(), env=env)


def test_python_example(example_gateway: Any) -> None:
    (code,) = [b for b in blocks("python") if "OpenAI(" in b]
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{example_gateway.port}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "echo: Say hi" in out.stdout and "echo: Count to 3" in out.stdout


def test_curl_example(example_gateway: Any) -> None:
    (shell,) = [b for b in blocks("sh") if "curl" in b]
    command = " ".join(line.rstrip("\\").strip() for line in shell.split("curl", 1)[1].splitlines())
    args = shlex.split(command)
    url = next(a for a in args if a.startswith("http://"))
    headers = dict(args[i + 1].split(": ", 1) for i, a in enumerate(args) if a == "-H")
    body = args[args.index("-d") + 1]
    url = url.replace("127.0.0.1:8080", f"127.0.0.1:{example_gateway.port}")
    r = httpx.post(url, headers=headers, content=body, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: Say hi"


def test_make_targets_match_the_readme() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M) and f"make {target}" in README
    assert "make test" in (ROOT / ".ci/run").read_text()
