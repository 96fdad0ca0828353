"""Real Redis set-ups beyond one node, for the store's tests: TLS with a test CA, and Sentinel.

Everything runs from Debian's packages (`redis-server`, `redis-sentinel`, `openssl`) on
loopback ports, started by fixtures in tests/conftest.py and killed after.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port

_START_TIMEOUT_S = 15.0
SERVICE = "gw-primary"


@dataclass(frozen=True)
class TestPKI:
    """A test CA; server certificates for `localhost` only and for `localhost` + 127.0.0.1 (nodes that
    sentinels name by IP); a client certificate; and a CA that signed none of them."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    node_cert: Path
    node_key: Path

    @classmethod
    def make(cls, openssl: str, folder: Path) -> TestPKI:
        def run(*args: str) -> None:
            subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

        for ca in ("ca", "other-ca"):
            run(
                "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN=gateway {ca}",
            )  # fmt: skip
        (folder / "server.ext").write_text("subjectAltName=DNS:localhost\n")
        (folder / "node.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        for name, subject in (("server", "/CN=localhost"), ("client", "/CN=gateway"), ("node", "/CN=node")):
            run("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", subject)  # fmt: skip
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")  # fmt: skip
        return cls(
            ca=folder / "ca.crt",
            server_cert=folder / "server.crt",
            server_key=folder / "server.key",
            client_cert=folder / "client.crt",
            client_key=folder / "client.key",
            other_ca=folder / "other-ca.crt",
            node_cert=folder / "node.crt",
            node_key=folder / "node.key",
        )

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def tls_options(pki: TestPKI, *, by_ip: bool) -> dict[str, str]:
    """A server's TLS settings: its certificate (named for 127.0.0.1 too when `by_ip`), client
    certificates required, and TLS for replication (and for a sentinel's links to the nodes)."""
    return {
        "tls-cert-file": str(pki.node_cert if by_ip else pki.server_cert),
        "tls-key-file": str(pki.node_key if by_ip else pki.server_key),
        "tls-ca-cert-file": str(pki.ca),
        "tls-auth-clients": "yes",
        "tls-replication": "yes",
    }


class TLSRedisServer(RedisServer):
    """A redis-server that speaks TLS only, requiring a client certificate; its name is `localhost`."""

    def __init__(self, executable: str, workdir: Path, pki: TestPKI, *, by_ip: bool = False) -> None:
        self.pki = pki
        super().__init__(executable, workdir)
        self.options = {"port": "0", "tls-port": str(self.port), **tls_options(pki, by_ip=by_ip)}

    @property
    def url(self) -> str:
        return (
            f"rediss://localhost:{self.port}/0?ssl_ca={self.pki.ca}"
            f"&ssl_cert={self.pki.client_cert}&ssl_key={self.pki.client_key}"
        )

    def _answers_ping(self) -> bool:
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                self.pki.client_context().wrap_socket(raw, server_hostname="localhost") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="localhost",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.pki.ca),
            ssl_certfile=str(self.pki.client_cert),
            ssl_keyfile=str(self.pki.client_key),
        )


class SentinelSetup:
    """One primary, two replicas and three sentinels (quorum 2) watching them as `SERVICE`."""

    def __init__(
        self, redis_executable: str, sentinel_executable: str, workdir: Path, pki: TestPKI | None = None
    ) -> None:
        self.sentinel_executable = sentinel_executable
        self.workdir = workdir
        self.pki = pki  # given: everything over TLS only, sentinels included
        self.nodes = [
            TLSRedisServer(redis_executable, workdir / f"node{i}", pki, by_ip=True)
            if pki is not None
            else RedisServer(redis_executable, workdir / f"node{i}")
            for i in range(3)
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        if self.pki is None:
            return f"redis+sentinel://{hosts}/{SERVICE}/0"
        pki = self.pki
        return (
            f"rediss+sentinel://{hosts}/{SERVICE}/0"
            f"?ssl_ca={pki.ca}&ssl_cert={pki.client_cert}&ssl_key={pki.client_key}"
        )

    def sentinel(self, port: int) -> redis.Redis:
        """A synchronous client of the sentinel on `port`."""
        if self.pki is None:
            return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            decode_responses=True,
            ssl=True,
            ssl_ca_certs=str(self.pki.ca),
            ssl_certfile=str(self.pki.client_cert),
            ssl_keyfile=str(self.pki.client_key),
        )

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        primary = self.nodes[0]
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.options["repl-diskless-sync-delay"] = "0"  # replicas in sync at once, not after 5 s
            if node is not primary:
                node.options["replicaof"] = f"127.0.0.1 {primary.port}"
            node.start()
        for port in self.sentinel_ports:
            folder = self.workdir / f"sentinel{port}"
            folder.mkdir()
            config = folder / "sentinel.conf"
            listen = f"port {port}\n"
            if self.pki is not None:
                settings = tls_options(self.pki, by_ip=True)
                listen = f"port 0\ntls-port {port}\n" + "".join(f"{k} {v}\n" for k, v in settings.items())
            config.write_text(
                f"{listen}bind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [self.sentinel_executable, str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Until every replica is in sync and every sentinel knows both replicas and the other sentinels."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._ready():
            if time.monotonic() > deadline:
                logs = [path.read_text(errors="replace")[-1500:] for path in self.workdir.glob("*/*.log")]
                self.stop()
                pytest.fail("the sentinel set-up did not come up:\n" + "\n---\n".join(logs))
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            for node in self.nodes[1:]:
                with node.client() as client:
                    if client.info("replication").get("master_link_status") != "up":
                        return False
            for port in self.sentinel_ports:
                with self.sentinel(port) as client:
                    state = client.sentinel_master(SERVICE)
                    if (int(state["num-slaves"]), int(state["num-other-sentinels"])) != (2, 2):
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def primary(self) -> RedisServer:
        """The node the sentinels name as primary now."""
        with self.sentinel(self.sentinel_ports[0]) as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return next(node for node in self.nodes if node.port == int(port))

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=_START_TIMEOUT_S)
        self.sentinels = []
        for node in self.nodes:
            node.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while (port := free_port()) > 55535:
        pass
    return port


class ClusterSetup:
    """A Redis Cluster of 3 primaries and 3 replicas, made with `redis-cli --cluster create`."""

    def __init__(self, redis_executable: str, cli_executable: str, workdir: Path) -> None:
        self.cli_executable = cli_executable
        self.nodes = []
        for i in range(6):
            node = RedisServer(redis_executable, workdir / f"node{i}")
            node.port = cluster_port()
            node.options = {
                "cluster-enabled": "yes",
                "cluster-config-file": str(node.workdir / "nodes.conf"),
                "cluster-node-timeout": "2000",
                "repl-diskless-sync-delay": "0",  # replicas in sync at once, not after 5 s
            }
            self.nodes.append(node)

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.workdir.mkdir(parents=True, exist_ok=True)
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [
                    self.cli_executable,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not self._ready():
                if time.monotonic() > deadline:
                    pytest.fail("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        """Every node sees the cluster whole, and every replica is in sync (else it cannot take over)."""
        try:
            for node in self.nodes:
                with node.client() as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    replication = client.info("replication")
                    if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def primaries(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.client().info("replication")["role"] == "master"]

    def flush(self) -> None:
        for node in self.primaries():
            with node.client() as client:
                client.flushall()
                client.script_flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
