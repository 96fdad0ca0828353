"""The deployment topology of docker-compose.yml, proven with local processes.

A real redis-server, three gateway replicas on it (`gateway_factory`, Redis store) and a real
nginx in front running deploy/nginx.conf itself: the file is rewritten only where a local run
must differ (listen address, the replicas' ports, user, pid, log and temp paths, `daemon off;`),
so what is tested here is what compose ships. nginx comes from Debian's packages: when it is
missing and we are root it is installed; it is never skipped.

The last tests check the deployment files against each other without running anything:
docker-compose.yml, deploy/config.compose.yaml, deploy/nginx.conf, deploy/k8s/ and the Dockerfile.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway import config as config_module
from tests.conftest import RedisServer, debian_executable
from tests.e2e.conftest import (
    ADMIN_KEY,
    TEAM_A_KEY,
    TEAM_B_KEY,
    GatewayFactory,
    GatewayProcess,
    default_config,
    free_port,
)
from tests.mock_openai import MockOpenAI, embedding_vector

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "config.compose.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"

REPLICAS = 3
NGINX_START_TIMEOUT_S = 10.0
NGINX_STOP_TIMEOUT_S = 5.0
LOG_WAIT_S = 3.0
CHAT = {"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}]}


# -- nginx ---------------------------------------------------------------------------------------


def _nginx_executable() -> str:
    return debian_executable("nginx", "nginx", also=("/usr/sbin/nginx", "/usr/local/sbin/nginx"))


@pytest.fixture(scope="session")
def nginx_executable() -> str:
    return _nginx_executable()


def render_nginx_conf(template: str, *, port: int, replicas: Sequence[int], prefix: Path) -> str:
    """deploy/nginx.conf for local processes: only ports, user and file paths change."""
    text = template

    def sub(pattern: str, repl: str | Callable[[re.Match[str]], str], expected: int = 1) -> None:
        nonlocal text
        text, count = re.subn(pattern, repl, text, flags=re.M)
        if count != expected:
            raise AssertionError(
                f"deploy/nginx.conf: expected {expected} line(s) matching {pattern!r}, found {count}; "
                "the topology test rewrites those lines (see the comment at the top of the file)"
            )

    # As root, nginx's workers would otherwise run as `nobody` and could not reach the temp dir.
    sub(r"^user \S+;$", "user root;" if os.geteuid() == 0 else "")
    sub(r"^pid \S+;$", f"pid {prefix}/nginx.pid;\ndaemon off;")
    sub(r"^error_log \S+(?: \w+)?;$", f"error_log {prefix}/error.log notice;")
    sub(r"^(\s*)access_log /dev/stdout gateway;$", rf"\g<1>access_log {prefix}/access.log gateway;")
    sub(r"^(\s*)listen 8080;$", rf"\g<1>listen 127.0.0.1:{port};")
    ports = iter(replicas)
    sub(
        r"^(\s*)server gateway-\d+:8080( [^;]*)?;$",
        lambda m: f"{m[1]}server 127.0.0.1:{next(ports)}{m[2] or ''};",
        len(replicas),
    )
    temp = "".join(
        f"\n    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    sub(r"^http \{$", "http {" + temp)
    return text


class Nginx:
    """One nginx master (+ workers) in the foreground, with everything under `prefix`."""

    def __init__(self, executable: str, prefix: Path, conf: str, port: int) -> None:
        self.executable = executable
        self.prefix = prefix
        self.port = port
        self.conf_path = prefix / "nginx.conf"
        self.error_log = prefix / "error.log"
        self.access_log = prefix / "access.log"
        self.stdout_log = prefix / "stdout.log"
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(conf, encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self, *extra: str) -> list[str]:
        return [
            self.executable,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf_path),
            "-e",
            str(self.error_log),
            *extra,
        ]

    def logs(self) -> str:
        parts = []
        for path in (self.error_log, self.stdout_log):
            if path.exists():
                parts.append(f"--- {path.name} ---\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def start(self) -> None:
        check = subprocess.run(self._args("-t", "-q"), capture_output=True, timeout=10, check=False)
        if check.returncode != 0:
            pytest.fail(
                f"nginx -t rejected the rendered config {self.conf_path}:\n"
                + check.stderr.decode(errors="replace")
                + self.logs()
            )
        with self.stdout_log.open("wb") as out:
            self.proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers are stopped with it
            )
        deadline = time.monotonic() + NGINX_START_TIMEOUT_S
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"nginx exited with {self.proc.returncode} at start:\n{self.logs()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + "/nginx-healthz").status_code == 200:
                        return
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"nginx did not answer within {NGINX_START_TIMEOUT_S} s:\n{self.logs()}")

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: the master stops its workers), SIGKILL to the group if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(NGINX_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(NGINX_STOP_TIMEOUT_S)

    def access_entries(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


# -- the topology -----------------------------------------------------------------------------


@dataclass
class Topology:
    replicas: list[GatewayProcess]
    nginx: Nginx
    mock: MockOpenAI

    @property
    def url(self) -> str:
        return self.nginx.url

    def client(self, api_key: str = TEAM_A_KEY, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def http(self, api_key: str | None = TEAM_A_KEY, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        kwargs.setdefault("timeout", 20)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def replica_by_port(self) -> dict[str, GatewayProcess]:
        return {f"127.0.0.1:{gw.port}": gw for gw in self.replicas}


def access_lines(gateway: GatewayProcess, path: str | None = None) -> list[dict[str, Any]]:
    """The replica's `gateway.access` JSON lines (optionally for one path)."""
    entries = []
    for line in gateway.log_text().splitlines():
        _, marker, payload = line.partition(" gateway.access: ")
        if marker:
            entry = json.loads(payload)
            if path is None or entry["path"] == path:
                entries.append(entry)
    return entries


