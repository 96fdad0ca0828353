"""Gateway replicas under steady load while the store's topology changes under them.

Real processes throughout: Redis Cluster (3+3) or Sentinel (1 primary, 2 replicas, 3 sentinels)
set-ups of their own, two uvicorn gateways, a few clients posting for the whole test. A
primary (the one that served most commands, or Sentinel's) is SIGKILLed or SIGSTOPped (hung),
or the slots holding state are migrated to other primaries. Nothing here reads the gateway's key layout: the
victim is found by the nodes' own command counts, the slots to move by the keys they hold,
and whether the gateway is back on the store by its access log, which names the
requests it decided without the store.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import RedisServer
from tests.e2e.conftest import TEAM_A_KEY, TEAM_B_KEY, GatewayProcess, default_config
from tests.mock_openai import MockOpenAI
from tests.redis_setups import SERVICE, ClusterSetup, SentinelSetup

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

STORE_TIMEOUT_S = 0.5
PROMOTED_WITHIN_S = 30.0  # the set-up's own failover (cluster-node-timeout 2 s, down-after 1 s), bounded
RECOVERED_WITHIN_S = 5.0  # the bound, from the promotion
# A request touches the store a few times in sequence (admission, cache claim, fill), each bounded by
# the store timeout plus one reconnect; far below the client's own 20 s, so a hang shows.
REQUEST_BOUND_S = 12 * STORE_TIMEOUT_S
LOAD_CLIENTS = 4
LOAD_PAUSE_S = 0.03  # between one client's requests: ~100 requests/s in all, a few hundred per phase
LOAD_CAP = 3000  # requests in all, whatever happens


# Under each outage policy a killed primary (its port refuses connections); with `open`, a hung one
# too (it accepts connections and never answers: only timeouts tell, and nothing redirects).
LOST_PRIMARY = pytest.mark.parametrize(
    ("policy", "failure"),
    [("open", signal.SIGKILL), ("closed", signal.SIGKILL), ("open", signal.SIGSTOP)],
    ids=["open-killed", "closed-killed", "open-hung"],
)


@dataclass(frozen=True)
class Answer:
    request_id: str
    started: float
    elapsed: float
    status: int
    code: str | None  # the OpenAI error code, for a refusal


class Load:
    """`LOAD_CLIENTS` threads posting through the replicas in turn, each prompt new (a cache miss that
    claims and fills an entry), until stopped or `LOAD_CAP` requests in all."""

    def __init__(self, replicas: tuple[GatewayProcess, ...]) -> None:
        self.replicas = replicas
        self.answers: list[Answer] = []
        self.started = 0  # requests sent so far, answered or not
        self._stop = threading.Event()
        self._numbers = itertools.count()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(LOAD_CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, index: int) -> None:
        clients = [gw.http(api_key=TEAM_A_KEY, timeout=20) for gw in self.replicas]
        try:
            while not self._stop.is_set() and (n := next(self._numbers)) < LOAD_CAP:
                body = {
                    "model": "gpt-mini",
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"load {index} {n}"}],
                }
                request_id = f"load-{n}"
                started = time.monotonic()
                self.started += 1
                try:
                    r = clients[n % len(clients)].post(
                        "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
                    )
                    status, code = r.status_code, (r.json().get("error") or {}).get("code")
                except httpx.HTTPError as exc:
                    status, code = 0, type(exc).__name__  # no answer at all: a failure the test reports
                self.answers.append(Answer(request_id, started, time.monotonic() - started, status, code))
                self._stop.wait(LOAD_PAUSE_S)
        finally:
            for client in clients:
                client.close()

    def wait_started(self, count: int, timeout: float = 30) -> None:
        """Until `count` more requests were sent, or every client has one in flight (bounded)."""
        target = self.started + count
        deadline = time.monotonic() + timeout
        while self.started < target and self.started - len(self.answers) < LOAD_CLIENTS:
            assert time.monotonic() < deadline, f"the load stalled at {self.started} requests"
            time.sleep(0.001)

    def wait_for(self, count: int, timeout: float = 30) -> None:
        """Until `count` more answers came back (bounded)."""
        target = len(self.answers) + count
        deadline = time.monotonic() + timeout
        while len(self.answers) < target:
            assert time.monotonic() < deadline, f"the load stalled at {len(self.answers)} answers"
            time.sleep(0.01)


def served_without_store(gw: GatewayProcess) -> int:
    """Requests whose limits or cache this replica decided without the store, so far."""
    with gw.http() as c:
        counts = c.get("/health/store").json()["decided_without_store"]
    return int(counts["limits"]) + int(counts["cache"])


def decided_without_store(replicas: tuple[GatewayProcess, ...]) -> set[str]:
    """The request ids whose limits or cache a replica decided without the store (its access log)."""
    ids = set()
    for gw in replicas:
        for line in gw.log_text().splitlines():
            _, found, entry = line.partition(" gateway.access: ")
            if found and "without_store" in (record := json.loads(entry)):
                ids.add(record["request_id"])
    return ids


def assert_back_on_the_store(load: Load, replicas: tuple[GatewayProcess, ...], promoted_at: float) -> None:
    """Some requests went without the store (the failure was felt), and every request sent from
    `RECOVERED_WITHIN_S` after the promotion on was decided on the store and served."""
    degraded = decided_without_store(replicas)
    assert degraded, "no request felt the failure: it did not hit the load"
    late = [a for a in load.answers if a.started >= promoted_at + RECOVERED_WITHIN_S]
    assert len(late) >= 40  # most of the 60 answers awaited after the bound
    wrong = [a for a in late if a.status != 200 or a.request_id in degraded]
    assert not wrong, f"{len(wrong)} of {len(late)} requests after the recovery bound went wrong: {wrong[:3]}"


def recover_under_load(load: Load, promoted_at: float) -> None:
    """Keep the load on until the recovery bound has passed, then for 60 more answers."""
    time.sleep(max(0.0, promoted_at + RECOVERED_WITHIN_S - time.monotonic()))  # a span, not a race
    load.wait_for(60)


def failover_config(mock: MockOpenAI, url: str, policy: str) -> dict[str, Any]:
    config = default_config(mock, store_url=url)
    config["store"] = {
        "url": url,
        "timeout_s": STORE_TIMEOUT_S,
        "outage": {"limits": policy, "cache": policy},
    }
    config["cache"] = {"enabled": True, "ttl_s": 60}
    config["auth"]["keys"][0]["limits"] = {"rpm": 100_000}  # counted on every request, never reached
    config["auth"]["keys"][1]["limits"] = {"rpm": 20}  # the exactness check after recovery
    return config


def assert_served_within_policy(answers: list[Answer], policy: str) -> None:
    assert answers, "no request was made"
    slowest = max(answer.elapsed for answer in answers)
    assert slowest < REQUEST_BOUND_S, f"a request took {slowest:.2f} s"
    allowed = {(200, None)} | (
        {(503, "limits_unavailable"), (503, "cache_unavailable")} if policy == "closed" else set()
    )
    wrong = [answer for answer in answers if (answer.status, answer.code) not in allowed]
    assert not wrong, f"{len(wrong)} answers outside the outage policy {policy!r}, e.g. {wrong[:3]}"


def assert_exact_again(replicas: tuple[GatewayProcess, ...]) -> None:
    """Team B's 20 rpm over both replicas: exactly 20 of 30 admitted, so counted on the store
    (each replica counting alone would admit up to 40)."""
    statuses = []
    for i in range(30):
        with replicas[i % len(replicas)].http(api_key=TEAM_B_KEY) as c:
            body = {"model": "gpt-mini", "messages": [{"role": "user", "content": "exact"}]}
            statuses.append(c.post("/v1/chat/completions", json=body).status_code)
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses


def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """When `condition` first held, polled every 20 ms up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic()


