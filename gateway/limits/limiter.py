"""A request's admission: the limits that apply, one round trip, the 429, and the settling after.

`admit` gathers the key's limits and the key's limits on the model (one ADMIT
call, on the key's hash tag) and the quotas of the model's deployments up to the
first one without a quota (the router's order; deployments whose breaker is open
are left out). The key's call and the first deployment's (on its own tag) go in
one round trip; a later deployment is asked only when the ones before it are
full. Each call charges all its counters or none; when one side refuses, what
the other reserved is given back. `charge` pays a deployment's quota when a
failed attempt moves on to it. `settle`, after the answer went out, corrects the
tokens and cost to the real usage and releases the concurrency lease, batched
with other requests' (one SETTLE per tag, in one round trip).

Store down (`outage.py`): `store.outage.limits: open` (the default) serves and counts
rpm, tpm, rpd and concurrency on this replica alone, `closed` answers 503; a key with
a budget is answered 503 under `store.outage.budgets: closed` (the default), or with
`open` its spend is counted here and written to the store when it answers again.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from gateway.config import Limits
from gateway.context import Admission, Lookup, RequestContext
from gateway.errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.limits.batch import Batch
from gateway.limits.outage import Ledger, Local
from gateway.limits.specs import (
    ADMIT,
    COST,
    DEFAULT_COMPLETION_TOKENS,
    LEASE,
    NANO_USD_PER_MTOK,
    RELEASE,
    REQUESTS,
    TOKENS,
    Spec,
    correction,
    estimate,
    key_base,
    later,
    lease_member,
    reason,
    specs_of,
)
from gateway.store import Call, Store, StoreError

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
        base = key_base(key_id)
        found = specs_of(limits, base, "this key", self.lease_ms)
        if model_limits:
            scope = f"this key for `{alias}`"
            # One lease per request: a concurrency cap is the key's (config refuses it per model).
            per_model = specs_of(model_limits, f"{base}:m:{alias}", scope, 0)
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
        The key's limits and the first deployment's quota are two ADMIT calls (their tags may
        live on two cluster nodes) sent in one round trip with the cache `lookup`, if any (its
        reply lands in `lookup.reply`). When that deployment is full the next ones are tried in
        turn; what one call reserved is released when the other refuses.
        """
        policy: Policy | None = ctx.policy
        assert policy is not None
        required = self.specs(policy.key_id, policy.limits, ctx.model, policy.model_limits.get(ctx.model))
        alternatives: list[Route] = []
        free = False
        for route in plan:
            if self.breakers.rejects(route.id):
                continue
            if not route.quota:
                free = True
                break
            alternatives.append(route)
        if not required and not alternatives:
            return None
        admission = Admission(lease_member() if any(s.kind == LEASE for s in required) else "", 0, 0)
        if _counts_usage(required) or any(_counts_usage(r.quota) for r in alternatives):
            admission.tokens, admission.cost = self._estimate(ctx)  # serialises the prompt: only when needed
        calls: list[Call] = []
        if required:
            calls.append(self._call(required, admission, report=True))
        if alternatives:
            calls.append(self._call(alternatives[0].quota, admission))
        decided = len(calls)
        if lookup is not None and lookup.call is not None:
            calls.append(lookup.call)
        ledger = self.ledger
        # The first admission after an outage first writes the budgets' spend this replica owes.
        owed = ledger.take() if ledger else []
        replies = await self._run(ctx, [*owed, *calls])
        for call, reply in zip(owed, replies, strict=False):
            if isinstance(reply, StoreError) and ledger is not None:
                ledger.restore(call[2])  # the store did not take it: owed still
        replies = replies[len(owed) :]
        if lookup is not None and len(replies) > decided and not isinstance(replies[decided], StoreError):
            lookup.reply = replies[decided]  # else the cache tries on its own
        mine = replies[0] if required else None
        theirs = replies[decided - 1] if alternatives else None
        if isinstance(mine, StoreError):
            await self._release(admission, (), None, alternatives, theirs)  # the deployment's node answered
            return self._without_store(ctx, required, admission, mine)
        if isinstance(theirs, StoreError):
            self._log_outage(theirs)
            ctx.without_store += ("limits",)
            if self.outage == "closed":
                await self._release(admission, required, mine, (), None)
                raise _limits_unavailable()
            theirs = None  # its quota unchecked: the deployment is tried as if it had room
        refusal: tuple[Spec, int, bool] | None = None  # the limit, its ms to reset, a deployment's
        if mine is not None:
            admitted, refused, reset_ms, now = (int(x) for x in mine[:4])
            ctx.extra_headers += _headers(required, [int(x) for x in mine[4:]])
            if ledger is not None:
                for index, spec in enumerate(required):
                    if spec.counts == COST:  # what this budget has spent, should the store go away
                        ledger.seen(spec, now, int(mine[4 + 2 * index]))
            if admitted:
                admission.lease = next((s for s in required if s.kind == LEASE), None)
                admission.charges += [
                    (s, now, self._amount(s, admission), None) for s in required if s.kind != LEASE
                ]
            else:
                refusal = (required[refused - 1], reset_ms, False)
        if alternatives:
            full = self._paid(alternatives[0], theirs, admission) if theirs is not None else None
            if refusal is not None:  # the key refused: what the deployment reserved goes back
                await self._release(admission, (), None, alternatives, theirs)
                alone = full is not None and len(alternatives) == 1 and not free  # and that one is full
                if alone and self._longer(full, refusal, admission):
                    refusal = full
            elif full is None:
                admission.prepaid = alternatives[0]
            else:
                try:
                    refusal = await self._fall_back(admission, alternatives, free, full)
                except StoreError:
                    await self._release(admission, required, mine, (), None)
                    raise _limits_unavailable() from None
                if refusal is not None:  # every deployment is full: the key's charges go back
                    await self._release(admission, required, mine, (), None)
        if refusal is not None:
            spec, reset_ms, deployments = refusal
            ctx.refused = "quota" if deployments else spec.label
            raise _refusal(spec, reset_ms, deployments, ctx.model, self._amount(spec, admission))
        return admission

    async def _fall_back(
        self, admission: Admission, alternatives: list[Route], free: bool, full: tuple[Spec, int, bool]
    ) -> tuple[Spec, int, bool] | None:
        """The first deployment is full: charge the next with room (one round trip each), or none
        when a deployment without quota follows them. Else the refusal of the one that frees soonest.
        A store failure is raised under `store.outage.limits: closed`; when open, that deployment is
        tried as if it had room."""
        soonest = full
        for index, route in enumerate(alternatives[1:], 1):
            admission.skipped = tuple(alternatives[:index])
            try:
                over = self._paid(route, await self.store.run(*self._call(route.quota, admission)), admission)
            except StoreError as exc:
                self._log_outage(exc)
                if self.outage == "closed":
                    raise
                return None
            if over is None:
                admission.prepaid = route
                return None
            if self._longer(soonest, over, admission):
                soonest = over
        admission.skipped = tuple(alternatives)
        return None if free else soonest

    async def _run(self, ctx: RequestContext, calls: list[Call]) -> list[Any]:
        """The replies of `calls`, in one round trip; a StoreError in place of each when it failed."""
        trace = ctx.trace
        span = trace.store_call(", ".join(c[0].name for c in calls)) if trace is not None else None
        failed: StoreError | None = None
        try:
            replies = (
                [await self.store.run(*calls[0])] if len(calls) == 1 else await self.store.run_many(calls)
            )
        except StoreError as exc:
            replies, failed = [exc] * len(calls), exc
        if trace is not None:
            trace.end_store(span, failed)
        return replies

    def _call(self, specs: tuple[Spec, ...], admission: Admission, *, report: bool = False) -> Call:
        """ADMIT on `specs`, which share one tag; `report` asks for every limit's state (headers)."""
        args: list[str | int | bytes] = [admission.member if report else "", 1 if report else 0]
        for spec in specs:
            args += spec.args(self._amount(spec, admission))
        return ADMIT, [spec.name for spec in specs], args

    def _paid(self, route: Route, reply: Any, admission: Admission) -> tuple[Spec, int, bool] | None:
        """None when ADMIT charged `route`'s quota (recorded in `admission`), else its refusal."""
        if not int(reply[0]):
            return route.quota[int(reply[1]) - 1], int(reply[2]), True
        now = int(reply[3])
        admission.charges += [(s, now, self._amount(s, admission), route) for s in route.quota]
        return None

    def _longer(self, a: tuple[Spec, int, bool], b: tuple[Spec, int, bool], admission: Admission) -> bool:
        """Whether refusal `a` holds the request back longer than `b` (a retry at its reset passes both)."""
        never_a, never_b = (self._amount(r[0], admission) > r[0].limit for r in (a, b))
        return later(never_a, a[1], never_b, b[1])

    async def _release(
        self,
        admission: Admission,
        required: tuple[Spec, ...],
        mine: Any,
        alternatives: Sequence[Route],
        theirs: Any,
    ) -> None:
        """Undo what the key's call (`mine`) and the first deployment's (`theirs`) reserved, when
        they did: the other side refused, or could not be asked. Meanwhile a request may be refused
        that would have fitted (the conservative side of a race; never an admission too many)."""
        groups: dict[str, list[str | int | bytes]] = {}
        for specs, reply, member in ((required, mine, admission.member), (_quota(alternatives), theirs, "")):
            if not specs or reply is None or isinstance(reply, StoreError) or not int(reply[0]):
                continue
            now = int(reply[3])
            args = groups.setdefault(specs[0].tag, [])
            for spec in specs:
                if spec.kind == LEASE:
                    args += [RELEASE, spec.name, "", member]
                elif amount := self._amount(spec, admission):
                    args += correction(spec, now, -amount)
            admission.charges = [c for c in admission.charges if c[0] not in specs]
        if groups:
            await self._settling.add(groups)

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
        try:
            full = self._paid(route, await self.store.run(*self._call(route.quota, admission)), admission)
        except StoreError as exc:
            self._log_outage(exc)
            return None if self.outage == "open" else _limits_unavailable()
        if full is None:
            return None
        spec, reset_ms, _ = full
        return _refusal(spec, reset_ms, True, ctx.model, self._amount(spec, admission))

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
        groups: dict[str, list[str | int | bytes]] = {}
        if admission.lease is not None:
            groups[admission.lease.tag] = [RELEASE, admission.lease.name, "", admission.member]
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
                    groups.setdefault(spec.tag, []).extend(correction(spec, now, actual - amount))
        if admission.local:
            self._local.release(admission.member)
        elif groups:  # nothing to correct and no lease: no round trip
            await self._settling.add(groups)

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


def _quota(routes: Sequence[Route]) -> tuple[Spec, ...]:
    return routes[0].quota if routes else ()


def _limits_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "Deployment quotas cannot be checked right now (store unreachable); try again shortly.",
        code="limits_unavailable",
    )


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