def wait_until(condition: Callable[[], bool], timeout: float = LOG_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def chat_counts(topology: Topology) -> list[int]:
    return [len(access_lines(gw, "/v1/chat/completions")) for gw in topology.replicas]


def connections_to(ports: Sequence[int]) -> set[tuple[int, int]]:
    """TCP connections on 127.0.0.1 (any state, TIME_WAIT included) with one end on `ports`."""
    wanted = set(ports)
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote = (int(field.rsplit(":", 1)[1], 16) for field in line.split()[1:3])
        if local in wanted:
            found.add((local, remote))
        elif remote in wanted:
            found.add((remote, local))
    return found


TopologyFactory = Callable[[str], Topology]


@pytest.fixture
def topology_factory(
    gateway_factory: GatewayFactory,
    mock_upstream: MockOpenAI,
    nginx_executable: str,
    tmp_path: Path,
) -> Iterator[TopologyFactory]:
    started: list[Nginx] = []

    def build(store_url: str) -> Topology:
        config = default_config(mock_upstream, store_url=store_url)
        replicas = [gateway_factory(config) for _ in range(REPLICAS)]
        port = free_port()
        conf = render_nginx_conf(
            NGINX_CONF.read_text(encoding="utf-8"),
            port=port,
            replicas=[gw.port for gw in replicas],
            prefix=tmp_path / "nginx",
        )
        nginx = Nginx(nginx_executable, tmp_path / "nginx", conf, port)
        started.append(nginx)
        nginx.start()
        return Topology(replicas, nginx, mock_upstream)

    yield build
    for nginx in started:
        nginx.stop()
        print(nginx.logs())


@pytest.fixture
def topology(topology_factory: TopologyFactory, redis_url: str) -> Topology:
    return topology_factory(redis_url)


# -- (a) the official SDK through nginx ------------------------------------------------------------


@pytest.mark.redis
def test_sdk_chat_stream_and_embeddings_through_nginx(topology: Topology) -> None:
    client = topology.client()

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-mini",
        messages=[{"role": "user", "content": "hello through nginx"}],
        extra_headers={"X-Request-Id": "topo-chat-1"},
    )
    assert raw.headers["x-request-id"] == "topo-chat-1"  # the client's id, through nginx and back
    assert raw.parse().choices[0].message.content == "echo: hello through nginx"

    chunks, delay = 6, 0.25
    behaviour = topology.mock.behave(model="mock-gpt-upstream", chunks=chunks, chunk_delay=delay)
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    done_at_first_chunk = None
    usage = None
    finish = None
    with client.chat.completions.create(
        model="gpt-mini",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            content = chunk.choices[0].delta.content
            if content:
                if not arrivals:
                    # Still streaming upstream when the first piece reached us: nothing buffered.
                    done_at_first_chunk = behaviour.completed.is_set()
                arrivals.append((time.monotonic(), content))
    assert [text for _, text in arrivals] == [f"chunk{i} " for i in range(chunks)]
    assert finish == "stop" and usage is not None and usage.completion_tokens == chunks
    assert done_at_first_chunk is False, "the first chunk arrived only after the upstream had sent the last"
    span = (chunks - 1) * delay
    assert arrivals[0][0] - started < span / 2, "first chunk was held back"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert arrivals[-1][0] - arrivals[0][0] >= 0.6 * span, f"chunks arrived in a burst: gaps {gaps}"
    assert min(gaps) > delay / 5, f"chunks arrived together: gaps {gaps}"

    embeddings = client.embeddings.create(model="emb", input=["alpha", "beta"])
    assert [d.embedding for d in embeddings.data] == [embedding_vector("alpha"), embedding_vector("beta")]


@pytest.mark.redis
def test_request_id_is_nginx_s_when_the_client_sends_none(topology: Topology) -> None:
    with topology.http() as http:
        answer = http.post("/v1/chat/completions", json=CHAT)
        bad = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "not a valid id!"})
    assert answer.status_code == 200 and bad.status_code == 200
    for response in (answer, bad):
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)  # nginx's $request_id

        def in_nginx_log(rid: str = request_id) -> bool:
            return any(e["request_id"] == rid for e in topology.nginx.access_entries())

        def in_replica_log(rid: str = request_id) -> bool:
            return any(e["request_id"] == rid for gw in topology.replicas for e in access_lines(gw))

        assert wait_until(in_nginx_log), "nginx logged another id than it answered with"
        assert wait_until(in_replica_log), "the replica logged another id than nginx"