def commands_processed(node: RedisServer) -> int:
    with node.client() as client:
        return int(client.info("stats")["total_commands_processed"])


def node_id(node: RedisServer) -> str:
    with node.client() as client:
        ident = client.cluster("myid")
    return ident.decode() if isinstance(ident, bytes) else str(ident)


def is_primary(node: RedisServer) -> bool:
    try:
        with node.client() as client:
            return bool(client.info("replication")["role"] == "master")
    except (redis.RedisError, OSError):
        return False


@pytest.fixture
def replica_pair(
    gateway_factory: Any, mock_upstream: MockOpenAI
) -> Callable[..., tuple[GatewayProcess, ...]]:
    def start(url: str, policy: str) -> tuple[GatewayProcess, ...]:
        config = failover_config(mock_upstream, url, policy)
        return gateway_factory(config), gateway_factory(config)

    return start


@LOST_PRIMARY
def test_cluster_primary_of_the_busiest_slot_lost_under_load(
    spawn_cluster_setup: Callable[[], ClusterSetup], replica_pair: Any, policy: str, failure: signal.Signals
) -> None:
    setup = spawn_cluster_setup()
    replicas = replica_pair(setup.url, policy)
    primaries = setup.primaries()
    before = {node.port: commands_processed(node) for node in primaries}
    with Load(replicas) as load:
        load.wait_for(60)
        busiest = max(primaries, key=lambda node: commands_processed(node) - before[node.port])
        victim_id = node_id(busiest)
        [heir] = [node for node in setup.nodes if node.port not in before and _replica_of(node, victim_id)]
        assert busiest.process is not None
        busiest.process.send_signal(failure)  # the set-up's teardown SIGKILLs it, stopped or not
        promoted_at = poll(lambda: is_primary(heir), PROMOTED_WITHIN_S, "the replica's promotion")
        recover_under_load(load, promoted_at)
    assert_served_within_policy(load.answers, policy)
    assert_back_on_the_store(load, replicas, promoted_at)
    assert_exact_again(replicas)


