"""How the bucketed sliding window compares with an exact sliding log.

Drives the memory store's twin of the ADMIT script (the Lua's line-for-line copy,
held to it by tests/contract/test_limits.py) on a simulated clock, with traffic
patterns that stress window edges, and reports for a key with rpm = R the most
requests it admitted in any 60 s span (an exact log: R, never more) and how many
it admitted per minute (an exact log, under overload: R).

    python -m bench.limits_error [--limit 100] [--minutes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
from collections.abc import Callable, Iterator

from gateway.limits.specs import ADMIT, MINUTE_BUCKET_MS, MINUTE_MS, REQUESTS, SLIDING, Spec
from gateway.store import MemoryStore

Pattern = Callable[[random.Random, float], Iterator[float]]


def steady(rng: random.Random, minutes: float) -> Iterator[float]:
    """Poisson arrivals at 3x the limit's rate: the window is always full."""
    t = 0.0
    while t < minutes * 60:
        t += rng.expovariate(3 * LIMIT / 60)
        yield t


def bursts(rng: random.Random, minutes: float) -> Iterator[float]:
    """A burst of 2x the limit at a random second of every minute: the worst case for the weights."""
    for minute in range(int(minutes)):
        at = minute * 60 + rng.uniform(0, 60)
        yield from sorted(at + rng.uniform(0, 0.5) for _ in range(2 * LIMIT))


def on_off(rng: random.Random, minutes: float) -> Iterator[float]:
    """Busy 20 s then silent 40 s, shifted against the window edges."""
    t = rng.uniform(0, 60)
    while t < minutes * 60:
        if (t % 60) < 20:
            yield t
            t += rng.expovariate(6 * LIMIT / 60)
        else:
            t += 60 - (t % 60)


LIMIT = 100


async def admitted_times(arrivals: list[float]) -> list[float]:
    now = [0.0]
    store = MemoryStore(clock=lambda: 1_700_000_000 + now[0])
    spec = Spec(SLIDING, "gw:{k:bench}:rpm", LIMIT, MINUTE_MS, MINUTE_BUCKET_MS, REQUESTS, "rpm", "bench")
    admitted = []
    for t in arrivals:
        now[0] = t
        if int((await store.run(ADMIT, [spec.name], ["", 0, *spec.args(1)]))[0]):
            admitted.append(t)
    return admitted


def exact_log(arrivals: list[float]) -> list[float]:
    """What an exact sliding log admits: a request when fewer than R were admitted in the last 60 s."""
    admitted: list[float] = []
    for t in arrivals:
        if len(admitted) < LIMIT or admitted[-LIMIT] <= t - 60:
            admitted.append(t)
    return admitted


def worst_span(times: list[float]) -> int:
    """The most admissions in any 60 s span (a span starting at each admission covers every maximum)."""
    return max((bisect.bisect_left(times, t + 60) - i for i, t in enumerate(times)), default=0)


async def main() -> None:
    global LIMIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    LIMIT = args.limit
    print(f"rpm = {LIMIT}, {args.minutes:g} simulated minutes, {args.seeds} seeds per pattern")
    print(f"{'pattern':<8} {'worst 60 s span':>16} {'admitted / minute':>18} {'exact log / minute':>19}")
    for pattern in (steady, bursts, on_off):
        worst, total, exact = 0, 0, 0
        for seed in range(args.seeds):
            arrivals = list(pattern(random.Random(seed), args.minutes))
            times = await admitted_times(arrivals)
            worst = max(worst, worst_span(times))
            total += len(times)
            exact += len(exact_log(arrivals))
        per_minute = args.seeds * args.minutes
        print(f"{pattern.__name__:<8} {worst:>16} {total / per_minute:>18.1f} {exact / per_minute:>19.1f}")


if __name__ == "__main__":
    asyncio.run(main())
