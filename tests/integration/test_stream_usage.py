"""Every stream's real usage reaches the usage report and the token limit, whether or not the client
asked for `stream_options.include_usage`; a client that did not ask never sees the usage event."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from gateway import build_app, parse
from gateway.limits.limiter import Limiter
from gateway.limits.specs import estimate
from gateway.limits.usage import UsageRecorder
from tests.integration.conftest import KEY_A, Client
from tests.mock_anthropic import MockAnthropic
from tests.mock_azure import MockAzure
from tests.mock_cohere import MockCohere
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "one two three four"}]


@pytest.fixture(scope="module")
def others() -> Iterator[tuple[MockAnthropic, MockCohere, MockAzure]]:
    with MockAnthropic() as anthropic, MockCohere() as cohere, MockAzure() as azure:
        yield anthropic, cohere, azure


@pytest.fixture
async def gw(
    config_text: str, mock: MockOpenAI, others: tuple[MockAnthropic, MockCohere, MockAzure]
) -> AsyncIterator[Any]:
    anthropic, cohere, azure = others
    for other in others:
        other.reset()
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",", "{name: team-a, key: " + KEY_A + ", limits: {tpm: 100000},"
    )
    text = text.replace("[gpt-mini, emb,", "[gpt-mini, claude, command, azure, selfhosted, emb,")
    text = text.replace(
        "providers:\n",
        f"""providers:
  claude-p: {{type: anthropic, base_url: "{anthropic.base_url}", api_key: {anthropic.api_key}}}
  cohere-p: {{type: cohere, base_url: "{cohere.base_url}", api_key: {cohere.api_key}}}
  azure-p: {{type: azure_openai, base_url: "{azure.url}", api_key: {azure.api_key}}}
  vllm: {{type: openai_compatible, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
""",
    )
    text = text.replace(
        "models:\n",
        """models:
  - {name: claude, deployments: [{provider: claude-p, model: claude-x}]}
  - {name: command, deployments: [{provider: cohere-p, model: command-x}]}
  - {name: azure, deployments: [{provider: azure-p, model: chat-dep}]}
  - {name: selfhosted, deployments: [{provider: vllm, model: mock-gpt-upstream}]}
""",
    )
    app = build_app(parse(text, {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, int] | None]]:
    """(alias, usage) as the usage report receives them."""
    seen: list[tuple[str, tuple[int, int] | None]] = []
    add = UsageRecorder.add

    def spy(self: UsageRecorder, key_id: str, alias: str, usage: tuple[int, int] | None) -> None:
        seen.append((alias, usage))
        add(self, key_id, alias, usage)

    monkeypatch.setattr(UsageRecorder, "add", spy)
    return seen


@pytest.fixture
def reconciled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(estimate charged on admission, tokens it was corrected to) per settled request."""
    seen: list[tuple[int, int]] = []
    settle = Limiter.settle

    async def spy(self: Limiter, ctx: Any) -> None:
        corrections: list[Any] = []
        add = self._settling.add

        async def capture(groups: dict[str, list[Any]]) -> None:
            corrections.extend(a for args in groups.values() for a in args)
            await add(groups)

        self._settling.add = capture  # type: ignore[method-assign]
        try:
            await settle(self, ctx)
        finally:
            self._settling.add = add  # type: ignore[method-assign]
        delta = sum(
            int(corrections[i + 3])
            for i in range(0, len(corrections), 4)
            if corrections[i + 1].endswith(":tpm")
        )
        seen.append((ctx.admission.tokens, ctx.admission.tokens + delta))

    monkeypatch.setattr(Limiter, "settle", spy)
    return seen


async def stream(gw: Any, path: str = "/v1/chat/completions", **body: Any) -> list[Any]:
    """The events the client saw, JSON-decoded, `[DONE]` last."""
    body.setdefault("model", "gpt-mini")
    if path == "/v1/chat/completions":
        body.setdefault("messages", MESSAGES)
    async with Client(gw) as c, c.stream("POST", path, json={"stream": True, **body}) as r:
        assert r.status_code == 200
        raw = await r.aread()
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_client_that_did_not_ask_sees_no_usage_and_the_real_usage_is_counted(
    gw: Any, mock: MockOpenAI, counted: list[Any], reconciled: list[Any], path: str
) -> None:
    body = {"model": "instruct", "prompt": "one two"} if path == "/v1/completions" else {}
    events = await stream(gw, path, max_tokens=50, **body)

    assert all(e["choices"] for e in events)  # no usage event
    assert all(e.get("usage") is None for e in events)
    (seen,) = mock.requests_to(path)
    assert seen.json()["stream_options"] == {"include_usage": True}
    # The mock counts words: the prompt's, and those of its "echo: " + prompt answer.
    expected = (2, 3) if path == "/v1/completions" else (4, 5)
    assert counted == [("instruct" if path == "/v1/completions" else "gpt-mini", expected)]
    assert reconciled[-1][1] == sum(expected)


async def test_a_client_that_asked_gets_the_usage_event_as_openai_sends_it(
    gw: Any, counted: list[Any]
) -> None:
    events = await stream(gw, stream_options={"include_usage": True})

    *chunks, last = events
    assert all(c["usage"] is None and c["choices"] for c in chunks)
    assert last["choices"] == []
    assert (last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"]) == counted[-1][1]


@pytest.mark.parametrize("alias", ["claude", "command", "azure"])
async def test_translated_and_azure_streams_are_counted_without_the_usage_event(
    gw: Any, counted: list[Any], reconciled: list[Any], alias: str
) -> None:
    events = await stream(gw, model=alias)

    assert events and all(e["choices"] for e in events)
    (seen_alias, usage), *_ = counted
    assert seen_alias == alias
    assert usage is not None and usage[0] > 0 and usage[1] > 0
    assert reconciled[-1][1] == sum(usage)


async def test_a_provider_without_stream_usage_is_not_asked(
    gw: Any, mock: MockOpenAI, counted: list[Any]
) -> None:
    events = await stream(gw, model="selfhosted")

    assert all(e["choices"] for e in events)
    assert "stream_options" not in mock.requests_to("/v1/chat/completions")[0].json()
    assert counted[-1][1] is None


async def test_a_stream_cut_short_is_charged_its_prompt_and_what_was_relayed(
    gw: Any, mock: MockOpenAI, reconciled: list[Any]
) -> None:
    mock.behave(model="mock-gpt-upstream", chunks=20, reset_after=3)
    async with (
        Client(gw) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "gpt-mini", "messages": MESSAGES, "stream": True, "max_tokens": 500},
        ) as r,
    ):
        raw = await r.aread()

    assert b"event: error" in raw
    relayed = raw.count(b"data:") - 1  # the role chunk and 3 pieces; the error event is the gateway's
    assert relayed == 4
    prompt, _ = estimate({"messages": MESSAGES})
    assert reconciled == [(prompt + 500, prompt + relayed)]


async def test_a_stream_without_usage_is_never_charged_more_than_its_estimate(
    gw: Any, mock: MockOpenAI, reconciled: list[Any]
) -> None:
    mock.behave(model="mock-gpt-upstream", chunks=40)
    await stream(gw, model="selfhosted", max_tokens=5)

    prompt, _ = estimate({"messages": MESSAGES})
    assert reconciled == [(prompt + 5, prompt + 5)]


async def test_a_broken_stream_still_counts_as_a_request(
    gw: Any, mock: MockOpenAI, counted: list[Any]
) -> None:
    mock.behave(model="mock-gpt-upstream", chunks=20, reset_after=3)
    async with (
        Client(gw) as c,
        c.stream(
            "POST", "/v1/chat/completions", json={"model": "gpt-mini", "messages": MESSAGES, "stream": True}
        ) as r,
    ):
        assert b"event: error" in await r.aread()
    assert counted == [("gpt-mini", None)]
