"""GET /metrics: the counts and gauges as Prometheus text, or OpenMetrics when the scraper asks.

prometheus_client does the formats and the content negotiation (`choose_encoder`
reads Accept); the families are built from plain counts at scrape time, so the
request path never touches it. With `metrics.auth: admin` the admin key is
required (Authorization: Bearer or x-api-key), compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import (
    Metric as Family,
)

from gateway.auth.middleware import credential
from gateway.errors import AuthenticationError, GatewayError, MethodNotAllowed
from gateway.telemetry.metrics import RECORDED, Counts, Deployment, Metric
from gateway.telemetry.views import project
from gateway.telemetry.workers import Gauges
from gateway.types import Receive, Scope, Send

# Read at scrape time, never updated per request. Summed over workers: in flight, streams, connections.
INFLIGHT = Metric("gateway_requests_in_flight", "gauge", "Requests being served now.", ())
STREAMS = Metric("gateway_streams_open", "gauge", "Streamed answers being relayed now.", ())
CONNECTIONS = Metric(
    "gateway_upstream_connections",
    "gauge",
    "Pooled upstream connections by provider and state (in_use, idle).",
    ("provider", "state"),
)
BREAKER = Metric(
    "gateway_breaker_state",
    "gauge",
    "1 for each deployment's current breaker state (closed, open, half_open), shared by every replica.",
    ("deployment", "state"),
)
PROVIDER_KEYS = Metric(
    "gateway_provider_keys",
    "gauge",
    "A provider's API keys by state: usable, or retired after a 401/403 until reload (the scraped worker's).",
    ("provider", "state"),
)
STORE_UP = Metric("gateway_store_up", "gauge", "1 when the store answered this scrape's ping, else 0.", ())
WORKERS = Metric("gateway_workers", "gauge", "Worker processes of this replica counted in this scrape.", ())
SCRAPED = (INFLIGHT, STREAMS, CONNECTIONS, BREAKER, PROVIDER_KEYS, STORE_UP, WORKERS)
BREAKER_STATES = ("closed", "open", "half_open")

Scrape = Callable[[], Awaitable[tuple[Counts, Gauges, Mapping[str, Deployment]]]]


class Families:
    """A prometheus_client collector over one scrape's counts and gauges."""

    def __init__(self, counts: Counts, gauges: Gauges, deployments: Mapping[str, Deployment]) -> None:
        self.counters, self.histograms = project(counts, deployments)
        self.gauges = gauges

    def collect(self) -> Iterator[Family]:
        for metric in RECORDED:
            if metric.kind == "counter":
                counter = CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
                for labels, value in sorted(self.counters.get(metric.name, {}).items()):
                    counter.add_metric(labels, value)
                yield counter
                continue
            histogram = HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
            bounds = [*(_le(b) for b in metric.buckets), "+Inf"]
            for labels, values in sorted(self.histograms.get(metric.name, {}).items()):
                cumulative, buckets = 0.0, []
                for bound, count in zip(bounds, values[:-1], strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                histogram.add_metric(labels, buckets, values[-1])
            yield histogram
        for metric in SCRAPED:
            gauge = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            for labels, value in sorted(self.gauges.get(metric.name, {}).items()):
                gauge.add_metric(labels, value)
            yield gauge


def _le(bound: float) -> str:
    return repr(float(bound))


def render(
    counts: Counts, gauges: Gauges, accept: str, deployments: Mapping[str, Deployment] | None = None
) -> tuple[bytes, str]:
    """The exposition in the format `accept` asks for (OpenMetrics or Prometheus text 0.0.4)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(Families(counts, gauges, deployments or {})), content_type


class MetricsEndpoint:
    """The ASGI app of GET /metrics, on the main port or the separate one."""

    def __init__(self, scrape: Scrape, admin_key: Callable[[], str | None]) -> None:
        self.scrape = scrape
        self.admin_key = admin_key  # the key required now (configs reload), None when the endpoint is open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"Method {scope['method']} is not allowed on /metrics.")
            required = self.admin_key()
            if required is not None:
                given = credential(scope["headers"]) or b""
                if not required or not hmac.compare_digest(given, required.encode()):
                    raise AuthenticationError("The metrics need the admin key.", code="invalid_admin_key")
        except GatewayError as exc:
            await _answer(send, exc.status, "application/json", exc.body(), exc.headers)
            return
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), "")
        counts, gauges, deployments = await self.scrape()
        body, content_type = render(counts, gauges, accept, deployments)
        await _answer(send, 200, content_type, b"" if scope["method"] == "HEAD" else body)


async def _answer(
    send: Send, status: int, content_type: str, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
