"""Coalescing through the whole app: identical requests in flight together make one upstream call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway import build_app, parse
from gateway.cache.coalesce import Flight
from gateway.types import Message, Receive, Scope, Send
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "tell everyone the same"}]


@contextlib.asynccontextmanager
async def gateway(config_text: str, **cache: Any) -> AsyncIterator[Any]:
    settings = {"enabled": True, "ttl_s": 60, **cache}
    app = build_app(parse(config_text + f"cache: {json.dumps(settings)}\n", {}))
    async with app.lifespan(None):
        yield app


class Timed:
    """The app, noting when each answer's non-empty body chunks leave it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.answers: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer: dict[str, Any] = {"cache": b"", "times": []}
        self.answers.append(answer)

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["cache"] = dict(message["headers"]).get(b"x-cache")
            elif message.get("body"):
                answer["times"].append(time.monotonic())
            await send(message)

        await self.app(scope, receive, timed)


async def together(app: Any, n: int, **body: Any) -> list[httpx.Response]:
    body.setdefault("messages", MESSAGES)
    async with Client(app) as c:
        return list(await asyncio.gather(*(c.chat(temperature=0, **body) for _ in range(n))))


def content_of_stream(text: str) -> str:
    events = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


async def test_concurrent_json_requests_make_one_upstream_call(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(delay_head=0.3)
    async with gateway(config_text) as gw:
        answers = await together(gw, 10)
        assert len(mock.requests) == 1
        assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 9 + ["miss"]
        assert all(r.status_code == 200 and r.json() == answers[0].json() for r in answers)
        await gw.cache.flush()
        assert (await together(gw, 1))[0].headers["x-cache"] == "hit" and len(mock.requests) == 1


async def test_streaming_followers_get_chunks_as_the_leader_produces_them(
    config_text: str, mock: MockOpenAI
) -> None:
    mock.behave(chunks=8, chunk_delay=0.1)
    async with gateway(config_text) as gw:
        timed = Timed(gw)
        answers = await together(timed, 10, stream=True)
    assert len(mock.requests) == 1
    assert all(r.status_code == 200 and r.content == answers[0].content for r in answers)
    assert answers[0].text.endswith("data: [DONE]\n\n") and "error" not in answers[0].text
    assert content_of_stream(answers[0].text) == "".join(f"chunk{i} " for i in range(8))
    [leader] = [a for a in timed.answers if a["cache"] == b"miss"]
    followers = [a for a in timed.answers if a["cache"] == b"hit"]
    assert len(followers) == 9
    # The leader's stream lasts ~0.9 s: each follower had its first chunk long before it ended.
    assert all(f["times"][0] < leader["times"][-1] - 0.4 for f in followers)


async def test_streams_and_json_requests_share_one_call(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(chunks=4, chunk_delay=0.05)
    usage = {"include_usage": True}
    async with gateway(config_text) as gw, Client(gw) as c:
        leader = asyncio.ensure_future(
            c.chat(temperature=0, messages=MESSAGES, stream=True, stream_options=usage)
        )
        await asyncio.sleep(0.02)
        json_answers = await together(gw, 5)
        streamed = await leader
    assert len(mock.requests) == 1
    text = "".join(f"chunk{i} " for i in range(4))
    assert content_of_stream(streamed.text) == text
    for r in json_answers:
        assert r.headers["x-cache"] == "hit" and r.json()["object"] == "chat.completion"
        assert r.json()["choices"][0]["message"]["content"] == text
        assert r.json()["usage"]["completion_tokens"] > 0


async def test_a_stream_without_usage_leads_only_streams_without_usage(
    config_text: str, mock: MockOpenAI
) -> None:
    """Its client gets no usage event, so its flight could not give one to a request that needs it."""
    mock.behave(chunks=4, chunk_delay=0.05)
    async with gateway(config_text) as gw, Client(gw) as c:
        leader = asyncio.ensure_future(c.chat(temperature=0, messages=MESSAGES, stream=True))
        await asyncio.sleep(0.02)
        plain, with_usage, answer = await asyncio.gather(
            c.chat(temperature=0, messages=MESSAGES, stream=True),
            c.chat(temperature=0, messages=MESSAGES, stream=True, stream_options={"include_usage": True}),
            c.chat(temperature=0, messages=MESSAGES),
        )
        streamed = await leader
    assert len(mock.requests) == 2  # the leader's flight, and one flight for the two that need usage
    assert plain.headers["x-cache"] == "hit" and '"usage":{' not in plain.text
    assert '"usage":{' not in streamed.text
    assert '"choices":[],"usage":{' in with_usage.text.replace(" ", "")
    assert answer.json()["usage"]["completion_tokens"] > 0


async def test_leader_stream_breaks_followers_take_over_or_fail_cleanly(
    config_text: str, mock: MockOpenAI
) -> None:
    mock.behave(chunks=6, chunk_delay=0.05, reset_after=3, times=1)
    async with gateway(config_text) as gw, Client(gw) as c:
        leader = asyncio.ensure_future(c.chat(temperature=0, messages=MESSAGES, stream=True))
        await asyncio.sleep(0.03)
        streams, answers = await asyncio.gather(together(gw, 4, stream=True), together(gw, 5))
        broken = await leader
        await gw.cache.flush()
        assert "event: error" in broken.text
        for r in [*streams, broken]:
            # Either the whole stream or a clean error: never a truncated stream that looks complete.
            assert r.status_code == 200 and (
                r.text.endswith("data: [DONE]\n\n") != ("event: error" in r.text)
            )
        # The JSON followers had sent nothing: one took over, the others followed it.
        assert len(mock.requests) == 2
        assert all(r.status_code == 200 for r in answers)
        assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {
            "echo: tell everyone the same"
        }
        assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 4 + ["miss"]
        stored = (await together(gw, 1))[0]
        assert stored.headers["x-cache"] == "hit" and stored.json() == answers[0].json()


async def test_leader_error_is_not_passed_on(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(status=500, delay_head=0.2, times=3)  # the leader's first try and both retries
    async with gateway(config_text) as gw:
        answers = await together(gw, 6)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 5 + [500]
    assert len(mock.requests) == 4  # three for the leader, one for the follower that took over


async def test_a_dead_leaders_lease_runs_out_and_one_follower_takes_over(
    config_text: str, mock: MockOpenAI
) -> None:
    mock.behave(delay_head=0.4)
    async with gateway(config_text, coalesce_lease_s=0.3) as gw:
        lead = gw.cache.lead

        def dies(key: str, token: str) -> Flight:
            # As if the leader's replica died: its flight never writes, renews or releases.
            gw.cache.lead = lead
            return Flight(gw.cache.store, key + ":lock", token, lease_s=0.3, log_ttl_s=1)

        gw.cache.lead = dies
        answers = await together(gw, 10)
    assert all(r.status_code == 200 for r in answers)
    assert len(mock.requests) == 2
    assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 8 + ["miss"] * 2


async def test_followers_wait_no_longer_than_coalesce_wait_s(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(delay_head=0.6)
    async with gateway(config_text, coalesce_wait_s=0.2) as gw:
        answers = await together(gw, 3)
    assert all(r.status_code == 200 and r.headers["x-cache"] == "miss" for r in answers)
    assert len(mock.requests) == 3


async def test_no_coalescing_when_off(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(delay_head=0.2)
    async with gateway(config_text, coalesce=False) as gw:
        answers = await together(gw, 3)
    assert all(r.headers["x-cache"] == "miss" for r in answers) and len(mock.requests) == 3


async def test_a_follower_whose_client_leaves_stops_waiting(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(delay_head=0.8)
    gone = asyncio.Event()
    body = orjson.dumps({"model": "gpt-mini", "temperature": 0, "messages": MESSAGES})
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {KEY_A}".encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": headers,
    }
    async with gateway(config_text) as gw, Client(gw) as c:
        leader = asyncio.ensure_future(c.chat(temperature=0, messages=MESSAGES))
        await asyncio.to_thread(mock.wait_for_requests, 1, 2.0)
        follower = asyncio.ensure_future(gw(scope, receive, send))
        await asyncio.sleep(0.1)
        gone.set()
        await asyncio.wait_for(follower, 0.3)  # long before the leader's answer
        assert sent == [] and not leader.done()
        assert (await leader).status_code == 200 and len(mock.requests) == 1


async def test_followers_in_one_process_share_one_reader(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(chunks=5, chunk_delay=0.1)
    async with gateway(config_text) as gw:
        store = gw.cache.store
        xread = store.xread
        reading = [0, 0]  # now, most at once

        async def counted(*args: Any, **kwargs: Any) -> Any:
            reading[0] += 1
            reading[1] = max(reading)
            try:
                return await xread(*args, **kwargs)
            finally:
                reading[0] -= 1

        store.xread = counted
        answers = await together(gw, 10, stream=True)
    assert len(mock.requests) == 1 and all(r.content == answers[0].content for r in answers)
    assert reading[1] == 1
