"""What a replica decides alone while the store is unreachable: its limits and its budget ledger."""

from __future__ import annotations

import time

from gateway.context import Admission
from gateway.limits.outage import Ledger, Local
from gateway.limits.specs import (
    CALENDAR,
    COST,
    DAY_MS,
    MINUTE_BUCKET_MS,
    MINUTE_MS,
    MONTH,
    RECONCILE,
    REQUESTS,
    SLIDING,
    Spec,
    calendar,
)

DAY_BUDGET = Spec(CALENDAR, "gw:{k:a}:usd", 1000, DAY_MS, 0, COST, "usd", "this key")
MONTH_BUDGET = Spec(CALENDAR, "gw:{k:a}:m:x:usd", 5000, MONTH, 0, COST, "usd", "this key on `x`")


def admission(cost: int) -> Admission:
    return Admission("", 0, cost)


def now_ms() -> int:
    return int(time.time() * 1000)


def test_spend_is_checked_against_what_the_store_last_said_plus_what_was_admitted_here() -> None:
    ledger = Ledger()
    ledger.seen(DAY_BUDGET, now_ms(), remaining=400)  # 600 spent, as the store answered
    assert ledger.admit((DAY_BUDGET,), admission(300)) is None
    refused = ledger.admit((DAY_BUDGET,), admission(200))  # 600 + 300 + 200 > 1000
    assert refused is not None and refused[0] is DAY_BUDGET
    assert abs(refused[1] - calendar(DAY_MS, now_ms())[1]) < 1000  # until the UTC day ends
    assert ledger.owed_usd == 300 / 1e9


def test_a_budget_last_seen_in_an_earlier_window_counts_from_zero() -> None:
    ledger = Ledger()
    ledger.seen(DAY_BUDGET, now_ms() - DAY_MS, remaining=0)  # spent in full, yesterday
    assert ledger.admit((DAY_BUDGET,), admission(1000)) is None


def test_every_budget_is_charged_or_none() -> None:
    ledger = Ledger()
    ledger.seen(MONTH_BUDGET, now_ms(), remaining=100)
    held = admission(500)
    refused = ledger.admit((DAY_BUDGET, MONTH_BUDGET), held)
    assert refused is not None and refused[0] is MONTH_BUDGET
    assert not ledger and held.charges == []
    assert ledger.admit((DAY_BUDGET,), held) is None and len(held.charges) == 1


def test_corrections_take_and_restore() -> None:
    ledger = Ledger()
    held = admission(300)
    assert ledger.admit((DAY_BUDGET,), held) is None
    spec, at, amount, _ = held.charges[0]
    ledger.correct(spec, at, 40 - amount)  # it really cost 40
    [(script, keys, owed)] = ledger.take()  # one RECONCILE per tag
    number = calendar(DAY_MS, at)[0]
    assert script is RECONCILE and keys == ["gw:{k:a}:usd"]
    assert owed[:3] == ["gw:{k:a}:usd", number, 40] and 0 < int(owed[3]) <= 2 * DAY_MS
    assert not ledger  # handed out
    ledger.restore(owed)  # the store did not take it
    assert ledger.take()[0][2][:3] == owed[:3]


def test_a_window_already_over_is_owed_nothing() -> None:
    ledger = Ledger()
    ledger.correct(DAY_BUDGET, now_ms() - 3 * DAY_MS, 70)  # its counter expired long ago
    assert ledger and ledger.take() == []


def test_local_limits_and_budgets_are_charged_together_or_not_at_all() -> None:
    rpm = Spec(SLIDING, "gw:{k:a}:rpm", 1, MINUTE_MS, MINUTE_BUCKET_MS, REQUESTS, "rpm", "this key")
    local, ledger = Local(), Ledger()
    ledger.seen(DAY_BUDGET, now_ms(), remaining=100)
    refused = local.admit((rpm, DAY_BUDGET), admission(500), ledger)
    assert refused is not None and refused[0] is DAY_BUDGET
    assert local.admit((rpm, DAY_BUDGET), admission(50), ledger) is None  # rpm was not charged above
    assert local.admit((rpm,), admission(0), ledger) == (rpm, 1000)
