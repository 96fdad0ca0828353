"""Shared fixtures: the anyio backend, a real redis-server, and one store per backend.

`redis_url` is the one to reuse elsewhere (end-to-end tests): a URL to a real
redis-server started once per session, flushed before each test. The server is
never optional: when `redis-server` is missing it is installed (as root, with
apt-get) and when that fails the test fails, so CI cannot pass without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import fakeredis
import pytest
import redis
from redis.asyncio import BlockingConnectionPool

from gateway.store import MemoryStore, RedisStore, Store, store_from_url

if TYPE_CHECKING:
    from tests.redis_setups import ClusterSetup, SentinelSetup, TestPKI, TLSRedisServer

_START_TIMEOUT_S = 10.0
_INSTALL_TIMEOUT_S = 600.0


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process on 127.0.0.1 (and a unix socket) without persistence.

    `stop` and `start` again keep the port, which is how tests simulate a restart.
    """

    def __init__(self, executable: str, workdir: Path, options: dict[str, str] | None = None) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self.socket_path = workdir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.options = options or {}  # added to (or replacing) the defaults below

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> None:
        log = self.workdir / "redis.log"
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no snapshots: nothing to reload after a restart
            "appendonly": "no",
            "dir": str(self.workdir),
            "unixsocket": str(self.socket_path),
            "unixsocketperm": "700",
            "logfile": str(log),
            **self.options,
        }
        self.process = subprocess.Popen(
            [self.executable, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                output = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
                pytest.fail(f"redis-server on port {self.port} did not answer PING:\n{output}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=_START_TIMEOUT_S)
        self.process = None

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        """A synchronous admin client (flushes, checks) on the server's main port."""
        return redis.Redis(host="127.0.0.1", port=self.port)


def debian_executable(name: str, package: str, *, also: tuple[str, ...] = ()) -> str:
    """The path of `name`, installed from Debian's `package` when missing and we are root.

    Fails the test (never skips) when it cannot be had: CI must run what needs it.
    """

    def find() -> str | None:
        return shutil.which(name) or next((p for p in also if os.access(p, os.X_OK)), None)

    found = find()
    detail = ""
    if found is None and os.geteuid() == 0:
        try:
            result = subprocess.run(
                ["sh", "-c", f"apt-get update && apt-get install -y --no-install-recommends {package}"],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                capture_output=True,
                timeout=_INSTALL_TIMEOUT_S,
                check=False,
            )
            detail = result.stderr.decode(errors="replace")[-2000:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = repr(exc)
        found = find()
    if found is None:
        pytest.fail(f"{name} is not installed and could not be installed (as root: apt-get install {package})\n{detail}")
    return found


def _redis_server_executable() -> str:
    return debian_executable("redis-server", "redis-server")


@pytest.fixture(scope="session")
def redis_executable() -> str:
    return _redis_server_executable()


@pytest.fixture(scope="session")
def redis_process(redis_executable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server process (for its unix socket); most tests want `redis_url`."""
    server = RedisServer(redis_executable, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(redis_process: RedisServer) -> str:
    """The URL of the session's redis-server, shared by every test (not flushed)."""
    return redis_process.url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A URL to the session's real redis-server, with every database flushed first."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture
def spawn_redis(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers (for tests that kill them); all are killed afterwards."""
    servers: list[RedisServer] = []

    def spawn() -> RedisServer:
        server = RedisServer(redis_executable, tmp_path_factory.mktemp("redis-private"))
        servers.append(server)
        server.start()
        return server

    yield spawn
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A test CA made with openssl, and the certificates it signed (tests/redis_setups.py)."""
    from tests.redis_setups import TestPKI

    return TestPKI.make(debian_executable("openssl", "openssl"), tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tls_redis_process(
    redis_executable: str, test_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSRedisServer]:
    """The session's TLS-only redis-server, named `localhost`, requiring a client certificate."""
    from tests.redis_setups import TLSRedisServer

    server = TLSRedisServer(redis_executable, tmp_path_factory.mktemp("redis-tls"), test_pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sentinel_executable() -> str:
    return debian_executable("redis-sentinel", "redis-sentinel")


@pytest.fixture(scope="session")
def sentinel_setup(
    redis_executable: str, sentinel_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentinelSetup]:
    """The session's Sentinel set-up: 1 primary, 2 replicas, 3 sentinels (tests/redis_setups.py)."""
    from tests.redis_setups import SentinelSetup

    setup = SentinelSetup(redis_executable, sentinel_executable, tmp_path_factory.mktemp("sentinel"))
    setup.start()
    yield setup
    setup.stop()


@pytest.fixture
def spawn_sentinel_setup(
    redis_executable: str, sentinel_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SentinelSetup]]:
    """Private Sentinel set-ups (over TLS given a `TestPKI`), for tests that kill a primary or need
    TLS; all are killed afterwards."""
    from tests.redis_setups import SentinelSetup

    setups: list[SentinelSetup] = []

    def spawn(pki: TestPKI | None = None) -> SentinelSetup:
        folder = tmp_path_factory.mktemp("sentinel-private")
        setup = SentinelSetup(redis_executable, sentinel_executable, folder, pki)
        setups.append(setup)
        setup.start()
        return setup

    yield spawn
    for setup in setups:
        setup.stop()


@pytest.fixture(scope="session")
def redis_cli_executable() -> str:
    return debian_executable("redis-cli", "redis-tools")  # redis-server's dependency


@pytest.fixture(scope="session")
def cluster_setup(
    redis_executable: str, redis_cli_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterSetup]:
    """The session's Redis Cluster: 3 primaries, 3 replicas (tests/redis_setups.py)."""
    from tests.redis_setups import ClusterSetup

    setup = ClusterSetup(redis_executable, redis_cli_executable, tmp_path_factory.mktemp("cluster"))
    setup.start()
    yield setup
    setup.stop()


@pytest.fixture
def spawn_cluster_setup(
    redis_executable: str, redis_cli_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], ClusterSetup]]:
    """Private clusters, for tests that kill a node; all are killed afterwards."""
    from tests.redis_setups import ClusterSetup

    setups: list[ClusterSetup] = []

    def spawn() -> ClusterSetup:
        setup = ClusterSetup(redis_executable, redis_cli_executable, tmp_path_factory.mktemp("cluster-private"))
        setups.append(setup)
        setup.start()
        return setup

    yield spawn
    for setup in setups:
        setup.stop()


@pytest.fixture
async def memory_store() -> AsyncIterator[Store]:
    async with MemoryStore() as store:
        yield store


@pytest.fixture
async def fakeredis_store() -> AsyncIterator[Store]:
    # The blocking pool production uses: the default one refuses a 51st concurrent call.
    client = fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer(), connection_pool_class=BlockingConnectionPool, max_connections=50
    )
    async with RedisStore(client) as store:
        yield store


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    async with store_from_url(redis_url) as store:
        yield store


@pytest.fixture
async def tls_redis_store(tls_redis_process: TLSRedisServer) -> AsyncIterator[Store]:
    """A store on the TLS redis-server over rediss://, flushed first."""
    with tls_redis_process.client() as client:
        client.flushall()
    async with store_from_url(tls_redis_process.url) as store:
        yield store


@pytest.fixture
async def sentinel_store(sentinel_setup: SentinelSetup) -> AsyncIterator[Store]:
    """A store on the Sentinel set-up over redis+sentinel://, the primary flushed first."""
    with sentinel_setup.primary().client() as client:
        client.flushall()
    async with store_from_url(sentinel_setup.url) as store:
        yield store


@pytest.fixture
async def cluster_store(cluster_setup: ClusterSetup) -> AsyncIterator[Store]:
    """A store on the cluster over redis+cluster://, every primary flushed first."""
    cluster_setup.flush()
    async with store_from_url(cluster_setup.url) as store:
        yield store


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Store:
    """The store named by an indirect parameter: one of the store fixtures above."""
    backend: Store = request.getfixturevalue(request.param)
    return backend
