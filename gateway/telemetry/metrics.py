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

import bisect
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from gateway.context import RequestContext
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
_STATUS_CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_STREAM = {True: "true", False: "false"}
_EMPTY = (0, 0)


class Counts:
    """Counter values and histogram buckets per metric and label values: one process's whole state.

    A histogram series is [count per bucket..., count above the last, sum].
    """

    __slots__ = ("counters", "histograms")

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[str, ...], float]] = {
            m.name: {} for m in RECORDED if m.kind == "counter"
        }
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {
            m.name: {} for m in RECORDED if m.kind == "histogram"
        }

    def add(self, other: Counts) -> None:
        for name, series in other.counters.items():
            mine = self.counters.setdefault(name, {})
            for labels, value in series.items():
                mine[labels] = mine.get(labels, 0.0) + value
        for name, hseries in other.histograms.items():
            hmine = self.histograms.setdefault(name, {})
            for labels, values in hseries.items():
                have = hmine.get(labels)
                if have is None or len(have) != len(values):  # buckets changed: the newer layout wins
                    hmine[labels] = list(values)
                else:
                    for i, value in enumerate(values):
                        have[i] += value

    def dump(self) -> dict[str, Any]:
        return {
            "counters": {n: [[*k, v] for k, v in s.items()] for n, s in self.counters.items()},
            "histograms": {n: [[*k, v] for k, v in s.items()] for n, s in self.histograms.items()},
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Counts:
        counts = cls()
        for name, rows in data.get("counters", {}).items():
            counts.counters[name] = {tuple(row[:-1]): float(row[-1]) for row in rows}
        for name, rows in data.get("histograms", {}).items():
            counts.histograms[name] = {tuple(row[:-1]): [float(x) for x in row[-1]] for row in rows}
        return counts


class LabelCap:
    """Label values seen, up to a cap (or an allowlist); everything else is `other`."""

    __slots__ = ("allowed", "limit", "seen")

    def __init__(self, limit: int, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed)
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if self.allowed:
            return value if value in self.allowed else OTHER
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
        self.prices = dict(prices)

    def alias(self, model: str) -> str:
        # A model the config does not serve is the client's free text: never a label of its own.
        return model if model in self.aliases else OTHER if model else ""

    def record(self, ctx: RequestContext, operation: str, ended: float) -> None:
        """Add one finished request (`ended`: perf_counter at its end)."""
        counters, histograms = self.counts.counters, self.counts.histograms
        alias = self.alias(ctx.model)
        key = self.keys(ctx.identity) if ctx.identity else ""
        deployment = ctx.deployment
        status = ctx.status
        _inc(
            counters["gateway_requests"],
            (operation, alias, deployment, key, _STATUS_CLASSES.get(status // 100, "none")),
        )
        stream = ctx.streamed is not None
        total = ended - ctx.started
        _observe(histograms[DURATION.name], (operation, alias, _STREAM[stream]), total, DURATION_S)
        if ctx.overhead is not None:
            _observe(histograms[OVERHEAD.name], (operation, _STREAM[stream]), ctx.overhead, OVERHEAD_S)
        if ctx.cache:
            result = "coalesced" if ctx.coalesced else ctx.cache.decode()
            _inc(counters["gateway_cache_lookups"], (alias, result))
        admission = ctx.admission
        if admission is not None:
            limits = counters["gateway_limit_decisions"]
            for spec, _, _, route in admission.charges:
                _inc(limits, ("quota" if route is not None else LIMIT_KINDS[spec.label], "admitted"))
            if admission.lease is not None:
                _inc(limits, ("concurrency", "admitted"))
        if ctx.refused:
            _inc(counters["gateway_limit_decisions"], (LIMIT_KINDS[ctx.refused], "refused"))
        for concern in ctx.without_store:
            _inc(counters["gateway_store_outage_decisions"], (concern,))
        if ctx.attempts:
            self._attempts(ctx, alias)
        target = self.deployments.get(deployment)
        if target is None or ctx.cache == b"hit":
            return  # no upstream answered this one (refused, a cache hit, or a follower)
        genai = (operation, target.provider, target.model)
        error = "" if 0 < status < 400 else str(status) if status else "cancelled"
        _observe(histograms[OPERATION.name], (*genai, error), total, DURATION_S)
        if stream:
            if ctx.first_byte:
                first_byte = ctx.first_byte - ctx.started
                _observe(histograms[FIRST_BYTE.name], (operation, alias), first_byte, FIRST_TOKEN_S)
            if ctx.first_token:
                first = ctx.first_token - ctx.started
                _observe(histograms[FIRST_TOKEN.name], genai, first, FIRST_TOKEN_S)
                output = ctx.usage[1] if ctx.usage is not None else 0
                if output > 1:
                    per_token = (ended - ctx.first_token) / (output - 1)
                    _observe(histograms[PER_TOKEN.name], genai, per_token, PER_TOKEN_S)
        usage = ctx.usage
        if usage is not None and usage != _EMPTY:
            usage_series = histograms[TOKEN_USAGE.name]
            tokens = counters["gateway_tokens"]
            _observe(usage_series, (*genai, "input"), usage[0], TOKENS)
            _observe(usage_series, (*genai, "output"), usage[1], TOKENS)
            _inc(tokens, (alias, deployment, key, "input"), usage[0])
            _inc(tokens, (alias, deployment, key, "output"), usage[1])
            price_in, price_out = self.prices.get(ctx.model, _EMPTY)
            if price_in or price_out:
                cost = (usage[0] * price_in + usage[1] * price_out) / 1e6
                _inc(counters["gateway_cost_usd"], (alias, key), cost)

    def _attempts(self, ctx: RequestContext, alias: str) -> None:
        attempts = self.counts.counters["gateway_upstream_attempts"]
        retries = self.counts.counters["gateway_upstream_retries"]
        previous: tuple[str, str] | None = None
        for deployment, outcome in ctx.attempts:
            _inc(attempts, (deployment, outcome))
            if previous is not None:
                kind = "retry" if previous[0] == deployment else "failover"
                _inc(retries, (alias, kind, previous[1]))
            previous = (deployment, outcome)


def _inc(series: dict[tuple[str, ...], float], labels: tuple[str, ...], amount: float = 1.0) -> None:
    series[labels] = series.get(labels, 0.0) + amount


def _observe(
    series: dict[tuple[str, ...], list[float]],
    labels: tuple[str, ...],
    value: float,
    bounds: tuple[float, ...],
) -> None:
    values = series.get(labels)
    if values is None:
        values = series[labels] = [0.0] * (len(bounds) + 2)
    values[bisect.bisect_left(bounds, value)] += 1  # Prometheus buckets are `le`: a value on a bound is in it
    values[-1] += value
