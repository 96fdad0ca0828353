"""Traces through the whole app: the store round trip before the upstream call is a span too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI
from tests.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.anyio
SERVER, CLIENT = 2, 3  # the protobuf's SpanKind values


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


async def test_the_admission_and_cache_claim_round_trip_is_a_child_span(
    config_text: str, mock: MockOpenAI, receiver: OTLPReceiver
) -> None:
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",", "{name: team-a, key: " + KEY_A + ", limits: {rpm: 100},"
    )
    text += "cache: {enabled: true}\n"
    text += f'telemetry: {{tracing: {{enabled: true, endpoint: "{receiver.endpoint}"}}}}\n'
    app = build_app(parse(text, {}))
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        answer = await c.chat(temperature=0)
        assert answer.status_code == 200
        trace_id = answer.headers["x-trace-id"]
        app.snapshot.tracing.provider.force_flush()
    spans = [s for s in receiver.wait_for(3) if s.trace_id == trace_id]
    (server,) = [s for s in spans if s.kind == SERVER]
    stores = [s for s in spans if s.name.startswith("store ")]
    (attempt,) = [s for s in spans if s.kind == CLIENT and not s.name.startswith("store ")]
    # Admission and the cache's claim share one pipelined round trip: one span for both.
    assert [s.attributes["gateway.scripts"] for s in stores] == ["gateway.rate_admit, gateway.cache.claim"]
    assert stores[0].parent_span_id == attempt.parent_span_id == server.span_id
    assert server.attributes["gateway.limits"] == "admitted" and server.attributes["gateway.cache"] == "miss"
