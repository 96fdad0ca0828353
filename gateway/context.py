"""Per-request state shared by the middlewares and the forwarding app (scope["gateway"]).

It sits below every concern: the records that pass from one middleware to another (what the
limits charged, the cache's planned lookup) live here, so no concern imports another for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError
from gateway.store import Call
from gateway.types import Send

if TYPE_CHECKING:
    from gateway.auth.keys import Policy
    from gateway.limits.specs import Spec
    from gateway.providers import Operation
    from gateway.routing.router import Route
    from gateway.telemetry.tracing import RequestTrace


class Admission:
    """What a request was charged, for `settle`."""

    __slots__ = ("charges", "cost", "lease", "local", "member", "prepaid", "skipped", "tokens")

    def __init__(self, member: str, tokens: int, cost: int) -> None:
        self.member = member
        self.tokens = tokens  # the estimate charged to token limits
        self.cost = cost  # the estimate charged to budgets, nano-USD
        self.charges: list[tuple[Spec, int, int, Route | None]] = []  # spec, now ms, amount, deployment
        self.lease: Spec | None = None
        self.prepaid: Route | None = None  # its quota is paid for the first attempt
        self.skipped: tuple[Route, ...] = ()  # over their quota: the router must not try them
        self.local = False  # admitted on this replica's own counts (store down)


class Lookup:
    """A cacheable request's lookup, planned before the rate-limit admission so both share a round trip."""

    __slots__ = ("call", "key", "lock", "reply", "token", "ttl_s")

    def __init__(self, key: str, lock: str, token: str, call: Call | None, ttl_s: float) -> None:
        self.key = key
        self.lock = lock  # the flight's lock: see ResponseCache.lock
        self.ttl_s = ttl_s  # how long the answer is kept, should it be stored
        self.token = token  # ours, should the claim make us lead
        self.call = call  # CLAIM; None for a refresh, which neither reads nor follows
        self.reply: list[bytes] | None = None  # CLAIM's reply, once run


class RequestContext:
    __slots__ = (
        "admission",
        "attempts",
        "body",
        "cache",
        "coalesced",
        "complete",
        "deployment",
        "extra_headers",
        "first_byte",
        "first_token",
        "identity",
        "lookup",
        "model",
        "operation",
        "overhead",
        "plan",
        "policy",
        "refused",
        "request_id",
        "responded",
        "started",
        "status",
        "streamed",
        "tokens",
        "trace",
        "usage",
        "without_store",
    )

    def __init__(self, request_id: bytes, started: float) -> None:
        self.request_id = request_id
        self.started = started  # perf_counter() when the request reached the gateway
        self.policy: Policy | None = None
        self.identity = ""  # who is calling, for the access log: a key's name, or "admin"
        self.operation: Operation | None = None
        self.body: dict[str, Any] = {}
        self.model = ""  # the alias the client asked for (adapters rewrite body["model"])
        self.responded = False  # the response head has gone out: errors can no longer be sent whole
        self.status = 0
        self.complete = False  # the whole answer went out (a stream that broke midway did not)
        self.cache = b""  # x-cache: hit, miss or bypass, when the cache is on
        self.extra_headers: list[tuple[bytes, bytes]] = []  # e.g. x-ratelimit-*, for every answer
        self.tokens: int | None = None  # the answer's prompt + completion tokens, when it says
        self.streamed: int | None = None  # stream events relayed to the client; None: not a stream
        self.deployment = ""  # provider/model the request went to, for the access log
        self.usage: tuple[int, int] | None = None  # the answer's (prompt, completion) tokens, when it says
        self.plan: list[Route] | None = None  # the deployments to try, once resolved
        self.admission: Admission | None = None  # what the limits charged, to settle afterwards
        self.trace: RequestTrace | None = None  # the request's spans, when tracing is on
        self.lookup: Lookup | None = None  # the cache lookup, planned before admission to share its trip
        # For the metrics and the access log:
        self.attempts: list[tuple[str, str]] = []  # (deployment, outcome) of each upstream attempt
        self.overhead: float | None = None  # seconds in the gateway before the answer's head, upstream out
        self.first_byte = 0.0  # perf_counter() when a relayed answer's head went out
        self.first_token = 0.0  # perf_counter() when a stream's first event went out
        self.coalesced = False  # answered from another request's flight
        self.refused = ""  # the limit that refused it: its spec label (rpm, tpm, rpd, usd, conc) or quota
        self.without_store: tuple[str, ...] = ()  # concerns (limits, cache) that decided without the store

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers every response carries."""
        headers = [(b"x-request-id", self.request_id), *self.extra_headers]
        if self.cache:
            headers.append((b"x-cache", self.cache))
        return headers

    async def send_error(self, send: Send, exc: GatewayError) -> None:
        """Answer with `exc` as a complete JSON response (nothing may have been sent yet)."""
        body = exc.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *exc.headers,
            *self.headers(),
        ]
        self.responded = True
        self.status = exc.status
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
