"""Two real gateway processes share the response cache and its flights, on one real redis-server and
on a real 3-primary Redis Cluster (where entries and flights spread over the primaries)."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.conftest import ADMIN_KEY, TEAM_A_KEY, default_config
from tests.mock_openai import MockOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

BODY = {"model": "gpt-mini", "temperature": 0, "messages": [{"role": "user", "content": "shared answer"}]}


def test_answer_cached_on_a_is_a_hit_on_b_until_purged(
    gateway_factory: Any, mock_upstream: MockOpenAI, shared_store_url: str
) -> None:
    config = default_config(mock_upstream, store_url=shared_store_url)
    config["cache"] = {"enabled": True, "ttl_s": 60}
    a, b = gateway_factory(config), gateway_factory(config)
    with a.http(api_key=TEAM_A_KEY, timeout=10) as ca, b.http(api_key=TEAM_A_KEY, timeout=10) as cb:
        first = ca.post("/v1/chat/completions", json=BODY)
        assert first.headers["x-cache"] == "miss"
        for _ in range(50):  # the fill lands just after the answer
            hit = cb.post("/v1/chat/completions", json=BODY)
            if hit.headers["x-cache"] == "hit":
                break
            time.sleep(0.02)
        assert hit.headers["x-cache"] == "hit" and hit.json() == first.json()
        with a.http(api_key=ADMIN_KEY, timeout=10) as admin:
            assert admin.post("/admin/cache/purge", json={"model": "gpt-mini"}).status_code == 200
        for _ in range(50):  # B learns the new generation by pub/sub
            if cb.post("/v1/chat/completions", json=BODY).headers["x-cache"] == "miss":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("B still served the purged entry")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_identical_requests_across_replicas_make_one_upstream_call(
    gateway_factory: Any, mock_upstream: MockOpenAI, shared_store_url: str, stream: bool
) -> None:
    config = default_config(mock_upstream, store_url=shared_store_url)
    config["cache"] = {"enabled": True, "ttl_s": 60}
    replicas = gateway_factory(config), gateway_factory(config)
    if stream:
        mock_upstream.behave(chunks=8, chunk_delay=0.1)  # a stream of ~0.9 s
    else:
        mock_upstream.behave(delay_head=0.5)
    body = {**BODY, "messages": [{"role": "user", "content": f"together, stream={stream}"}], "stream": stream}

    def ask(i: int) -> tuple[str, bytes, float, float]:
        client = replicas[i % 2].http(api_key=TEAM_A_KEY, timeout=10)
        with client, client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            first = 0.0
            content = b""
            for chunk in r.iter_bytes():
                first = first or time.monotonic()
                content += chunk
            return r.headers["x-cache"], content, first, time.monotonic()

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, range(10)))
    assert len(mock_upstream.requests) == 1
    assert sorted(cache for cache, *_ in answers) == ["hit"] * 9 + ["miss"]
    assert all(content == answers[0][1] for _, content, *_ in answers)
    if stream:
        assert answers[0][1].endswith(b"data: [DONE]\n\n") and b"chunk7" in answers[0][1]
        [leader_end] = [end for cache, _, _, end in answers if cache == "miss"]
        # Followers on both replicas were relayed the stream while it was produced, not after.
        assert all(first < leader_end - 0.4 for cache, _, first, _ in answers if cache == "hit")
    else:
        assert orjson.loads(answers[0][1])["object"] == "chat.completion"


def test_leader_replica_dies_and_a_follower_on_the_other_takes_over(
    gateway_factory: Any, mock_upstream: MockOpenAI, shared_store_url: str
) -> None:
    config = default_config(mock_upstream, store_url=shared_store_url)
    config["cache"] = {"enabled": True, "ttl_s": 60, "coalesce_lease_s": 1}
    a, b = gateway_factory(config), gateway_factory(config)
    mock_upstream.behave(chunks=20, chunk_delay=0.2, times=1)  # the first call: a 4 s stream
    content = "the leader will not make it"
    body = {**BODY, "messages": [{"role": "user", "content": content}]}

    def ask(gateway: Any, stream: bool) -> httpx.Response:
        with gateway.http(api_key=TEAM_A_KEY, timeout=15) as client:
            return client.post("/v1/chat/completions", json={**body, "stream": stream})

    with ThreadPoolExecutor(5) as pool:
        leader = pool.submit(ask, a, True)
        mock_upstream.wait_for_requests(1, 5)
        followers = [pool.submit(ask, b, False) for _ in range(4)]
        time.sleep(0.5)
        a.proc.kill()  # mid-stream: its lease is never renewed nor released
        answers = [f.result() for f in followers]
        with contextlib.suppress(httpx.HTTPError):
            leader.result()
    assert all(r.status_code == 200 for r in answers)
    assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {f"echo: {content}"}
    assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 3 + ["miss"]
    assert len(mock_upstream.requests) == 2


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_killed_mid_run(
    gateway_factory: Any, mock_upstream: MockOpenAI, spawn_redis: Any, policy: str
) -> None:
    server = spawn_redis()
    config = default_config(mock_upstream, store_url=server.url)
    config["store"] = {"url": server.url, "timeout_s": 0.5, "outage": {"cache": policy}}
    config["cache"] = {"enabled": True, "ttl_s": 60}
    a, b = gateway_factory(config), gateway_factory(config)
    with a.http(api_key=TEAM_A_KEY, timeout=10) as ca, b.http(api_key=TEAM_A_KEY, timeout=10) as cb:
        assert ca.post("/v1/chat/completions", json=BODY).headers["x-cache"] == "miss"
        server.stop()
        started = time.monotonic()
        during = [c.post("/v1/chat/completions", json=BODY) for c in (ca, cb, ca, cb)]
        assert time.monotonic() - started < 8  # each bounded by the store timeout, none hangs
        if policy == "open":
            assert [(r.status_code, r.headers["x-cache"]) for r in during] == [(200, "miss")] * 4
        else:
            assert [r.status_code for r in during] == [503] * 4
            assert during[0].json()["error"]["code"] == "cache_unavailable"
        server.start()  # empty: the entry is gone with the old server
        answers = []
        for _ in range(50):  # the next request fills it, then both replicas hit
            answers.append(cb.post("/v1/chat/completions", json=BODY).headers["x-cache"])
            if answers[-2:] == ["miss", "hit"] or answers[-1:] == ["hit"]:
                break
            time.sleep(0.02)
        assert answers[-1] == "hit" and ca.post("/v1/chat/completions", json=BODY).headers["x-cache"] == "hit"
