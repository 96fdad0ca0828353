"""Each exposed metric as a view of the request rows (`metrics.Counts`), computed at scrape time.

A view maps a row's key to the metric's labels (None: the row is not in it) and
reads one slot (a counter) or one histogram's slots. Requests no upstream
answered (refused, cache hits, followers of a flight) are left out of the
upstream views: GenAI client metrics, tokens and cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from gateway.telemetry.metrics import (
    ATTEMPTS,
    CACHE,
    COST,
    COST_AT,
    DURATION,
    DURATION_AT,
    FIRST_BYTE,
    FIRST_BYTE_AT,
    FIRST_OK_AT,
    FIRST_TOKEN,
    FIRST_TOKEN_AT,
    INPUT_AT,
    OPERATION,
    OUTPUT_AT,
    OVERHEAD,
    OVERHEAD_AT,
    PER_TOKEN,
    PER_TOKEN_AT,
    REQUESTS,
    REQUESTS_AT,
    STORE_ERRORS,
    STORE_LATENCY,
    STORE_TRIPS,
    TOKEN_USAGE,
    TOKENS_IN_AT,
    TOKENS_OUT_AT,
    TOKENS_TOTAL,
    Counts,
    Deployment,
    Metric,
    RowKey,
    Slots,
)

Labels = tuple[str, ...]
_NO_UPSTREAM = frozenset({"hit", "coalesced"})


class View(NamedTuple):
    metric: Metric
    labels: Callable[[RowKey, Deployment | None], Labels | None]
    slot: int | Slots


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if status else "none"


def _upstream(key: RowKey) -> bool:
    return bool(key[2]) and key[6] not in _NO_UPSTREAM


def _genai(key: RowKey, target: Deployment | None) -> Labels:
    return (key[0], target.provider, target.model) if target is not None else (key[0], "", key[2])


def _error_type(status: int) -> str:
    return "" if 0 < status < 400 else str(status) if status else "cancelled"


def _stream(key: RowKey) -> str:
    return "true" if key[5] else "false"


VIEWS = (
    View(REQUESTS, lambda k, t: (k[0], k[1], k[2], k[3], _status_class(k[4])), REQUESTS_AT),
    View(TOKENS_TOTAL, lambda k, t: (k[1], k[2], k[3], "input") if _upstream(k) else None, INPUT_AT),
    View(TOKENS_TOTAL, lambda k, t: (k[1], k[2], k[3], "output") if _upstream(k) else None, OUTPUT_AT),
    View(COST, lambda k, t: (k[1], k[3]) if _upstream(k) else None, COST_AT),
    View(CACHE, lambda k, t: (k[1], k[6]) if k[6] else None, REQUESTS_AT),
    View(ATTEMPTS, lambda k, t: (k[2], "ok"), FIRST_OK_AT),
    View(DURATION, lambda k, t: (k[0], k[1], _stream(k)), DURATION_AT),
    View(OVERHEAD, lambda k, t: (k[0], _stream(k)), OVERHEAD_AT),
    View(FIRST_BYTE, lambda k, t: (k[0], k[1]), FIRST_BYTE_AT),
    View(TOKEN_USAGE, lambda k, t: (*_genai(k, t), "input") if _upstream(k) else None, TOKENS_IN_AT),
    View(TOKEN_USAGE, lambda k, t: (*_genai(k, t), "output") if _upstream(k) else None, TOKENS_OUT_AT),
    View(OPERATION, lambda k, t: (*_genai(k, t), _error_type(k[4])) if _upstream(k) else None, DURATION_AT),
    View(FIRST_TOKEN, lambda k, t: _genai(k, t) if _upstream(k) else None, FIRST_TOKEN_AT),
    View(PER_TOKEN, lambda k, t: _genai(k, t) if _upstream(k) else None, PER_TOKEN_AT),
)


def project(
    counts: Counts, deployments: Mapping[str, Deployment]
) -> tuple[dict[str, dict[Labels, float]], dict[str, dict[Labels, list[float]]]]:
    """Counter values and histogram slots (buckets, then the sum) per metric name and labels."""
    counters: dict[str, dict[Labels, float]] = {name: dict(s) for name, s in counts.counters.items()}
    histograms: dict[str, dict[Labels, list[float]]] = {}
    for view in VIEWS:
        slot = view.slot
        if isinstance(slot, int):
            series = counters.setdefault(view.metric.name, {})
            for key, row in counts.rows.items():
                value = row[slot]
                labels = view.labels(key, deployments.get(key[2])) if value else None
                if labels is not None:
                    series[labels] = series.get(labels, 0.0) + value
            continue
        hseries = histograms.setdefault(view.metric.name, {})
        for key, row in counts.rows.items():
            values = row[slot.at : slot.end]
            if not any(values[:-1]):
                continue  # nothing observed (an overhead for a refused request, say)
            labels = view.labels(key, deployments.get(key[2]))
            if labels is None:
                continue
            have = hseries.get(labels)
            if have is None:
                hseries[labels] = list(values)
            else:
                for i, v in enumerate(values):
                    have[i] += v
    store = counts.store
    counters[STORE_TRIPS.name] = {(): float(sum(store.buckets))}
    counters[STORE_ERRORS.name] = {(): float(store.errors)}
    histograms[STORE_LATENCY.name] = {(): [*map(float, store.buckets), store.seconds]}
    return counters, histograms
