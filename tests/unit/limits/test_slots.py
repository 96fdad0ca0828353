"""Every limits script call touches one Redis Cluster slot, and the calls of many keys spread out.

A script runs on the node of its KEYS[1] (the scope's tag); the counters it names in ARGV
must hash to that same slot (CRC16 of the hash tag), or Redis Cluster refuses the script.
"""

from __future__ import annotations

from gateway.config import Limits
from gateway.limits.specs import (
    DAY_MS,
    Spec,
    calendar,
    correction,
    counter_of,
    deployment_base,
    key_base,
    specs_of,
)
from gateway.store.slots import key_slot

EVERY_KIND = Limits(rpm=10, tpm=1000, rpd=100, budget_usd=5.0, budget_period="month", concurrency=3)
NOW = 1_790_000_000_000


def names_touched(spec: Spec) -> list[str]:
    """The keys ADMIT reads or writes for `spec` (its KEYS), and those SETTLE/RECONCILE correct:
    a limit is one key (a hash, or the zset of leases), so every key a script touches is declared."""
    return [spec.name, correction(spec, NOW, 1)[1], counter_of(spec, NOW)[0]]


def scopes(key_id: str) -> list[tuple[Spec, ...]]:
    base = key_base(key_id)
    key = specs_of(EVERY_KIND, base, "this key", 60_000) + specs_of(EVERY_KIND, f"{base}:m:gpt-4o", "m", 0)
    deployment = specs_of(EVERY_KIND, deployment_base(f"openai/{key_id}"), "d", 0)
    return [key, deployment]


def test_every_counter_of_a_call_is_in_the_slot_of_its_tag() -> None:
    for key_id in ("team-a", "k-7f3a", "weird}id{", "ünï", *(f"key-{i}" for i in range(50))):
        for specs in scopes(key_id):
            tag = specs[0].tag
            assert all(spec.tag == tag for spec in specs)
            for spec in specs:
                for name in names_touched(spec):
                    assert key_slot(name) == key_slot(tag), (tag, name)


def test_keys_and_deployments_spread_over_slots() -> None:
    tags = {specs[0].tag for i in range(300) for specs in scopes(f"key-{i}")}
    slots = {key_slot(tag) for tag in tags}
    assert len(tags) == 600 and len(slots) > 550  # not one tag for all: about one slot each


def test_a_days_budget_names_its_day() -> None:
    [spec] = specs_of(Limits(budget_usd=1.0, budget_period="day"), key_base("a"), "this key", 0)
    assert counter_of(spec, NOW) == ("gw:{k:a}:usd", NOW // DAY_MS) == (spec.name, calendar(DAY_MS, NOW)[0])
