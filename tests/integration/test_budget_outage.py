"""Budgets while the store is unreachable (`store.outage.budgets`), on the memory store with its
script calls failing as an unreachable Redis fails them."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest

from gateway import build_app, parse
from gateway.limits.specs import key_base, month_number
from gateway.store import StoreError
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

PRICED = """\
  - name: priced
    price: {input_per_mtok: 1000000, output_per_mtok: 1000000}
    deployments: [{provider: mock, model: mock-gpt-upstream}]
"""


def budgeted(config_text: str, policy: str) -> Any:
    """team-a: a $100 month budget on `priced` ($1 a token); team-b: only an rpm limit."""
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ", models: [",
        "{name: team-a, key: " + KEY_A + ", limits: {budget_usd: 100}, models: [priced, ",
    ).replace(
        "{name: team-b, key: " + KEY_B + ",", "{name: team-b, key: " + KEY_B + ", limits: {rpm: 10},"
    )
    text = text.replace("models:\n", "models:\n" + PRICED, 1)
    return build_app(parse(text + f"store: {{outage: {{budgets: {policy}}}}}\n", {}))


class Outage:
    """The store's script calls fail (admission, settling) until `end`."""

    def __init__(self, app: Any) -> None:
        self.store = app.store
        self.run, self.run_many = app.store.run, app.store.run_many

    async def _down(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("redis script failed: ConnectionError")

    def start(self) -> None:
        self.store.run = self.store.run_many = self._down

    def end(self) -> None:
        self.store.run, self.store.run_many = self.run, self.run_many


def cost(response: Any) -> int:
    """What an answer cost, in nano-USD, at $1 a token."""
    return int(response.json()["usage"]["total_tokens"]) * 1_000_000_000


async def spent(app: Any) -> int:
    stored = await app.store.hgetall(f"{key_base('cfg-team-a')}:usd")  # the month counted, and its spend
    assert int(stored["n"]) == month_number(int(time.time() * 1000))[0]
    return int(stored["v"])


async def test_closed_refuses_keys_with_a_budget_and_serves_the_others(
    config_text: str, mock: MockOpenAI
) -> None:
    app = budgeted(config_text, "closed")
    outage = Outage(app)
    async with app.lifespan(None), Client(app) as a, Client(app, KEY_B) as b:  # type: ignore[arg-type]
        assert (await a.chat(model="priced", max_tokens=10)).status_code == 200
        outage.start()
        refused = await a.chat(model="priced", max_tokens=10)
        other = await b.chat()  # no budget: store.outage.limits (open) decides
        report = (await a.get("/health/store")).json()
        outage.end()
        after = await a.chat(model="priced", max_tokens=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "budget_unavailable"
    assert other.status_code == 200 and len(mock.requests) == 3  # the refused one never went upstream
    assert report["outage_policy"]["budgets"] == "closed" and report["budget_usd_to_reconcile"] == 0
    assert after.status_code == 200


async def test_open_counts_spend_here_then_writes_it_to_the_store(config_text: str, mock: MockOpenAI) -> None:
    app = budgeted(config_text, "open")
    outage = Outage(app)
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        before = await c.chat(model="priced", max_tokens=10)  # seen by the store: ~$20 estimate, then settled
        outage.start()
        during = []
        for _ in range(50):
            during.append(await c.chat(model="priced", max_tokens=10))
            if during[-1].status_code != 200:
                break
        report = (await c.get("/health/store")).json()
        outage.end()
        after = await c.chat(model="priced", max_tokens=10)  # reconciles, then is admitted
        total = await spent(app)
        settled = (await c.get("/health/store")).json()
    served, refused = during[:-1], during[-1]
    outage_spend = sum(cost(r) for r in served)
    # Checked against what the store last said was spent (the first request's $20 estimate, as
    # admitted) plus the real cost of each request served here: the next estimate no longer fit.
    assert len(served) >= 2 and 20e9 + outage_spend + 20e9 > 100e9 >= 20e9 + outage_spend - cost(served[-1]) + 20e9
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "insufficient_quota"
    now = datetime.datetime.now(datetime.UTC)
    following = datetime.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=datetime.UTC)
    assert abs(int(refused.headers["retry-after"]) - (following - now).total_seconds()) < 5
    assert report["budget_usd_to_reconcile"] == pytest.approx(outage_spend / 1e9)
    assert before.status_code == 200 and after.status_code == 200
    assert total == cost(before) + outage_spend + cost(after)  # every answer's real cost, none twice
    assert settled["budget_usd_to_reconcile"] == 0
    assert len(mock.requests) == 2 + len(served)


async def test_open_keeps_what_it_owes_while_the_store_stays_down(config_text: str, mock: MockOpenAI) -> None:
    app = budgeted(config_text, "open")
    outage = Outage(app)
    async with app.lifespan(None), Client(app) as c:  # type: ignore[arg-type]
        outage.start()
        first = await c.chat(model="priced", max_tokens=10)
        second = await c.chat(model="priced", max_tokens=10)  # the owed spend failed to go: kept
        report = (await c.get("/health/store")).json()
        outage.end()
        await c.chat(model="priced", max_tokens=1)
        total = await spent(app)
    assert first.status_code == second.status_code == 200
    assert report["budget_usd_to_reconcile"] == pytest.approx((cost(first) + cost(second)) / 1e9)
    assert total >= cost(first) + cost(second)
