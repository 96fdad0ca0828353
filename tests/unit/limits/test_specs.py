"""ADMIT's sliding window on a clock the test moves: a refusal's reset is the very millisecond
the retry is let in, and no window ever holds more than the limit."""

from __future__ import annotations

import bisect
import random

import pytest

from gateway.limits.specs import (
    ADMIT,
    DAY_BUCKET_MS,
    DAY_MS,
    MINUTE_BUCKET_MS,
    MINUTE_MS,
    REQUESTS,
    SLIDING,
    TOKENS,
    Spec,
    estimate,
)
from gateway.store import MemoryStore

pytestmark = pytest.mark.anyio

START_MS = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ms = START_MS

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000  # the store reads int(seconds * 1000): exactly self.ms


@pytest.mark.parametrize(
    ("spec", "costs", "gap_ms"),
    [
        (
            Spec(SLIDING, "gw:{k:a}:rpm", 5, MINUTE_MS, MINUTE_BUCKET_MS, REQUESTS, "rpm", "this key"),
            (1, 1),
            4_000,
        ),
        (
            Spec(SLIDING, "gw:{k:a}:tpm", 100, MINUTE_MS, MINUTE_BUCKET_MS, TOKENS, "tpm", "this key"),
            (1, 60),
            2_500,
        ),
        (
            Spec(SLIDING, "gw:{k:a}:rpd", 4, DAY_MS, DAY_BUCKET_MS, REQUESTS, "rpd", "this key"),
            (1, 1),
            7_200_000,
        ),
    ],
    ids=["rpm", "tpm", "rpd"],
)
async def test_a_refused_request_is_let_in_at_its_reset_and_not_a_millisecond_before(
    spec: Spec, costs: tuple[int, int], gap_ms: int
) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    rng = random.Random(spec.name)
    admitted: list[tuple[int, int]] = []  # (ms, amount)
    refusals = 0

    async def admit(at: int, cost: int) -> list[int]:
        clock.ms = at
        return [int(x) for x in await store.run(ADMIT, [spec.name], ["", 1, *spec.args(cost)])]

    at = START_MS
    for _ in range(300):
        at += rng.randint(0, gap_ms)
        cost = rng.randint(*costs)
        reply = await admit(at, cost)
        if not reply[0]:
            refusals += 1
            reset = reply[2]
            assert 0 < reset <= spec.window_ms and reply[5] == reset  # in the x-ratelimit-reset header too
            if reset > 1000:
                assert (await admit(at + reset - 1000, cost))[0] == 0  # a second early: still refused
            early = await admit(at + reset - 1, cost)
            assert early[0] == 0 and early[2] == 1  # a millisecond early: refused, and told 1 ms
            at += reset
            reply = await admit(at, cost)
            assert reply[0] == 1
        admitted.append((at, cost))
    assert refusals > 20  # the traffic kept the limit busy
    # Exact: no window of its length, starting at any admission, holds more than the limit.
    times = [t for t, _ in admitted]
    for i, (t, _) in enumerate(admitted):
        end = bisect.bisect_left(times, t + spec.window_ms)
        assert sum(amount for _, amount in admitted[i:end]) <= spec.limit


def test_the_estimate_reserves_every_choice_asked_for() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
    prompt, one = estimate(body)
    assert one == 100 and prompt > 0
    assert estimate({**body, "n": 4}) == (prompt, 400)
    assert estimate({"prompt": "hi", "max_tokens": 10, "n": 2, "best_of": 5}) == (0, 50)  # best_of are generated
    assert estimate({"prompt": "hi", "n": 3}, default=7) == (0, 21)
    assert estimate({"prompt": "hi", "max_tokens": 10, "n": None}) == (0, 10)
