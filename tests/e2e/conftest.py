"""Real gateway processes in front of the loopback mock OpenAI upstream.

`gateway_factory(config, env=...)` writes a config (a dict or YAML text) to a temp
dir, runs `python -m gateway serve --config PATH --port PORT` with stdout and
stderr in a log file, waits for `GET /healthz` and hands back a `GatewayProcess`.
Every process is stopped (SIGTERM, then SIGKILL after 5 s) at teardown, and its
log is printed, so a failing test shows what the gateway said.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.mock_openai import MockOpenAI

TEAM_A_KEY = "sk-team-a-e2e-5c0ffee0d15ea5e1"
TEAM_B_KEY = "sk-team-b-e2e-8badf00dcafe1234"
ADMIN_KEY = "adm-e2e-admin-key-77d2c41a9e"
UPSTREAM_KEY = "sk-upstream-secret-e2e-4f1c9a2b"
DEAD_UPSTREAM_KEY = "sk-dead-upstream-secret-e2e-93ab"
HASH_SECRET = "e2e-hash-secret-shared-by-replicas-0c4f"
SECRETS = (TEAM_A_KEY, TEAM_B_KEY, ADMIN_KEY, UPSTREAM_KEY, DEAD_UPSTREAM_KEY, HASH_SECRET)

# The aliases each key may use (team-b's `gpt-*` glob resolved against the config below).
TEAM_A_MODELS = {"gpt-mini", "emb", "img", "instruct", "gpt-dead"}
TEAM_B_MODELS = {"gpt-mini", "gpt-secret", "gpt-dead"}

FIRST_BYTE_S = 2
START_TIMEOUT_S = 20
STOP_GRACE_S = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_config(
    mock: MockOpenAI, *, store_url: str = "memory://", dead_port: int | None = None
) -> dict[str, Any]:
    """The config most e2e tests run: one mock provider, one provider on a closed port."""
    return {
        "server": {"host": "127.0.0.1", "port": 8080, "max_body_bytes": 1048576},
        "store": {"url": store_url},
        "auth": {
            "admin_key": "${GATEWAY_ADMIN_KEY:-" + ADMIN_KEY + "}",
            "hash_secret": HASH_SECRET,
            "keys": [
                {"name": "team-a", "key": TEAM_A_KEY, "models": sorted(TEAM_A_MODELS)},
                {"name": "team-b", "key": TEAM_B_KEY, "models": ["gpt-*"]},
            ],
        },
        "providers": {
            "mock": {"type": "openai", "base_url": mock.base_url, "api_key": UPSTREAM_KEY},
            "dead": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{dead_port or free_port()}/v1",
                "api_key": DEAD_UPSTREAM_KEY,
            },
        },
        "models": [
            {"name": "gpt-mini", "deployments": [{"provider": "mock", "model": "mock-gpt-upstream"}]},
            {"name": "gpt-secret", "deployments": [{"provider": "mock", "model": "mock-gpt-secret"}]},
            {"name": "emb", "deployments": [{"provider": "mock", "model": "mock-embed"}]},
            {"name": "img", "deployments": [{"provider": "mock", "model": "mock-image"}]},
            {"name": "instruct", "deployments": [{"provider": "mock", "model": "mock-instruct"}]},
            {"name": "gpt-dead", "deployments": [{"provider": "dead", "model": "dead-model"}]},
        ],
        # Error mapping is checked one upstream answer at a time: no retries, and a breaker
        # that never opens (tests/e2e/test_replicas_breaker.py and the integration tests
        # cover failover and the breaker).
        "router": {"retries": 0, "timeouts": {"connect_s": 5, "first_byte_s": FIRST_BYTE_S, "total_s": 30}},
        "breaker": {"failures": 100000},
    }


class GatewayProcess:
    """One running `python -m gateway serve`."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, config_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.config_path = config_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, api_key: str = TEAM_A_KEY, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)

    def async_client(self, api_key: str = TEAM_A_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, **kwargs)

    def http(self, api_key: str | None = TEAM_A_KEY, **kwargs: Any) -> httpx.Client:
        """A raw HTTP client on the gateway's origin (paths include /v1)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        kwargs.setdefault("timeout", 20)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_GRACE_S)


class GatewayLauncher:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[GatewayProcess] = []

    def start(
        self, config: dict[str, Any] | str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> GatewayProcess:
        n = len(self.started)
        config_path = self.directory / f"gateway-{n}.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        config_path.write_text(text, encoding="utf-8")
        config_path.chmod(0o600)
        log_path = self.directory / f"gateway-{n}.log"
        port = free_port()
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port), *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        gateway = GatewayProcess(proc, port, log_path, config_path)
        self.started.append(gateway)
        self._wait_healthy(gateway)
        return gateway

    def _wait_healthy(self, gateway: GatewayProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if gateway.proc.poll() is not None:
                    pytest.fail(
                        f"gateway exited with {gateway.proc.returncode} before it was healthy; log:\n"
                        + gateway.log_text()
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(gateway.url + "/healthz").status_code == 200:
                        return
                time.sleep(0.05)
        gateway.stop()
        pytest.fail(f"gateway not healthy within {START_TIMEOUT_S} s; log:\n" + gateway.log_text())

    def stop_all(self) -> None:
        for gateway in self.started:
            gateway.stop()
            log = gateway.log_text()
            if log:
                print(f"--- {gateway.log_path.name} (last 4000 chars) ---\n{log[-4000:]}")


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[MockOpenAI]:
    with MockOpenAI(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: MockOpenAI) -> Iterator[None]:
    mock_upstream.reset()
    yield
    mock_upstream.reset()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    launcher = GatewayLauncher(tmp_path)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    launcher = GatewayLauncher(tmp_path_factory.mktemp("gateway"))
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_store_url(request: pytest.FixtureRequest) -> str:
    """A URL of an empty shared store for replica tests: one redis-server, then the 3+3 Redis Cluster."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    setup = request.getfixturevalue("cluster_setup")
    setup.flush()
    return str(setup.url)


@pytest.fixture
def gateway(gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> GatewayProcess:
    """A gateway on the memory store."""
    return gateway_factory(default_config(mock_upstream))


@pytest.fixture
def store_gateway(
    gateway_factory: GatewayFactory, mock_upstream: MockOpenAI, store_url: str
) -> GatewayProcess:
    """A gateway on each store in turn: memory and a real redis-server."""
    return gateway_factory(default_config(mock_upstream, store_url=store_url))
