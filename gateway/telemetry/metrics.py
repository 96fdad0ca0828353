"""Request metrics: what each finished request adds, kept as plain Python counts.

A labelled prometheus_client child costs microseconds per update, and its
multiprocess mode writes an mmap on every one; a request here updates a few
dicts instead (one lookup per metric, bounded by the label caps below), and the
exposition (`exposition.py`) turns the counts into metric families at scrape
time. `Counts` is the whole state, so a worker can hand it to the one a scrape
reaches (`workers.py`) and the two add up.

Names follow the OpenTelemetry GenAI semantic conventions where one exists, in
the form the OTEL Prometheus exporter gives them (dots become underscores, the
unit `s` becomes `_seconds`); the rest is Prometheus-style `gateway_*`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from operator import add
from typing import Any, NamedTuple

from gateway.context import RequestContext
from gateway.store import StoreStats
from gateway.store.base import STORE_SECONDS
from gateway.types import Scope

OTHER = "other"  # the label value of everything past a cap

# Buckets: the GenAI conventions' advice for durations and tokens; finer ones for the gateway's own time.
DURATION_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
OVERHEAD_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PER_TOKEN_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
FIRST_TOKEN_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


class Metric(NamedTuple):
    name: str  # as exposed, without the _total / _bucket suffixes
    kind: str  # counter, histogram or gauge
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


# Every metric a request adds to; exposition.py adds the gauges read at scrape time.
REQUESTS = Metric(
    "gateway_requests",
    "counter",
    "Requests to the API operations, by alias, deployment that answered, key name and status class.",
    ("operation", "alias", "deployment", "key", "status_class"),
)
DURATION = Metric(
    "gateway_request_duration_seconds",
    "histogram",
    "Total time from the request's arrival to the end of its answer (streams: the last event).",
    ("operation", "alias", "stream"),
    DURATION_S,
)
OVERHEAD = Metric(
    "gateway_overhead_seconds",
    "histogram",
    "Time spent in the gateway before the answer's head went out, upstream wait excluded "
    "(x-gateway-overhead-ms).",
    ("operation", "stream"),
    OVERHEAD_S,
)
FIRST_BYTE = Metric(
    "gateway_time_to_first_byte_seconds",
    "histogram",
    "Streams: time from the request's arrival until the response head went to the client.",
    ("operation", "alias"),
    FIRST_TOKEN_S,
)
TOKEN_USAGE = Metric(
    "gen_ai_client_token_usage",
    "histogram",
    "Tokens per answer as the upstream reported them (gen_ai.client.token.usage).",
    (*GENAI, "gen_ai_token_type"),
    TOKENS,
)
OPERATION = Metric(
    "gen_ai_client_operation_duration_seconds",
    "histogram",
    "Duration of each request sent upstream, until its answer ended (gen_ai.client.operation.duration).",
    (*GENAI, "error_type"),
    DURATION_S,
)
FIRST_TOKEN = Metric(
    "gen_ai_server_time_to_first_token_seconds",
    "histogram",
    "Streams: time from the request's arrival to its first event relayed "
    "(gen_ai.server.time_to_first_token).",
    GENAI,
    FIRST_TOKEN_S,
)
PER_TOKEN = Metric(
    "gen_ai_server_time_per_output_token_seconds",
    "histogram",
    "Streams: time per output token after the first (gen_ai.server.time_per_output_token).",
    GENAI,
    PER_TOKEN_S,
)
TOKENS_TOTAL = Metric(
    "gateway_tokens",
    "counter",
    "Tokens of answered requests, by key name and type (input, output).",
    ("alias", "deployment", "key", "type"),
)
COST = Metric(
    "gateway_cost_usd",
    "counter",
    "Cost in USD of answered requests, priced from models[].price.",
    ("alias", "key"),
)
CACHE = Metric(
    "gateway_cache_lookups",
    "counter",
    "Cache lookups by result: hit, miss, coalesced (answered by another request's flight), bypass.",
    ("alias", "result"),
)
LIMITS = Metric(
    "gateway_limit_decisions",
    "counter",
    "Limit checks by kind (rpm, tpm, rpd, concurrency, budget, quota) and result (admitted, refused).",
    ("kind", "result"),
)
WITHOUT_STORE = Metric(
    "gateway_store_outage_decisions",
    "counter",
    "Requests a concern (limits, cache) decided without the store, under its outage policy.",
    ("concern",),
)
ATTEMPTS = Metric(
    "gateway_upstream_attempts",
    "counter",
    "Upstream attempts by deployment and outcome (ok, timeout, error, invalid, or the HTTP status).",
    ("deployment", "outcome"),
)
RETRIES = Metric(
    "gateway_upstream_retries",
    "counter",
    "Attempts after the first: retry (same deployment) or failover (another), by the reason (the "
    "previous attempt's outcome).",
    ("alias", "kind", "reason"),
)
TRANSITIONS = Metric(
    "gateway_breaker_transitions",
    "counter",
    "Breaker state changes this replica applied, by deployment and the state entered. Every worker "
    "applies every change, so workers are merged by their maximum, not summed.",
    ("deployment", "state"),
)
STORE_TRIPS = Metric(
    "gateway_store_round_trips",
    "counter",
    "Store round trips on the request path (limit scripts, cache lookups and fills), failed ones included.",
    (),
)
STORE_ERRORS = Metric(
    "gateway_store_errors",
    "counter",
    "Store round trips that failed: unreachable, timed out, connection lost.",
    (),
)
STORE_LATENCY = Metric(
    "gateway_store_round_trip_seconds",
    "histogram",
    "Duration of the store round trips on the request path.",
    (),
    STORE_SECONDS,
)
RECORDED = (
    REQUESTS,
    DURATION,
    OVERHEAD,
    FIRST_BYTE,
    TOKEN_USAGE,
    OPERATION,
    FIRST_TOKEN,
    PER_TOKEN,
    TOKENS_TOTAL,
    COST,
    CACHE,
    LIMITS,
    WITHOUT_STORE,
    ATTEMPTS,
    RETRIES,
    TRANSITIONS,
    STORE_TRIPS,
    STORE_ERRORS,
    STORE_LATENCY,
)

# Operation path -> gen_ai.operation.name (the conventions' well-known values).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/images/generations": "generate_content",
}
# Provider kind -> gen_ai.provider.name; kinds the conventions do not name keep their own name.
PROVIDER_NAMES = {"azure_openai": "azure.ai.openai", "grok": "x_ai"}
# A limit spec's label -> its kind in the metrics and the access log.
LIMIT_KINDS = {
    "rpm": "rpm",
    "tpm": "tpm",
    "rpd": "rpd",
    "usd": "budget",
    "conc": "concurrency",
    "quota": "quota",
}
_CACHE = {b"": "", b"hit": "hit", b"miss": "miss", b"bypass": "bypass"}


# A request's row: its counts, then each histogram's buckets (the last one +Inf) and sum.
REQUESTS_AT, INPUT_AT, OUTPUT_AT, COST_AT, FIRST_OK_AT = range(5)


class Slots(NamedTuple):
    at: int  # where its buckets start; the sum follows the +Inf bucket
    bounds: tuple[float, ...]

    @property
    def end(self) -> int:
        return self.at + len(self.bounds) + 2


DURATION_AT = Slots(5, DURATION_S)
OVERHEAD_AT = Slots(DURATION_AT.end, OVERHEAD_S)
TOKENS_IN_AT = Slots(OVERHEAD_AT.end, TOKENS)
TOKENS_OUT_AT = Slots(TOKENS_IN_AT.end, TOKENS)
FIRST_BYTE_AT = Slots(TOKENS_OUT_AT.end, FIRST_TOKEN_S)
FIRST_TOKEN_AT = Slots(FIRST_BYTE_AT.end, FIRST_TOKEN_S)
PER_TOKEN_AT = Slots(FIRST_TOKEN_AT.end, PER_TOKEN_S)
ROW = PER_TOKEN_AT.end
# The hot path's offsets as plain ints (a NamedTuple property costs a call each time).
_DURATION, _DURATION_SUM = DURATION_AT.at, DURATION_AT.end - 1
_OVERHEAD, _OVERHEAD_SUM = OVERHEAD_AT.at, OVERHEAD_AT.end - 1
_TOKENS_IN, _TOKENS_IN_SUM = TOKENS_IN_AT.at, TOKENS_IN_AT.end - 1
_TOKENS_OUT, _TOKENS_OUT_SUM = TOKENS_OUT_AT.at, TOKENS_OUT_AT.end - 1
# A row's key: (operation, alias, deployment, key name, status, stream, cache result).
RowKey = tuple[str, str, str, str, int, bool, str]


class Counts:
    """One process's whole state: a row of counts per kind of request, and the rarer counters.

    Most metrics share their labels with the request's own, so a request adds to
    one row (one dict lookup) and the exposition projects each metric from the
    rows at scrape time. Events that are not one per request (limit decisions,
    retries, failed attempts, outage decisions) are counters of their own.
    """

    __slots__ = ("counters", "rows", "store")

    def __init__(self) -> None:
        self.store = StoreStats()  # the store counts in it itself (Store.stats)
        self.rows: dict[RowKey, list[float]] = {}
        self.counters: dict[str, dict[tuple[str, ...], float]] = {
            m.name: {} for m in (LIMITS, WITHOUT_STORE, ATTEMPTS, RETRIES, TRANSITIONS)
        }

    def add(self, other: Counts) -> None:
        for key, values in other.rows.items():
            mine = self.rows.get(key)
            if mine is None:
                self.rows[key] = list(values)
            elif len(mine) == len(values):  # else a worker of another version: its row is left out
                for i, value in enumerate(values):
                    mine[i] += value
        for name, series in other.counters.items():
            counter = self.counters.setdefault(name, {})
            merge = max if name == TRANSITIONS.name else add
            for labels, value in series.items():
                counter[labels] = merge(counter.get(labels, 0.0), value)
        store = other.store
        if len(store.buckets) == len(self.store.buckets):
            self.store.buckets = [a + b for a, b in zip(self.store.buckets, store.buckets, strict=True)]
            self.store.seconds += store.seconds
            self.store.errors += store.errors

    def dump(self) -> dict[str, Any]:
        return {
            "rows": [[*k, v] for k, v in self.rows.items()],
            "counters": {n: [[*k, v] for k, v in s.items()] for n, s in self.counters.items()},
            "store": [self.store.buckets, self.store.seconds, self.store.errors],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Counts:
        counts = cls()
        counts.rows = {tuple(row[:-1]): row[-1] for row in data.get("rows", ())}
        for name, rows in data.get("counters", {}).items():
            counts.counters[name] = {tuple(row[:-1]): float(row[-1]) for row in rows}
        if "store" in data:
            counts.store.buckets, counts.store.seconds, counts.store.errors = data["store"]
        return counts


class LabelCap:
    """Label values seen, up to a cap (or an allowlist); everything else is `other`."""

    __slots__ = ("allowed", "limit", "seen")

    def __init__(self, limit: int, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed)
        self.limit = limit
        self.seen: set[str] = set(self.allowed)  # what passes as is: the request path checks it first

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if self.allowed:
            return OTHER
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


class Deployment(NamedTuple):
    provider: str  # gen_ai.provider.name
    model: str  # the upstream model (gen_ai.request.model)


class Metrics:
    """This process's counts, recorded once per request from its context, plus what is in flight.

    One object lives as long as the process (reloads keep it: counters never go
    back); `configure` swaps the tables a new config brings.
    """

    def __init__(self) -> None:
        self.counts = Counts()
        self.inflight: dict[int, Scope] = {}  # id -> scope of requests being served, read at scrape time
        self.keys = LabelCap(100)
        self.aliases: frozenset[str] = frozenset()
        self.deployments: dict[str, Deployment] = {}
        self.prices: dict[str, tuple[float, float]] = {}

    def configure(
        self,
        *,
        key_names: Iterable[str],
        max_key_names: int,
        aliases: Iterable[str],
        deployments: Mapping[str, Deployment],
        prices: Mapping[str, tuple[float, float]],
    ) -> None:
        allowed = frozenset(key_names)
        if allowed != self.keys.allowed or max_key_names != self.keys.limit:
            self.keys = LabelCap(max_key_names, allowed)
        self.aliases = frozenset(aliases)
        self.deployments = dict(deployments)
        self.prices = {alias: price for alias, price in prices.items() if any(price)}

    def record(self, ctx: RequestContext, operation: str, ended: float) -> None:
        """Add one finished request (`ended`: perf_counter at its end). The hot path: keep it lean."""
        model = ctx.model
        # A model the config does not serve is the client's free text: never a label of its own.
        alias = model if model in self.aliases else OTHER if model else ""
        identity = ctx.identity
        key = identity if not identity or identity in self.keys.seen else self.keys(identity)
        stream = ctx.streamed is not None
        cache = "coalesced" if ctx.coalesced else _CACHE[ctx.cache]
        row_key = (operation, alias, ctx.deployment, key, ctx.status, stream, cache)
        row = self.counts.rows.get(row_key)
        if row is None:
            row = self.counts.rows[row_key] = [0.0] * ROW
        row[REQUESTS_AT] += 1
        total = ended - ctx.started
        row[_DURATION + bisect_left(DURATION_S, total)] += 1  # buckets are `le`: a bound is in
        row[_DURATION_SUM] += total
        overhead = ctx.overhead
        if overhead is not None:
            row[_OVERHEAD + bisect_left(OVERHEAD_S, overhead)] += 1
            row[_OVERHEAD_SUM] += overhead
        usage = ctx.usage
        if usage is not None:
            prompt, completion = usage
            row[INPUT_AT] += prompt
            row[OUTPUT_AT] += completion
            row[_TOKENS_IN + bisect_left(TOKENS, prompt)] += 1
            row[_TOKENS_IN_SUM] += prompt
            row[_TOKENS_OUT + bisect_left(TOKENS, completion)] += 1
            row[_TOKENS_OUT_SUM] += completion
            if model in self.prices:
                price_in, price_out = self.prices[model]
                row[COST_AT] += (prompt * price_in + completion * price_out) / 1e6
        if stream:
            self._stream(ctx, row, ended)
        attempts = ctx.attempts
        if len(attempts) == 1 and attempts[0][1] == "ok":
            row[FIRST_OK_AT] += 1
        elif attempts:
            self._attempts(attempts, alias)
        if ctx.admission is not None or ctx.refused or ctx.without_store:
            self._decisions(ctx)

    def _stream(self, ctx: RequestContext, row: list[float], ended: float) -> None:
        if ctx.first_byte:
            _observe(row, FIRST_BYTE_AT, ctx.first_byte - ctx.started)
        if ctx.first_token:
            _observe(row, FIRST_TOKEN_AT, ctx.first_token - ctx.started)
            output = ctx.usage[1] if ctx.usage is not None else 0
            if output > 1:
                _observe(row, PER_TOKEN_AT, (ended - ctx.first_token) / (output - 1))

    def _attempts(self, attempts: list[tuple[str, str]], alias: str) -> None:
        counters = self.counts.counters
        tried, retried = counters[ATTEMPTS.name], counters[RETRIES.name]
        previous: tuple[str, str] | None = None
        for deployment, outcome in attempts:
            _inc(tried, (deployment, outcome))
            if previous is not None:
                kind = "retry" if previous[0] == deployment else "failover"
                _inc(retried, (alias, kind, previous[1]))
            previous = (deployment, outcome)

    def _decisions(self, ctx: RequestContext) -> None:
        counters = self.counts.counters
        limits = counters[LIMITS.name]
        admission = ctx.admission
        if admission is not None:
            for spec, _, _, route in admission.charges:
                _inc(limits, ("quota" if route is not None else LIMIT_KINDS[spec.label], "admitted"))
            if admission.lease is not None:
                _inc(limits, ("concurrency", "admitted"))
        if ctx.refused:
            _inc(limits, (LIMIT_KINDS[ctx.refused], "refused"))
        for concern in ctx.without_store:
            _inc(counters[WITHOUT_STORE.name], (concern,))


def _inc(series: dict[tuple[str, ...], float], labels: tuple[str, ...]) -> None:
    series[labels] = series.get(labels, 0.0) + 1


def _observe(row: list[float], slots: Slots, value: float) -> None:
    at, bounds = slots
    row[at + bisect_left(bounds, value)] += 1
    row[at + len(bounds) + 1] += value
