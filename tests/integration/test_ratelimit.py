"""Per-key rate limits through the whole app."""

from __future__ import annotations

import datetime
from typing import Any

import anyio
import pytest

from gateway import build_app, parse
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.store import StoreError
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(config_text: str) -> Any:
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",",
        "{name: team-a, key: " + KEY_A + ", limits: {rpm: 3, tpm: 100000},",
    ).replace("{name: team-b, key: " + KEY_B + ",", "{name: team-b, key: " + KEY_B + ", limits: {tpm: 400},")
    app = build_app(parse(text + "cache: {enabled: true}\n", {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


async def test_rpm_counts_down_then_429_with_retry_after(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw) as c:
        remaining = []
        for _ in range(3):
            r = await c.chat()
            assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(r.headers["x-ratelimit-remaining-requests"])
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert remaining == ["2", "1", "0"]
        r = await c.chat()
    # The first request leaves the window a minute after its bucket's last charge: the third's,
    # a moment ago. Never more than the window, rounded up to whole seconds only in Retry-After.
    wait_ms = int(r.headers["retry-after-ms"])
    assert r.status_code == 429 and 59_000 < wait_ms <= 60_000  # (the test takes well under 1 s)
    assert r.headers["retry-after"] == "60" and r.headers["x-ratelimit-reset-requests"] == f"{wait_ms / 1000:.3f}s"
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "requests per minute (rpm)" in err["message"]
    assert len(mock.requests) == 3  # the refused request never reached upstream


async def test_tokens_are_reconciled_and_cache_hits_cost_none(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, KEY_B) as c:
        first = await c.chat(max_tokens=100, temperature=0)
        await gw.cache.flush()
        # Charged an estimate (~100), then corrected to the answer's real usage (a handful).
        second = await c.chat(max_tokens=100, temperature=0)
        assert second.headers["x-cache"] == "hit"
        third = await c.chat(max_tokens=100, temperature=0)
    left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in (first, second, third)]
    assert left[0] < 400 - 100
    assert left[1] > left[0] - 100 and left[2] > left[0] - 100  # the first was reconciled down
    assert left[2] == left[1]  # the hit's estimate was returned


async def test_over_the_token_limit_is_refused_before_upstream(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, KEY_B) as c:
        r = await c.chat(max_tokens=1000)
    assert r.status_code == 429 and "tokens per minute (tpm)" in r.json()["error"]["message"]
    assert "more than the limit of 400 tokens" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"  # it never fits
    assert r.headers["x-ratelimit-reset-tokens"] == "0.000s"  # nothing counted: the window is empty
    assert mock.requests == []


async def test_keys_without_limits_get_no_headers(config_text: str) -> None:
    app = build_app(parse(config_text, {}))
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        r = await c.chat()
    assert r.status_code == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)


def limited(config_text: str, extra: str = "", key_a: str = "") -> Any:
    """The integration config with `key_a` added to team-a's entry and `extra` models appended."""
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",", "{name: team-a, key: " + KEY_A + ", " + key_a
    )
    text = text.replace("models:\n", "models:\n" + extra, 1) if extra else text
    return build_app(parse(text.replace("models: [gpt-mini,", "models: [quota, gpt-mini,"), {}))


QUOTA_MODEL = """\
  - name: quota
    price: {input_per_mtok: 1000000, output_per_mtok: 1000000}
    deployments:
      - {provider: mock, model: mock-east, limits: {rpm: 2}}
      - {provider: mock, model: mock-west, limits: {rpm: 1}}
"""


async def test_a_deployment_over_its_quota_is_skipped_then_every_one_full_is_429(
    config_text: str, mock: MockOpenAI
) -> None:
    app = limited(config_text, QUOTA_MODEL)
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        answers = [await c.chat(model="quota") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers.get("x-gateway-deployment") for r in answers[:3]] == [
        "mock/mock-east",
        "mock/mock-east",
        "mock/mock-west",
    ]
    error = answers[3].json()["error"]
    assert error["code"] == "deployment_quota_exceeded" and "`quota`" in error["message"]
    assert answers[3].headers["retry-after"] == "60"  # east's first request leaves in under a minute
    assert 59_000 < int(answers[3].headers["retry-after-ms"]) <= 60_000
    assert [r.json()["model"] for r in mock.requests] == ["mock-east", "mock-east", "mock-west"]


