"""A request's admission: the limits that apply, one script run, the 429, and the settling after.

`admit` gathers the key's limits, the key's limits on the model and the quotas
of the model's deployments up to the first one without a quota (the router's
order; deployments whose breaker is open are left out), and runs the ADMIT
script once. `charge` pays a deployment's quota when a failed attempt moves on
to it. `settle`, after the answer went out, corrects the tokens and cost to the
real usage and releases the concurrency lease, in one more script run.

Store down (`outage.py`): `store.outage.limits: open` (the default) serves and counts
rpm, tpm, rpd and concurrency on this replica alone, `closed` answers 503; a key with
a budget is answered 503 under `store.outage.budgets: closed` (the default), or with
`open` its spend is counted here and written to the store when it answers again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from gateway.config import Limits
from gateway.context import Admission, Lookup, RequestContext
from gateway.errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.limits.outage import Ledger, Local
from gateway.limits.specs import (
    ADMIT,
    CORRECT,
    COST,
    DEFAULT_COMPLETION_TOKENS,
    LEASE,
    NANO_USD_PER_MTOK,
    PREFIX,
    RECONCILE,
    RELEASE,
    REQUESTS,
    SETTLE,
    TOKENS,
    Spec,
    counter_of,
    estimate,
    lease_member,
    reason,
    specs_of,
)
from gateway.store import Call, Store, StoreError
from gateway.tasks import Background

if TYPE_CHECKING:
    from gateway.auth.keys import Policy
    from gateway.routing.breaker import Breakers
    from gateway.routing.router import Route

log = logging.getLogger("gateway.limiter")
_LOG_EVERY_S = 10.0
_HEADER_KIND = {REQUESTS: b"requests", TOKENS: b"tokens"}


class Limiter:
    def __init__(
        self,
        store: Store,
        breakers: Breakers,
        prices: Mapping[str, tuple[float, float]],
        completion_estimates: Mapping[str, int],
        *,
        lease_s: float,
        outage: Literal["open", "closed"] = "open",
        budget_outage: Literal["open", "closed"] = "closed",
    ) -> None:
        self.store = store
        self.breakers = breakers
        self.prices = prices  # alias -> USD per million prompt / completion tokens
        self.completion_estimates = completion_estimates  # alias -> tokens when max_tokens is unset
        self.lease_ms = math.ceil(lease_s * 1000)
        self.outage = outage
        self._local = Local()
        self.ledger = Ledger() if budget_outage == "open" else None
        self._settling = Batch(store)
        self._logged = -_LOG_EVERY_S
        self.without_store = 0  # requests decided while the store was unreachable (GET /health/store)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (the limiter lives as long as its config)
    def specs(self, key_id: str, limits: Limits, alias: str, model_limits: Limits | None) -> tuple[Spec, ...]:
        found = specs_of(limits, f"k:{key_id}", "this key", self.lease_ms)
        if model_limits:
            scope = f"this key for `{alias}`"
            # One lease per request: a concurrency cap is the key's (config refuses it per model).
            per_model = specs_of(model_limits, f"k:{key_id}:m:{alias}", scope, 0)
            found += tuple(s for s in per_model if s.kind != LEASE)
        return found

    def _estimate(self, ctx: RequestContext) -> tuple[int, int]:
        prompt, completion = estimate(
            ctx.body, self.completion_estimates.get(ctx.model, DEFAULT_COMPLETION_TOKENS)
        )
        return prompt + completion, self.cost(ctx.model, prompt, completion)

    def cost(self, alias: str, prompt: int, completion: int) -> int:
        price_in, price_out = self.prices.get(alias, (0.0, 0.0))
        return math.ceil((prompt * price_in + completion * price_out) * NANO_USD_PER_MTOK)

    async def admit(
        self, ctx: RequestContext, plan: list[Route], lookup: Lookup | None = None
    ) -> Admission | None:
        """Charge every limit of the request or raise the 429 naming the one that said no.

        Returns None when nothing limits this request. Sets the x-ratelimit-* headers.
        A cache `lookup` to run goes in the same round trip; its reply lands in `lookup.reply`.
        """
        policy: Policy | None = ctx.policy
        assert policy is not None
        required = self.specs(policy.key_id, policy.limits, ctx.model, policy.model_limits.get(ctx.model))
        alternatives: list[Route] = []
        free = 0
        for route in plan:
            if self.breakers.rejects(route.id):
                continue
            if not route.quota:
                free = 1
                break
            alternatives.append(route)
        if not required and not alternatives:
            return None
        admission = Admission(lease_member() if any(s.kind == LEASE for s in required) else "", 0, 0)
        if _counts_usage(required) or any(_counts_usage(r.quota) for r in alternatives):
            admission.tokens, admission.cost = self._estimate(ctx)  # serialises the prompt: only when needed
        args: list[str | int | bytes] = [admission.member, len(alternatives), free]
        for group, specs in enumerate((required, *(r.quota for r in alternatives))):
            for spec in specs:
                args += spec.args(group, self._amount(spec, admission))
        calls: list[Call] = [(ADMIT, [PREFIX], args)]
        if lookup is not None and lookup.call is not None:
            calls.append(lookup.call)
        ledger = self.ledger
        # The first admission after an outage first writes the budgets' spend this replica owes.
        owed = ledger.take() if ledger else []
        if owed:
            calls.insert(0, (RECONCILE, [PREFIX], owed))
        trace = ctx.trace
        span = trace.store_call(", ".join(c[0].name for c in calls)) if trace is not None else None
        failed: StoreError | None = None
        try:
            if len(calls) == 1:
                replies = [await self.store.run(ADMIT, [PREFIX], args)]
            else:
                replies = await self.store.run_many(calls)
        except StoreError as exc:
            replies, failed = [exc] * len(calls), exc
        if trace is not None:
            trace.end_store(span, failed)
        if owed and isinstance(replies.pop(0), StoreError) and ledger is not None:
            ledger.restore(owed)  # the store did not take it: owed still
        reply = replies[0]
        if lookup is not None and len(replies) > 1 and not isinstance(replies[1], StoreError):
            lookup.reply = replies[1]  # else the cache tries on its own
        if isinstance(reply, StoreError):
            return self._without_store(ctx, required, admission, reply)
        admitted, refused, reset_ms, chosen, now = (int(x) for x in reply[:5])
        ctx.extra_headers += _headers(required, [int(x) for x in reply[5:]])
        if ledger is not None:
            for index, spec in enumerate(required):
                if spec.counts == COST:  # what this budget has spent, should the store go away
                    ledger.seen(spec, now, int(reply[5 + 2 * index]))
        if not admitted:
            every = [*required, *(s for r in alternatives for s in r.quota)]
            spec = every[refused - 1]
            ctx.refused = "quota" if refused > len(required) else spec.label
            raise _refusal(spec, reset_ms, refused > len(required), ctx.model, self._amount(spec, admission))
        admission.lease = next((s for s in required if s.kind == LEASE), None)
        admission.charges += [(s, now, self._amount(s, admission), None) for s in required if s.kind != LEASE]
        if chosen:
            route = alternatives[chosen - 1]
            admission.prepaid = route
            admission.charges += [(s, now, self._amount(s, admission), route) for s in route.quota]
        admission.skipped = tuple(alternatives[: chosen - 1] if chosen else alternatives)
        return admission

    def _amount(self, spec: Spec, admission: Admission) -> int:
        return admission.tokens if spec.counts == TOKENS else admission.cost if spec.counts == COST else 1

    async def charge(self, ctx: RequestContext, route: Route) -> GatewayError | None:
        """Pay `route`'s quota for another attempt: None when paid, else the refusal (its Retry-After
        when that deployment has room again), and the caller tries the next one."""
        if ctx.admission is None:
            ctx.admission = Admission("", 0, 0)
        admission = ctx.admission
        if not admission.tokens and _counts_usage(route.quota):
            admission.tokens, admission.cost = self._estimate(ctx)
        args: list[str | int | bytes] = ["", 0, 0]
        for spec in route.quota:
            args += spec.args(0, self._amount(spec, admission))
        try:
            reply = await self.store.run(ADMIT, [PREFIX], args)
        except StoreError as exc:
            self._log_outage(exc)
            if self.outage == "open":
                return None
            return ServiceUnavailable(
                "Deployment quotas cannot be checked right now (store unreachable); try again shortly.",
                code="limits_unavailable",
            )
        if not int(reply[0]):
            spec = route.quota[int(reply[1]) - 1]
            return _refusal(spec, int(reply[2]), True, ctx.model, self._amount(spec, admission))
        now = int(reply[4])
        admission.charges += [(s, now, self._amount(s, admission), route) for s in route.quota]
        return None

    async def settle(self, ctx: RequestContext) -> None:
        """Correct the estimates to what the answer used and release the lease."""
        admission = ctx.admission
        assert admission is not None
        hit = ctx.cache == b"hit"
        usage = ctx.usage if ctx.status == 200 and not hit else (0, 0)
        capped = usage is None and ctx.streamed is not None
        if capped:
            # A stream cut short before its usage: the prompt, and about a token per event relayed.
            usage = (estimate(ctx.body)[0], ctx.streamed or 0)
        args: list[str | int | bytes] = []
        if admission.lease is not None:
            args += [RELEASE, admission.lease.name, admission.member]
        for spec, now, amount, route in admission.charges:
            if spec.counts == REQUESTS:
                actual = 0 if hit and route is not None else amount  # a hit never reached the deployment
            elif usage is None:
                continue  # no usage reported (a stream cut short): the estimate stands
            elif route is not None and route.id != ctx.deployment:
                actual = 0  # a failed attempt's deployment produced no tokens
            elif spec.counts == TOKENS:
                actual = usage[0] + usage[1]
            else:
                actual = self.cost(ctx.model, *usage)
            if capped:
                actual = min(actual, amount)
            if actual != amount:
                if admission.local:  # only its budgets were recorded: owed to the store later
                    assert self.ledger is not None
                    self.ledger.correct(spec, now, actual - amount)
                else:
                    args += [CORRECT, counter_of(spec, now), actual - amount]
        if admission.local:
            self._local.release(admission.member)
        elif args:  # nothing to correct and no lease: no round trip
            await self._settling.add(args)

    def _without_store(
        self, ctx: RequestContext, required: tuple[Spec, ...], admission: Admission, exc: StoreError
    ) -> Admission | None:
        self._log_outage(exc)
        ctx.without_store += ("limits",)
        budgets = sum(spec.counts == COST for spec in required)
        if budgets and self.ledger is None:
            raise ServiceUnavailable(
                "Budgets cannot be checked right now (store unreachable); try again shortly.",
                code="budget_unavailable",
            )
        if self.outage == "closed" and (budgets < len(required) or not required):
            raise ServiceUnavailable(
                "Rate limits cannot be checked right now (store unreachable); try again shortly.",
                code="limits_unavailable",
            )
        refused = self._local.admit(required, admission, self.ledger)
        if refused is not None:
            spec, reset_ms = refused
            ctx.refused = spec.label
            raise _refusal(spec, reset_ms, False, ctx.model, self._amount(spec, admission))
        admission.local = True
        return admission

    def _log_outage(self, exc: StoreError) -> None:
        self.without_store += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            policy = "counting on this replica alone" if self.outage == "open" else "refusing with 503"
            budgets = "counted here till it is back" if self.ledger is not None else "refused with 503"
            n = self.without_store
            log.error("limits: store unreachable, %s, budgets %s (%d so far): %s", policy, budgets, n, exc)


class Batch:
    """Settlements that arrive while one is on its way to the store go together, in one SETTLE.

    Nothing waits to fill a batch: at low load each goes at once; under load the
    round trips per request fall with the queue.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: list[tuple[list[str | int | bytes], asyncio.Future[None]]] = []
        self._draining = False
        self._background = Background()

    async def add(self, args: list[str | int | bytes]) -> None:
        """Queue `args` and wait until they were applied (or failed: logged, the estimates stand)."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((args, done))
        if not self._draining:
            self._draining = True
            self._background.spawn(self._drain())
        await asyncio.shield(done)  # a cancelled request must not cancel the others' batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self.store.run(SETTLE, [PREFIX], [a for args, _ in batch for a in args])
                except StoreError as exc:
                    log.warning("limits of %d requests not settled (estimates stand): %s", len(batch), exc)
                for _, done in batch:
                    done.set_result(None)
        finally:
            self._draining = False


def _counts_usage(specs: tuple[Spec, ...]) -> bool:
    """Whether any of `specs` is charged tokens or cost (then the request's estimate is needed)."""
    return any(spec.counts != REQUESTS for spec in specs)


def _headers(specs: tuple[Spec, ...], reply: list[int]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* trio for requests and for tokens: the limit with least room left."""
    tightest: dict[int, tuple[int, int, int]] = {}
    for index, spec in enumerate(specs):
        if spec.kind == LEASE or spec.counts == COST:
            continue
        remaining, reset = reply[2 * index], reply[2 * index + 1]
        if spec.counts not in tightest or remaining < tightest[spec.counts][1]:
            tightest[spec.counts] = (spec.limit, remaining, reset)
    headers = []
    for counts, (limit, remaining, reset) in sorted(tightest.items()):
        kind = _HEADER_KIND[counts]
        headers += [
            (b"x-ratelimit-limit-" + kind, b"%d" % limit),
            (b"x-ratelimit-remaining-" + kind, b"%d" % remaining),
            (b"x-ratelimit-reset-" + kind, b"%.3fs" % (reset / 1000)),
        ]
    return headers


def _refusal(spec: Spec, reset_ms: int, deployments: bool, alias: str, amount: int) -> RateLimited:
    """The 429 for `spec`. Its Retry-After is when a retry would be let in (reset_ms, rounded up to
    whole seconds), absent when none ever would (the request alone is over the limit)."""
    if amount > spec.limit:
        asked, limit = _quantity(spec, amount), _quantity(spec, spec.limit)
        if deployments:
            message = f"more than any deployment of model `{alias}` allows ({reason(spec)}: {limit})"
        else:
            message = f"more than the limit of {limit} for {reason(spec)}"
        error = QuotaExceeded if spec.counts == COST and not deployments else RateLimited
        return error(
            f"This request alone needs {asked}, {message}; it cannot be admitted as it is.",
            headers=[(b"x-should-retry", b"false")],  # the OpenAI SDKs would retry a 429 otherwise
        )
    wait = max(1, math.ceil(reset_ms / 1000))
    headers = [(b"retry-after", b"%d" % wait), (b"retry-after-ms", b"%d" % reset_ms)]
    if deployments:
        return RateLimited(
            f"Every deployment of model `{alias}` is at its quota ({reason(spec)}). "
            f"Please try again in {reset_ms / 1000:.1f}s.",
            code="deployment_quota_exceeded",
            headers=headers,
        )
    if spec.counts == COST:
        return QuotaExceeded(
            f"Budget of ${spec.limit / 1e9:g} reached on {spec.scope}; it resets in {reset_ms / 1000:.0f}s.",
            headers=headers,
        )
    if spec.kind == LEASE:
        # A slot frees when a request in flight ends, which no clock tells: 1 s is a hint to poll.
        message = f"Too many {reason(spec)}: {spec.limit} already in flight. Retry when one has finished."
    else:
        message = f"Rate limit reached for {reason(spec)}: limit {spec.limit}."
    return RateLimited(f"{message} Please try again in {reset_ms / 1000:.1f}s.", headers=headers)


def _quantity(spec: Spec, amount: int) -> str:
    return f"${amount / 1e9:g}" if spec.counts == COST else f"{amount} tokens"  # requests cost 1: always fit
