from __future__ import annotations

import re
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.context import Admission, RequestContext
from gateway.limits.specs import LEASE, REQUESTS, SLIDING, Spec
from gateway.telemetry.exposition import SCRAPED, render
from gateway.telemetry.metrics import OTHER, RECORDED, Counts, Deployment, LabelCap, Metrics
from gateway.telemetry.views import project

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*").fullmatch
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").fullmatch


def metrics(**overrides: object) -> Metrics:
    m = Metrics()
    options: dict[str, object] = {
        "key_names": (),
        "max_key_names": 2,
        "aliases": ["main"],
        "deployments": {"oai/gpt-x": Deployment("openai", "gpt-x")},
        "prices": {"main": (1.0, 2.0)},
    }
    m.configure(**{**options, **overrides})  # type: ignore[arg-type]
    return m


def answered(identity: str = "team-a", model: str = "main", status: int = 200) -> RequestContext:
    ctx = RequestContext(b"req", 0.0)
    ctx.identity, ctx.model, ctx.status = identity, model, status
    ctx.deployment = "oai/gpt-x"
    ctx.usage = (10, 5)
    ctx.attempts = [("oai/gpt-x", "ok")]
    return ctx


def exposed(m: Metrics) -> tuple[dict[str, Any], dict[str, Any]]:
    return project(m.counts, m.deployments)


def test_names_and_labels_are_valid_prometheus_and_genai_ones_map_the_conventions() -> None:
    for metric in (*RECORDED, *SCRAPED):
        assert NAME(metric.name) and all(LABEL(label) for label in metric.labels), metric
        assert not metric.name.endswith("_total")  # the exposition adds it to counters
    names = {m.name for m in RECORDED}
    # gen_ai.client.token.usage -> gen_ai_client_token_usage; a unit of seconds adds _seconds.
    assert {"gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
            "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"} <= names
    genai = [m for m in RECORDED if m.name.startswith("gen_ai_")]
    assert all(m.labels[:3] == ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
               for m in genai)