async def test_a_key_refusal_gives_back_what_the_deployment_reserved(config_text: str, mock: MockOpenAI) -> None:
    # The key's limits and the deployment's quota are two scripts (two tags, maybe two cluster
    # nodes): the deployment's charge for a request the key refused must not stay counted.
    app = limited(config_text, QUOTA_MODEL, key_a="limits: {rpm: 1},")
    async with app.lifespan(None), Client(app) as a:  # type: ignore[arg-type]
        assert (await a.chat(model="quota")).headers["x-gateway-deployment"] == "mock/mock-east"
        refused = await a.chat(model="quota")
        limiter, east = app.snapshot.limiter, app.snapshot.routes["quota"].routes[0]  # rpm 2
        ctx = RequestContext(b"req_after", 0.0)
        ctx.model, ctx.body = "quota", {"model": "quota", "messages": [{"role": "user", "content": "hi"}]}
        assert await limiter.charge(ctx, east) is None  # east's second request: still free
        assert await limiter.charge(ctx, east) is not None
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_every_deployment_full_gives_back_the_keys_charges(config_text: str, mock: MockOpenAI) -> None:
    app = limited(config_text, QUOTA_MODEL, key_a="limits: {rpm: 10, concurrency: 5},")
    async with app.lifespan(None), Client(app) as a:  # type: ignore[arg-type]
        assert [(await a.chat(model="quota")).status_code for _ in range(4)] == [200, 200, 200, 429]
        after = await a.chat()  # gpt-mini: no quota
    assert after.headers["x-ratelimit-remaining-requests"] == "6"  # 3 served and this one, not the refused


async def test_failover_pays_the_next_deployments_quota(config_text: str, mock: MockOpenAI) -> None:
    mock.behave(model="mock-east", status=500)
    app = limited(config_text.replace("router: {", "router: {retries: 0, "), QUOTA_MODEL)  # failover only
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        first = await c.chat(model="quota")
        second = await c.chat(model="quota")  # east failed, west's single request is spent
    assert first.status_code == 200 and first.headers["x-gateway-deployment"] == "mock/mock-west"
    assert second.status_code == 500 and second.headers["x-gateway-deployment"] == "mock/mock-east"


async def test_a_retry_of_the_same_deployment_pays_its_quota_again(config_text: str, mock: MockOpenAI) -> None:
    east = mock.behave(model="mock-east", status=500)
    app = limited(config_text, QUOTA_MODEL)  # router.retries: 1 by default
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        first = await c.chat(model="quota")
        second = await c.chat(model="quota")
    assert first.status_code == 200 and first.headers["x-gateway-attempts"] == "3"  # east, east again, west
    assert len(east.requests) == 2  # east's rpm 2 went to the attempt and its retry
    assert second.status_code == 429 and second.json()["error"]["code"] == "deployment_quota_exceeded"


async def test_model_limits_of_a_key_beside_its_own(config_text: str, mock: MockOpenAI) -> None:
    app = limited(config_text, key_a="limits: {rpm: 100}, model_limits: {gpt-other: {rpm: 1}},")
    text = config_text  # gpt-other is not among team-a's models in the base config
    assert "gpt-other" not in text.split("team-a")[1].split("}")[0]
    async with app.lifespan(None), Client(app, KEY_B) as b, Client(app) as a:  # type: ignore[arg-type]
        assert (await a.chat()).headers["x-ratelimit-remaining-requests"] == "99"
        assert (await b.chat(model="gpt-other")).status_code == 200  # team-b: no model limit
    assert len(mock.requests) == 2


async def test_model_limit_refuses_on_that_model_only(config_text: str, mock: MockOpenAI) -> None:
    app = limited(config_text, key_a="limits: {rpm: 100}, model_limits: {gpt-mini: {rpm: 1}},")
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        ok = await c.chat()
        refused = await c.chat()
        other = await c.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert ok.headers["x-ratelimit-limit-requests"] == "1"  # the tighter of the two
    assert refused.status_code == 429 and "for `gpt-mini`" in refused.json()["error"]["message"]
    assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "98"


async def test_budget_reserves_the_estimate_then_charges_the_real_cost(
    config_text: str, mock: MockOpenAI
) -> None:
    # $1 per token: the estimate of a 10-token answer is ~15 USD, its real cost a handful.
    app = limited(config_text, QUOTA_MODEL, key_a="limits: {budget_usd: 40},")
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        answers = [await c.chat(model="quota", max_tokens=10) for _ in range(3)]
        spent = sum(r.json()["usage"]["total_tokens"] for r in answers)
        # The estimate (~5 prompt tokens + max_tokens) no longer fits what is left of the $40.
        over = await c.chat(model="quota", max_tokens=40 - spent)
        too_big = await c.chat(model="quota", max_tokens=1000)
    assert [r.status_code for r in answers] == [200, 200, 200]  # 3 x 15 > 40: the real costs were settled
    assert spent < 40
    assert over.status_code == 429
    error = over.json()["error"]
    assert error["type"] == "insufficient_quota" and "Budget of $40 reached" in error["message"]
    # A retry is let in when the UTC month rolls over: that is its Retry-After, however far.
    now = datetime.datetime.now(datetime.UTC)
    following = datetime.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=datetime.UTC)
    assert abs(int(over.headers["retry-after"]) - (following - now).total_seconds()) < 5
    # $1010 alone is over the $40 budget: no wait would let it in, so no Retry-After.
    assert too_big.status_code == 429 and "retry-after" not in too_big.headers
    assert too_big.headers["x-should-retry"] == "false"  # the OpenAI SDKs' own header: do not retry
    error = too_big.json()["error"]
    assert error["type"] == "insufficient_quota" and "needs $1010, more than the limit of $40" in error["message"]