# -- (b) balancing ---------------------------------------------------------------------------------


@pytest.mark.redis
def test_requests_are_spread_over_every_replica(topology: Topology) -> None:
    client = topology.client()
    total = 30
    before_connections = connections_to([gw.port for gw in topology.replicas])
    for i in range(total):
        answer = client.chat.completions.create(
            model="gpt-mini", messages=[{"role": "user", "content": f"n{i}"}]
        )
        assert answer.choices[0].message.content == f"echo: n{i}"
    assert wait_until(lambda: sum(chat_counts(topology)) == total), chat_counts(topology)
    counts = chat_counts(topology)
    assert all(c >= total // REPLICAS // 2 for c in counts), f"uneven spread: {counts}"
    # nginx agrees on who answered.
    upstreams = Counter(
        e["upstream"] for e in topology.nginx.access_entries() if e["uri"] == "/v1/chat/completions"
    )
    assert set(upstreams) == set(topology.replica_by_port())
    # HTTP/1.1 keep-alive upstream: a few connections per replica carried all 30 requests.
    opened = connections_to([gw.port for gw in topology.replicas]) - before_connections
    assert len(opened) <= 2 * REPLICAS, f"{len(opened)} upstream connections for {total} requests"

    # Concurrent streams: least_conn gives each replica its share of the open connections.
    topology.mock.behave(model="mock-gpt-upstream", chunks=5, chunk_delay=0.3)
    before = chat_counts(topology)

    def stream(i: int) -> str:
        with (
            topology.client() as c,
            c.chat.completions.create(
                model="gpt-mini", messages=[{"role": "user", "content": f"s{i}"}], stream=True
            ) as s,
        ):
            return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    with ThreadPoolExecutor(2 * REPLICAS) as pool:
        texts = list(pool.map(stream, range(2 * REPLICAS)))
    assert texts == ["chunk0 chunk1 chunk2 chunk3 chunk4 "] * (2 * REPLICAS)
    assert wait_until(lambda: sum(chat_counts(topology)) == total + 2 * REPLICAS)
    added = [after - b for after, b in zip(chat_counts(topology), before, strict=True)]
    assert added == [2] * REPLICAS, f"concurrent streams per replica: {added}"


# -- (c) keys across replicas ------------------------------------------------------------------------


def chat_status(base_url: str, secret: str) -> int:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as c:
        return c.post("/v1/chat/completions", json=CHAT).status_code


@pytest.mark.redis
def test_admin_key_via_nginx_works_everywhere_and_revoke_is_immediate(topology: Topology) -> None:
    with topology.http(api_key=ADMIN_KEY) as admin:
        made = admin.post("/admin/keys", json={"name": "svc-topology", "models": ["gpt-*"]})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["propagation"] == {"replicas": REPLICAS, "applied": REPLICAS}
    secret, key_id = body["secret"], body["id"]

    # At once, on every replica directly and through nginx (which spreads over all three).
    assert [chat_status(gw.url, secret) for gw in topology.replicas] == [200] * REPLICAS
    assert [chat_status(topology.url, secret) for _ in range(REPLICAS)] == [200] * REPLICAS

    with topology.http(api_key=ADMIN_KEY) as admin:
        revoked = admin.delete(f"/admin/keys/{key_id}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["propagation"]["applied"] == REPLICAS
    # The very next request, through nginx and on each replica, is refused.
    assert chat_status(topology.url, secret) == 401
    with ThreadPoolExecutor(REPLICAS) as pool:
        statuses = list(pool.map(lambda gw: chat_status(gw.url, secret), topology.replicas))
    assert statuses == [401] * REPLICAS
    assert [chat_status(topology.url, secret) for _ in range(REPLICAS)] == [401] * REPLICAS

    logs = "".join(gw.log_text() for gw in topology.replicas) + topology.nginx.logs()
    logs += topology.nginx.access_log.read_text(errors="replace")
    assert secret not in logs and ADMIN_KEY not in logs


# -- (d) a replica dies under load --------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    started: float
    ended: float
    status: int | None  # None: the client saw a transport error
    code: str | None


@pytest.mark.redis
def test_killing_a_replica_under_load(topology: Topology) -> None:
    total, pace, kill_at, settle_s = 60, 0.075, 16, 2.0
    # Each answer takes a moment, so some requests are in flight on the replica when it dies.
    topology.mock.behave(model="mock-gpt-upstream", delay_head=0.15)
    # One long stream per replica (least_conn on an idle cluster), still running at the kill.
    stream_chunks = 12
    streams = topology.mock.behave(model="mock-gpt-secret", chunks=stream_chunks, chunk_delay=0.2)
    victim = topology.replicas[0]
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(http: httpx.Client, i: int) -> None:
        started = time.monotonic()
        status = code = None
        try:
            response = http.post(
                "/v1/chat/completions",
                json={"model": "gpt-mini", "messages": [{"role": "user", "content": f"kill-test {i}"}]},
            )
            status = response.status_code
            if status != 200:
                code = response.json()["error"]["code"]
        except httpx.HTTPError:
            pass
        with lock:
            outcomes.append(Outcome(i, started, time.monotonic(), status, code))

    def stream(i: int) -> str | None:
        """The streamed text, or None when the stream broke."""
        try:
            with (
                topology.client(api_key=TEAM_B_KEY) as client,
                client.chat.completions.create(
                    model="gpt-secret", messages=[{"role": "user", "content": f"stream {i}"}], stream=True
                ) as chunks,
            ):
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except (openai.APIError, httpx.HTTPError):
            return None

    kill_time = 0.0
    with ThreadPoolExecutor(REPLICAS) as stream_pool:
        stream_results = [stream_pool.submit(stream, i) for i in range(REPLICAS)]
        assert wait_until(lambda: streams.hits >= REPLICAS), "the streams did not start"
        with topology.http(timeout=10) as http, ThreadPoolExecutor(8) as pool:
            t0 = time.monotonic()
            for i in range(total):
                time.sleep(max(0.0, t0 + i * pace - time.monotonic()))
                if i == kill_at:
                    victim.proc.send_signal(signal.SIGKILL)
                    victim.proc.wait(5)
                    kill_time = time.monotonic()
                pool.submit(one, http, i)
        texts = [future.result(timeout=30) for future in stream_results]
    assert len(outcomes) == total
    outcomes.sort(key=lambda o: o.index)
    failed = [o for o in outcomes if o.status != 200]
    report = [(o.index, round(o.started - kill_time, 3), o.status, o.code) for o in failed]

    assert len(failed) <= total * 0.05, f"too many failures (index, start - kill, status, code): {report}"
    late = [o for o in outcomes if o.started >= kill_time + settle_s]
    assert len(late) >= 10, "the run did not go on long enough after the kill"
    assert all(o.status == 200 for o in late), f"failures after the topology settled: {report}"
    # A request cut off on the dead replica is nginx's 502 (not retried: POST), never a hang.
    assert all(o.status == 502 and o.code == "gateway_unavailable" for o in failed), report
    # The stream on the dead replica broke (the client sees an error, not a silent end); the
    # streams on the others were untouched.
    whole = "".join(f"chunk{i} " for i in range(stream_chunks))
    assert sorted(texts, key=lambda text: text is not None) == [None] + [whole] * (REPLICAS - 1), texts
    # Nothing was sent upstream twice: no POST was replayed onto another replica.
    sent = Counter(
        r.json()["messages"][0]["content"] for r in topology.mock.requests_to("/v1/chat/completions")
    )
    assert max(sent.values()) == 1, [k for k, v in sent.items() if v > 1]
    # The survivors took the rest.
    assert all(len(access_lines(gw, "/v1/chat/completions")) > 0 for gw in topology.replicas[1:])

    # With every replica gone, nginx answers itself, in OpenAI's shape, with the request id.
    for gw in topology.replicas[1:]:
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(5)
    with topology.http() as http:
        answer = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "topo-all-down"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "gateway_unavailable"
    assert answer.headers["x-request-id"] == "topo-all-down"


# -- (e) readiness, and whose errors are whose ------------------------------------------------------


@pytest.mark.redis
def test_readyz_through_nginx_follows_the_store(
    topology_factory: TopologyFactory, spawn_redis: Callable[[], RedisServer]
) -> None:
    redis_server = spawn_redis()
    topology = topology_factory(redis_server.url)
    with topology.http(api_key=None) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"

        redis_server.stop()
        not_ready = http.get("/readyz")
        # The replica's own 503, passed through as it is (nginx neither retries nor rewrites it).
        assert not_ready.status_code == 503
        assert not_ready.json()["error"]["code"] == "service_unavailable"
        assert "x-request-id" in not_ready.headers
        assert http.get("/healthz").status_code == 200  # alive, just not ready

        redis_server.start()  # same port
        assert wait_until(lambda: http.get("/readyz").status_code == 200, timeout=10)
        assert all(http.get("/readyz").status_code == 200 for _ in range(REPLICAS))


@pytest.mark.redis
def test_errors_through_nginx(topology: Topology) -> None:
    with topology.http() as http:
        # The gateway's 502 (upstream down) passes through untouched, not nginx's own.
        dead = http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-dead"})
        assert dead.status_code == 502 and dead.json()["error"]["code"] == "upstream_unavailable"

        # Over server.max_body_bytes: nginx refuses it in the gateway's own 413 shape.
        limit = 1048576
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * limit}]}).encode()
        refused = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
        with httpx.Client(base_url=topology.replicas[0].url, timeout=20) as direct:
            own = direct.post(
                "/v1/chat/completions",
                content=big,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {TEAM_A_KEY}"},
            )
        assert refused.status_code == own.status_code == 413
        assert refused.json()["error"]["code"] == own.json()["error"]["code"] == "request_too_large"
        assert refused.json()["error"]["type"] == own.json()["error"]["type"]
        assert refused.json()["error"]["message"] == own.json()["error"]["message"]

        # Just under the limit goes through nginx to a replica and upstream.
        text = "y" * (limit - 200)
        fits = json.dumps({**CHAT, "messages": [{"role": "user", "content": text}]}).encode()
        assert len(fits) <= limit
        ok = http.post("/v1/chat/completions", content=fits, headers={"Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "echo: " + text


# -- the deployment files agree with each other ------------------------------------------------------

COMPOSE_ENV = {
    "GATEWAY_ADMIN_KEY": "adm-compose-check-0123456789",
    "GATEWAY_HASH_SECRET": "compose-check-hash-secret-0123456789abcdef",
    "GATEWAY_KEY": "sk-compose-check-0123456789",
}


def nginx_directive(name: str) -> list[str]:
    text = NGINX_CONF.read_text(encoding="utf-8")
    return re.findall(rf"^\s*{name}\s+([^;{{]+);", text, flags=re.M)


def size_bytes(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


def test_compose_file_matches_nginx_and_config() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    services = compose["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    assert gateways == [f"gateway-{i}" for i in range(1, REPLICAS + 1)]
    servers = [line.split()[0] for line in nginx_directive("server")]
    assert servers == [f"{name}:8080" for name in gateways], "nginx upstream != compose replicas"

    assert "healthcheck" in services["redis"]
    for name in gateways:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in service["volumes"]]
        assert any(m.startswith("./deploy/config.compose.yaml:/etc/gateway/config.yaml") for m in mounts)
        assert "ports" not in service, "replicas are reached through nginx only"
        env = service["environment"]
        for var in COMPOSE_ENV:
            assert var in env, f"{name} does not pass {var}"
    nginx = services["nginx"]
    assert any(str(p).endswith(":8080") for p in nginx["ports"])
    assert any("./deploy/nginx.conf:/etc/nginx/nginx.conf" in str(v) for v in nginx["volumes"])
    # nginx resolves the replicas' names once, at start: it must start after them.
    assert all(nginx["depends_on"][g]["condition"] == "service_healthy" for g in gateways)

    # The compose config is valid with only the variables compose passes.
    text = COMPOSE_CONFIG.read_text(encoding="utf-8")
    config = config_module.parse(text, env=COMPOSE_ENV)
    assert config.store.url == "redis://redis:6379/0"
    assert config.auth.hash_secret == COMPOSE_ENV["GATEWAY_HASH_SECRET"]
    assert not any(s in text for s in COMPOSE_ENV.values())
    # nginx's limits line up with the gateway's.
    (max_body,) = nginx_directive("client_max_body_size")
    assert size_bytes(max_body) == config.server.max_body_bytes
    assert f"limit of {config.server.max_body_bytes} bytes" in NGINX_CONF.read_text(encoding="utf-8")
    (read_timeout,) = nginx_directive("proxy_read_timeout")
    timeouts = config.router.timeouts
    assert int(read_timeout.rstrip("s")) >= max(timeouts.first_byte_s, timeouts.idle_s)


def test_k8s_manifests_are_consistent() -> None:
    docs = [
        doc
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "gateway"]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == REPLICAS
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "gateway"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"requests", "limits"} <= container["resources"].keys()
    pod_security = spec["template"]["spec"].get("securityContext", {})
    assert container["securityContext"].get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True

    # The ConfigMap's config is valid with the variables the Deployment sets.
    (configmap,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "gateway-config"]

    def sample(var: dict[str, Any]) -> str:
        if "value" in var:
            return str(var["value"])
        if var["name"].endswith("STORE_URL"):
            return "redis://redis:6379/0"
        return "http://upstream.invalid/v1" if var["name"].endswith("_URL") else "x" * 40

    env = {var["name"]: sample(var) for var in container.get("env", [])}
    secret_refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secret_refs, "the keys come from a Secret"
    config = config_module.parse(configmap["data"]["config.yaml"], env=env)
    assert config.store.url.startswith(("redis://", "rediss://"))
    assert config.server.host == "0.0.0.0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/gateway" in mounts or "/etc/gateway/config.yaml" in mounts

    for kind in ("Service", "PodDisruptionBudget"):
        selectors = [d["spec"]["selector"] for d in by_kind[kind] if d["metadata"]["name"] == "gateway"]
        assert selectors, f"no {kind} named gateway"
        selector = selectors[0].get("matchLabels", selectors[0])
        assert selector.items() <= labels.items(), f"{kind} selects no gateway pod"


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2, "multi-stage"
    assert re.search(r"pip install[^\n]*-c constraints\.txt \.", text)
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthcheck = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*", text, flags=re.M)  # with its continuation lines
    assert healthcheck and "urllib" in healthcheck[0] and "/healthz" in healthcheck[0]
    assert re.search(r"^EXPOSE 8080$", text, flags=re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    assert cmd and json.loads(cmd[1]) == [
        "gateway",
        "serve",
        "--config",
        "/etc/gateway/config.yaml",
        "--host",
        "0.0.0.0",
    ]
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored or ".venv/" in ignored
    assert not {"gateway", "pyproject.toml", "constraints.txt", "README.md"} & set(ignored)


def test_the_observability_profile_scrapes_every_replica_and_provisions_the_dashboard() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    services = compose["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    profiled = {name for name, s in services.items() if "observability" in s.get("profiles", ())}
    assert profiled == {"prometheus", "grafana", "jaeger"}  # `docker compose up` alone starts none
    # Prometheus scrapes each replica itself, never nginx (one scrape = one replica).
    prometheus_yml = ROOT / "deploy" / "prometheus.yml"
    scrape = yaml.safe_load(prometheus_yml.read_text(encoding="utf-8"))
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"{g}:8080" for g in gateways]
    assert any(
        "deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in v for v in services["prometheus"]["volumes"]
    )
    promtool = debian_executable("promtool", "prometheus")
    checked = subprocess.run(
        [promtool, "check", "config", str(prometheus_yml)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Grafana gets the data source and the dashboard the metrics tests check.
    mounts = services["grafana"]["volumes"]
    assert (
        "./deploy/grafana/gateway-dashboard.json:/var/lib/grafana/dashboards/gateway-dashboard.json:ro"
        in mounts
    )
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "gateway.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    # Traces: the replicas take the standard OTLP variable, empty (off) unless .env sets it.
    for name in gateways:
        assert (
            services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
        )
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    # The UIs have no auth of their own: published on loopback only.
    for name in profiled:
        assert all(str(p).startswith("127.0.0.1:") for p in services[name].get("ports", ()))


def test_k8s_pods_carry_the_scrape_annotations() -> None:
    deployment = yaml.safe_load((K8S_DIR / "deployment.yaml").read_text(encoding="utf-8"))
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) in ports