def _replica_of(node: RedisServer, primary_id: str) -> bool:
    with node.client() as client:
        replication = client.info("replication")
        if replication["role"] != "slave":
            return False
        line = next(line for line in client.cluster("nodes").values() if "myself" in line["flags"])
    return bool(line["master_id"] == primary_id)


@LOST_PRIMARY
def test_sentinel_primary_lost_under_load(
    spawn_sentinel_setup: Callable[..., SentinelSetup],
    replica_pair: Any,
    policy: str,
    failure: signal.Signals,
) -> None:
    setup = spawn_sentinel_setup()
    replicas = replica_pair(setup.url, policy)
    old = setup.primary()

    def named_elsewhere() -> bool:
        for port in setup.sentinel_ports:
            try:
                with setup.sentinel(port) as sentinel:
                    if int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1]) != old.port:
                        return True
            except (redis.RedisError, OSError):
                continue
        return False

    with Load(replicas) as load:
        load.wait_for(60)
        assert old.process is not None
        old.process.send_signal(failure)  # the set-up's teardown SIGKILLs it, stopped or not
        promoted_at = poll(named_elsewhere, PROMOTED_WITHIN_S, "a sentinel naming the new primary")
        recover_under_load(load, promoted_at)
    assert_served_within_policy(load.answers, policy)
    assert_back_on_the_store(load, replicas, promoted_at)
    assert_exact_again(replicas)


def test_slots_migrated_under_load_fail_no_request(
    spawn_cluster_setup: Callable[[], ClusterSetup], gateway_factory: Any, mock_upstream: MockOpenAI
) -> None:
    """The busiest slots (most keys after a warm-up) move to another primary as a resharding tool
    moves them, with requests sent at every stage; `closed` policy, so a failed store call
    would be a 503. The limits' admissions and settlements, the cache's scripts (claims, fills)
    and gets run throughout: every script names all of its keys, so a migrating slot redirects
    it (ASK, TRYAGAIN) before it runs."""
    setup = spawn_cluster_setup()
    config = failover_config(mock_upstream, setup.url, "closed")
    replicas = gateway_factory(config), gateway_factory(config)
    primaries = setup.primaries()
    ids = {node.port: node_id(node) for node in primaries}
    with Load(replicas) as load:
        load.wait_for(40)
        moves = [
            (slot, count, source) for source in primaries for slot, count in _slots_with_keys(source).items()
        ]
        assert moves, "no state in the cluster after the warm-up"
        moves.sort(key=lambda move: -move[1])
        for slot, _, source in moves[:6]:
            target = next(node for node in primaries if node is not source)
            for _ in _migrate(slot, source, target, ids, primaries):
                # Requests are in flight at every stage. Not waiting for answers: a script on new
                # keys is answered TRYAGAIN until the slot has moved, so every client may be held.
                load.wait_started(2)
        load.wait_for(40)
    assert {(a.status, a.code) for a in load.answers} == {(200, None)}  # none failed, none refused
    assert max(a.elapsed for a in load.answers) < REQUEST_BOUND_S
    assert [served_without_store(gw) for gw in replicas] == [0, 0]


def _slots_with_keys(node: RedisServer) -> dict[int, int]:
    """Slot -> number of keys, of the keys `node` holds."""
    counts: dict[int, int] = {}
    with node.client() as client:
        for key in client.scan_iter(count=1000):
            slot = int(client.cluster("keyslot", key))
            counts[slot] = counts.get(slot, 0) + 1
    return counts


def _migrate(
    slot: int, source: RedisServer, target: RedisServer, ids: dict[int, str], primaries: list[RedisServer]
) -> Iterator[None]:
    """Move `slot` as `redis-cli --cluster reshard` does (keys in batches of 10), yielding while it is
    marked migrating, once its keys are split between the nodes, and once they have all moved; the
    stages last only as long as the caller's wait, well within the store timeout."""
    with source.client() as s, target.client() as t:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
        yield
        batches = 0
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            s.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            batches += 1
            if batches == 1:
                yield
        yield
        for node in (target, source, *(p for p in primaries if p not in (source, target))):
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