def test_key_names_are_capped_with_an_other_bucket() -> None:
    cap = LabelCap(2)
    assert [cap(k) for k in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    allow = LabelCap(100, ["ops"])
    assert (allow("ops"), allow("team-x")) == ("ops", OTHER)


def test_a_flood_of_keys_and_models_stays_bounded() -> None:
    m = metrics()
    for i in range(500):
        m.record(answered(identity=f"key-{i}", model=f"free-text-{i}"), "chat", 1.0)
    assert len(m.counts.rows) == 3
    requests = exposed(m)[0]["gateway_requests"]
    assert {labels[3] for labels in requests} == {"key-0", "key-1", OTHER}
    assert {labels[1] for labels in requests} == {OTHER}


def test_an_allowlist_of_key_names() -> None:
    m = metrics(key_names=["ops"])
    for name in ("ops", "team-x", "team-y"):
        m.record(answered(identity=name), "chat", 1.0)
    assert exposed(m)[0]["gateway_requests"] == {
        ("chat", "main", "oai/gpt-x", "ops", "2xx"): 1.0,
        ("chat", "main", "oai/gpt-x", OTHER, "2xx"): 2.0,
    }


def test_one_request_counts_tokens_cost_and_duration() -> None:
    m = metrics()
    m.record(answered(), "chat", 0.5)
    counters, histograms = exposed(m)
    assert counters["gateway_requests"] == {("chat", "main", "oai/gpt-x", "team-a", "2xx"): 1.0}
    assert counters["gateway_cost_usd"] == {("main", "team-a"): (10 * 1.0 + 5 * 2.0) / 1e6}
    assert counters["gateway_tokens"][("main", "oai/gpt-x", "team-a", "output")] == 5
    assert counters["gateway_upstream_attempts"] == {("oai/gpt-x", "ok"): 1.0}
    duration = histograms["gen_ai_client_operation_duration_seconds"][("chat", "openai", "gpt-x", "")]
    assert duration[-1] == 0.5 and sum(duration[:-1]) == 1
    assert duration[6] == 1  # 0.5 s falls in the le=0.64 bucket (index 6)
    usage = histograms["gen_ai_client_token_usage"]
    assert usage[("chat", "openai", "gpt-x", "input")][-1] == 10
    assert usage[("chat", "openai", "gpt-x", "output")][2] == 1  # 5 tokens: le=16


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    m = metrics()
    m.record(answered(), "chat", 0.01)  # le=0.01 exactly
    (series,) = exposed(m)[1]["gateway_request_duration_seconds"].values()
    assert series[0] == 1


def test_errors_cache_hits_and_unpriced_models() -> None:
    m = metrics(prices={"main": (0.0, 0.0)})
    failed = answered(status=502)
    failed.usage = None
    m.record(failed, "chat", 1.0)
    hit = answered()
    hit.cache = b"hit"
    hit.attempts = []
    m.record(hit, "chat", 1.0)
    counters, histograms = exposed(m)
    ops = histograms["gen_ai_client_operation_duration_seconds"]
    assert set(ops) == {("chat", "openai", "gpt-x", "502")}  # the hit never went upstream
    assert counters["gateway_cache_lookups"] == {("main", "hit"): 1.0}
    assert counters["gateway_cost_usd"] == {} and counters["gateway_tokens"] == {}


def test_a_stream_times_its_first_byte_and_tokens() -> None:
    m = metrics()
    ctx = answered()
    ctx.streamed = 12
    ctx.first_byte, ctx.first_token = 0.05, 0.1
    m.record(ctx, "chat", 0.5)  # 4 output tokens after the first in 0.4 s: 0.1 s each
    histograms = exposed(m)[1]
    assert histograms["gateway_time_to_first_byte_seconds"][("chat", "main")][-1] == 0.05
    assert histograms["gen_ai_server_time_to_first_token_seconds"][("chat", "openai", "gpt-x")][-1] == 0.1
    per_token = histograms["gen_ai_server_time_per_output_token_seconds"][("chat", "openai", "gpt-x")]
    assert abs(per_token[-1] - 0.1) < 1e-9
    assert ("chat", "main", "true") in histograms["gateway_request_duration_seconds"]


def test_retries_and_failovers_by_reason() -> None:
    m = metrics()
    ctx = answered()
    ctx.attempts = [("a/x", "timeout"), ("b/y", "503"), ("b/y", "ok")]
    m.record(ctx, "chat", 1.0)
    counters = exposed(m)[0]
    assert counters["gateway_upstream_retries"] == {
        ("main", "failover", "timeout"): 1.0,
        ("main", "retry", "503"): 1.0,
    }
    assert counters["gateway_upstream_attempts"] == {("a/x", "timeout"): 1.0, ("b/y", "503"): 1.0, ("b/y", "ok"): 1.0}


def test_limit_decisions_by_kind_and_outage() -> None:
    m = metrics()
    admitted = answered()
    admitted.admission = Admission("m", 0, 0)
    rpm = Spec(SLIDING, "k:rpm", 10, 60_000, 3_000, REQUESTS, "rpm", "this key")
    quota = Spec(SLIDING, "d:rpm", 10, 60_000, 3_000, REQUESTS, "rpm", "deployment")
    admitted.admission.charges = [(rpm, 0, 1, None), (quota, 0, 1, object())]  # type: ignore[list-item]
    admitted.admission.lease = Spec(LEASE, "k:conc", 2, 1000, 0, REQUESTS, "conc", "this key")
    admitted.without_store = ("cache",)
    m.record(admitted, "chat", 1.0)
    for label in ("usd", "quota"):
        refused = answered(status=429)
        refused.refused = label
        m.record(refused, "chat", 1.0)
    counters = exposed(m)[0]
    assert counters["gateway_limit_decisions"] == {
        ("rpm", "admitted"): 1.0,
        ("quota", "admitted"): 1.0,
        ("concurrency", "admitted"): 1.0,
        ("budget", "refused"): 1.0,
        ("quota", "refused"): 1.0,
    }
    assert counters["gateway_store_outage_decisions"] == {("cache",): 1.0}


def test_counts_survive_a_round_trip_and_add_up() -> None:
    m = metrics()
    m.record(answered(), "chat", 0.2)
    m.record(answered(status=500), "chat", 0.2)
    copy = Counts.load(orjson.loads(orjson.dumps(m.counts.dump())))
    assert copy.rows == m.counts.rows
    total = Counts()
    total.add(m.counts)
    total.add(copy)
    counters, histograms = project(total, m.deployments)
    assert counters["gateway_requests"][("chat", "main", "oai/gpt-x", "team-a", "2xx")] == 2
    (series,) = [v for k, v in histograms["gateway_request_duration_seconds"].items()]
    assert series[-1] == 0.8 and sum(series[:-1]) == 4


def test_exposition_parses_and_histograms_are_cumulative() -> None:
    m = metrics()
    m.record(answered(), "chat", 0.02)
    m.record(answered(), "chat", 5.0)
    body, content_type = render(m.counts, {"gateway_store_up": {(): 1.0}}, "", m.deployments)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    labels = {"alias": "main", "operation": "chat", "stream": "false"}

    def at(name: str, **more: str) -> float:
        return samples[(name, tuple(sorted({**labels, **more}.items())))]

    assert at("gateway_request_duration_seconds_bucket", le="0.02") == 1
    assert at("gateway_request_duration_seconds_bucket", le="5.12") == 2
    assert at("gateway_request_duration_seconds_bucket", le="+Inf") == 2
    assert at("gateway_request_duration_seconds_count") == 2
    assert samples[("gateway_store_up", ())] == 1


def test_openmetrics_is_negotiated_by_accept() -> None:
    body, content_type = render(Counts(), {}, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert render(Counts(), {}, "text/plain")[1].startswith("text/plain")


def test_store_round_trips_errors_and_latency_add_up_over_workers() -> None:
    m = metrics()
    m.counts.store.observe(0.0007, False)  # le=0.001
    m.counts.store.observe(0.3, True)  # le=0.5
    copy = Counts.load(orjson.loads(orjson.dumps(m.counts.dump())))
    total = Counts()
    total.add(m.counts)
    total.add(copy)
    counters, histograms = project(total, {})
    assert counters["gateway_store_round_trips"] == {(): 4.0}
    assert counters["gateway_store_errors"] == {(): 2.0}
    latency = histograms["gateway_store_round_trip_seconds"][()]
    assert latency[1] == 2 and latency[9] == 2 and abs(latency[-1] - 2 * 0.3007) < 1e-9


def test_breaker_transitions_merge_by_maximum_over_workers() -> None:
    one, two = Counts(), Counts()
    one.counters["gateway_breaker_transitions"][("d", "open")] = 3.0  # every worker saw the same changes
    two.counters["gateway_breaker_transitions"][("d", "open")] = 2.0  # (a replacement worker saw fewer)
    total = Counts()
    total.add(one)
    total.add(two)
    assert total.counters["gateway_breaker_transitions"] == {("d", "open"): 3.0}