async def test_concurrency_cap_and_release_on_completion_and_disconnect(
    config_text: str, mock: MockOpenAI
) -> None:
    mock.behave(model="mock-gpt-upstream", delay_head=0.3, times=2)
    app = limited(config_text, key_a="limits: {concurrency: 2},")
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            slow: list[Any] = []

            async def one() -> None:
                slow.append(await c.chat())

            tg.start_soon(one)
            tg.start_soon(one)
            await anyio.sleep(0.15)
            refused = await c.chat()
        assert refused.status_code == 429 and "concurrent requests" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"  # a slot frees when one ends: a hint to poll
        assert [r.status_code for r in slow] == [200, 200]
        # A client that goes away mid-request gives its slot back.
        hang = mock.behave(model="mock-gpt-upstream", hang=True, times=1)
        with anyio.move_on_after(0.3):
            await c.chat()
        assert await anyio.to_thread.run_sync(hang.wait_disconnected, 2)
        assert [(await c.chat()).status_code for _ in range(2)] == [200, 200]


async def test_limits_fail_open_on_this_replicas_counts_or_closed(config_text: str, mock: MockOpenAI) -> None:
    app = limited(config_text, key_a="limits: {rpm: 2},")

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("redis script failed: ConnectionError")

    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        app.store.run = down
        assert [(await c.chat()).status_code for _ in range(3)] == [200, 200, 429]
        app.limiter.outage = "closed"
        r = await c.chat()
        report = (await c.get("/health/store")).json()
    assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    assert report["decided_without_store"] == {"limits": 4, "cache": 0}
    assert report["outage_policy"] == {"limits": "open", "cache": "open", "budgets": "closed"}
    assert report["reachable"] is True


async def test_completion_estimate_is_per_model(config_text: str, mock: MockOpenAI) -> None:
    text = config_text.replace("  - {name: gpt-other,", "  - {name: gpt-other, completion_estimate: 5000,")
    app = limited(text, key_a="limits: {tpm: 4000},")
    async with app.lifespan(None), Client(app) as a, Client(app, KEY_B) as b:  # type: ignore[arg-type]
        ok = await a.chat()  # gpt-mini: 256 reserved
        assert (await b.chat(model="gpt-other")).status_code == 200  # team-b has no tpm
    assert ok.status_code == 200 and 4000 - 300 < int(ok.headers["x-ratelimit-remaining-tokens"]) < 4000 - 256
    app = limited(
        text.replace("models: [gpt-mini,", "models: [gpt-other, gpt-mini,"), key_a="limits: {tpm: 4000},"
    )
    async with app.lifespan(None), Client(app) as a:  # type: ignore[arg-type]
        refused = await a.chat(model="gpt-other")  # 5000 reserved > 4000
    assert refused.status_code == 429


async def test_a_cacheable_miss_with_limits_and_a_quota_makes_one_store_round_trip_before_upstream(
    config_text: str, mock: MockOpenAI
) -> None:
    app = limited(
        config_text + "cache: {enabled: true}\n", QUOTA_MODEL, key_a="limits: {rpm: 100, tpm: 100000},"
    )
    trips: list[str] = []
    store = app.store
    depth = [0]  # the memory store's run_many calls its own run: count the outer call only
    for name in ("get", "set", "run", "run_many", "hincrby", "incr", "xadd", "xread"):
        original = getattr(store, name)

        async def spy(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            if not depth[0]:
                trips.append(_name)
            depth[0] += 1
            try:
                return await _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(store, name, spy)
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        for route in app.routes["quota"].routes:
            request = route.pool.request

            async def upstream(*args: Any, _request: Any = request, **kwargs: Any) -> Any:
                trips.append("upstream")
                return await _request(*args, **kwargs)

            route.pool.request = upstream
        trips.clear()
        miss = await c.chat(model="quota", temperature=0)
        assert miss.headers["x-cache"] == "miss"
        assert trips[: trips.index("upstream")] == ["run_many"]  # admission and cache claim together
        await app.cache.flush()
        trips.clear()
        hit = await c.chat(model="quota", temperature=0)
    assert hit.headers["x-cache"] == "hit" and "upstream" not in trips
    assert trips[0] == "run_many"


async def test_a_failovers_quota_refusal_says_when_that_deployment_has_room(
    config_text: str, mock: MockOpenAI
) -> None:
    app = limited(config_text, QUOTA_MODEL)
    async with app.lifespan(None):  # type: ignore[arg-type]
        limiter, west = app.snapshot.limiter, app.snapshot.routes["quota"].routes[1]  # rpm 1
        ctx = RequestContext(b"req_charge", 0.0)
        ctx.model, ctx.body = "quota", {"model": "quota", "messages": [{"role": "user", "content": "hi"}]}
        assert await limiter.charge(ctx, west) is None
        refused = await limiter.charge(ctx, west)
    assert isinstance(refused, RateLimited) and refused.code == "deployment_quota_exceeded"
    headers = dict(refused.headers)
    assert 55 <= int(headers[b"retry-after"]) <= 60  # a minute after the charge, not a polling guess
    assert 0 < int(headers[b"retry-after-ms"]) <= 60_000
