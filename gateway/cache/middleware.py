"""Exact-match response cache, shared by every replica through the store, with request coalescing.

Key: SHA-256 of the canonical request (operation, every field but `user`, `stream`
and `stream_options`, keys sorted) and its scope: the caller's key, or `shared` with `cache.shared`.
Cacheable: `temperature` 0, or `cache.mode: always`, or the client's
`x-gateway-cache: on`; `x-gateway-cache: refresh` (or `Cache-Control: no-cache`)
skips the lookup and refills, `off` (or `no-store`) neither reads nor writes.
Only a complete 200 answer is stored, as it was produced; one entry serves both
modes: a stored stream replays as the same SSE bytes to a streaming request and
assembled into one JSON answer to a non-streaming one, a stored JSON answer as
is or cut into SSE (replay.py; converted at replay, not at fill), each only where it
answers exactly as the upstream would (usage event included: `replay.fit`). Every
answer says `x-cache: hit|miss|bypass`: `hit` when no upstream call was made for
it (a stored entry, or another request's flight it followed).

Identical cacheable requests in flight together share one upstream call
(coalesce.py, `cache.coalesce`): one leads, the others follow its answer as it
is produced; streams without `include_usage` fly apart from the rest (`ResponseCache.lock`).
A refresh neither follows nor leads.

Purge without scanning: entry keys carry generation numbers (all, per key, per
model) held in `gw:{cache}:gen` and copied locally, kept exact by pub/sub; a purge
bumps one and the entries it covers become unreachable until their TTL ends.

Keys. An entry's key has its digest as hash tag, and so do its lock and its flights' logs: each
script call (CLAIM, RENEW, RELEASE) touches one Redis Cluster slot, and entries spread over all slots.
No script reads the generations: they are in the entry key's text, computed here.
    gw:{cache}:gen                                  hash: generation per purge scope (one slot, read
                                                    at start and when it changes, never per request)
    gw:{cache}:events                               pub/sub channel: a generation changed
    gw:cache:{<sha256>}:<all>.<key>.<model>:<scope> an entry: msgpack [content type, body], TTL `ttl_s`
    <entry key>:lock[:nousage]                      the flight's leader token, PX `coalesce_lease_s`
    gw:cache:{<sha256>}:flight:<token>              stream: the flight's log (coalesce.py), TTL
                                                    `coalesce_wait_s + coalesce_lease_s` after a write
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time

import msgspec
import orjson

from gateway.cache.coalesce import CHUNK, CLAIM, HEAD, RELEASE, Flight, FlightLost, Follow, Tail, new_token
from gateway.cache.replay import fit, is_sse, wants_usage
from gateway.context import Lookup, RequestContext
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, UpstreamError
from gateway.routing.heartbeat import KEEP_ALIVE
from gateway.store import Store, StoreError, Subscription
from gateway.tasks import Background, Disconnect
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.cache")

GENERATIONS = "gw:{cache}:gen"
EVENTS = "gw:{cache}:events"
_LOG_EVERY_S = 10.0
_UNKEYED = frozenset({"user", "stream", "stream_options"})


class Entry(msgspec.Struct, array_like=True):
    content_type: bytes
    body: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


class ResponseCache:
    """The store side: generations, lookup, fill, purge."""

    def __init__(
        self,
        store: Store,
        *,
        ttl_s: float,
        max_entry_bytes: int,
        max_ttl_s: float = 86400,
        shared: bool,
        always: bool = False,
        coalesce: bool = True,
        wait_s: float = 30,
        lease_s: float = 5,
        outage: str = "open",
    ) -> None:
        self.store = store
        self.always = always  # cache.mode: always (else temperature 0 only)
        self.outage = outage  # store down: "open" serves uncached, "closed" answers 503
        self.without_store = 0  # lookups that failed for want of the store (GET /health/store)
        self._logged = -_LOG_EVERY_S
        self.ttl_s = ttl_s
        self.max_ttl_s = max(max_ttl_s, ttl_s)
        self.max_entry_bytes = max_entry_bytes
        self.shared = shared
        self.coalesce = coalesce
        self.wait_s = wait_s
        self.lease_s = lease_s
        self._gens: dict[str, int] = {}
        self._tails: dict[str, Tail] = {}  # flight token -> this process's reader of its log
        self._subscription: Subscription | None = None
        self._background = Background()

    async def start(self) -> None:
        try:
            self._subscription = await self.store.subscribe(EVENTS, self._on_event)
            await self._reload()
        except StoreError as exc:
            log.error("cache: store unreachable at start (generations unknown until it is): %s", exc)

    async def aclose(self) -> None:
        if self._subscription is not None:
            await self._subscription.aclose()
        await self.flush()

    async def flush(self) -> None:
        """Wait for the fills under way (shutdown, tests)."""
        await self._background.wait()

    async def _reload(self) -> None:
        self._gens = {field: int(value) for field, value in (await self.store.hgetall(GENERATIONS)).items()}

    def _on_event(self, message: bytes) -> None:
        self._background.spawn(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        try:
            await self._reload()
        except StoreError as exc:
            log.warning("cache: generations not refreshed: %s", exc)

    def key(self, ctx: RequestContext) -> str:
        op = ctx.operation
        assert op is not None and ctx.policy is not None
        canonical = {k: v for k, v in ctx.body.items() if k not in _UNKEYED}
        scope = "shared" if self.shared else ctx.policy.key_id
        # The scope is hashed too, so one prompt asked under many keys spreads over slots as well.
        identity = orjson.dumps([op.value, scope, canonical], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(identity).hexdigest()
        g = self._gens
        gens = f"{g.get('all', 0)}.{g.get('key:' + scope, 0)}.{g.get('model:' + ctx.model, 0)}"
        return f"gw:cache:{{{digest}}}:{gens}:{scope}"

    async def get(self, key: str) -> Entry | None:
        try:
            raw = await self.store.get(key)
        except StoreError as exc:
            log.warning("cache: lookup failed, serving uncached: %s", exc)  # fail open
            return None
        return None if raw is None else _decode(raw)

    def plan(self, scope: Scope, ctx: RequestContext) -> Lookup | None:
        """None when the request bypasses the cache (and says so in ctx), else its lookup to run."""
        wish = _directive(scope)
        if wish == b"off" or not (wish == b"on" or self.always or ctx.body.get("temperature") == 0):
            ctx.cache = b"bypass"
            return None
        key = self.key(ctx)
        lock = self.lock(key, ctx)
        ttl_s = self._ttl(scope)
        if wish == b"refresh":
            return Lookup(key, lock, "", None, ttl_s)
        token = new_token()
        lease_ms = math.ceil(self.lease_s * 1000) if self.coalesce else 0
        return Lookup(key, lock, token, (CLAIM, [key, lock], [token, lease_ms]), ttl_s)

    @staticmethod
    def lock(key: str, ctx: RequestContext) -> str:
        """The lock of `key`'s flight for this request: a stream without `include_usage` has its own.

        Its leader's client gets no usage event, so its stream could not give one to a follower that
        wants it (a non-streaming request, or a stream with `include_usage`); the two kinds of request
        share entries, not flights.
        """
        return key + ":lock" if wants_usage(ctx.body) else key + ":lock:nousage"

    def _ttl(self, scope: Scope) -> float:
        """`x-gateway-cache-ttl` (seconds, up to `cache.max_ttl_s`), else `cache.ttl_s`."""
        raw = next((v for k, v in scope["headers"] if k == b"x-gateway-cache-ttl"), None)
        if raw is None:
            return self.ttl_s
        try:
            ttl_s = float(raw)
        except ValueError:
            ttl_s = math.nan
        if not 0 < ttl_s <= self.max_ttl_s:  # also refuses nan and inf
            raise InvalidRequest(
                f"x-gateway-cache-ttl must be a number of seconds above 0 and at most {self.max_ttl_s:g}.",
                param="x-gateway-cache-ttl",
            )
        return ttl_s

    async def claim(self, key: str, lock: str) -> tuple[bytes, Entry | None, str]:
        """Claim `key` again (its flight failed): see `outcome`."""
        token = new_token()
        reply = await self.store.run(CLAIM, [key, lock], [token, math.ceil(self.lease_s * 1000)])
        return self.outcome(reply, token)

    def outcome(self, reply: list[bytes], token: str) -> tuple[bytes, Entry | None, str]:
        """CLAIM's reply as (b"hit", entry, ""), (b"miss", None, ""), (b"lead", None, our token) or
        (b"follow", None, the leader's token)."""
        if reply[0] == b"hit":
            return b"hit", _decode(reply[1]), ""
        if reply[0] == b"miss":
            return b"miss", None, ""
        return reply[0], None, token if reply[0] == b"lead" else reply[1].decode()

    def outage_seen(self, exc: StoreError) -> None:
        """Count a lookup the store failed; log it once per interval, not once per request."""
        self.without_store += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            policy = "serving uncached" if self.outage == "open" else "refusing with 503"
            log.error("cache: store unreachable, %s (%d so far): %s", policy, self.without_store, exc)

    def abandon(self, lookup: Lookup) -> None:
        """Give back a lock the lookup took for a request that will not go upstream after all."""
        if lookup.reply is not None and lookup.reply[0] == b"lead":
            self._background.spawn(self._release(lookup.lock, lookup.token))

    async def _release(self, lock: str, token: str) -> None:
        try:
            await self.store.run(RELEASE, [lock], [token])
        except StoreError as exc:
            log.warning("cache: lock not released (its lease ends it): %s", exc)

    def lead(self, lock: str, token: str) -> Flight:
        # The log outlives the longest follow, so a late follower still reads it from the start.
        flight = Flight(self.store, lock, token, lease_s=self.lease_s, log_ttl_s=self.wait_s + self.lease_s)
        self._background.spawn(flight.run())
        return flight

    def follow(self, lock: str, token: str, deadline: float) -> Follow:
        tail = self._tails.get(token)
        if tail is None or tail.failure is not None:
            tail = self._tails[token] = Tail(self.store, lock, token, poll_s=self.lease_s / 2)
        return Follow(tail, self._tails, deadline=deadline)

    def fill(self, key: str, entry: Entry, ttl_s: float) -> None:
        self._background.spawn(self.put(key, entry, ttl_s))

    async def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        if len(entry.body) > self.max_entry_bytes:
            return
        try:
            await self.store.set(key, _encode(entry), ttl_s=ttl_s)
        except StoreError as exc:
            log.warning("cache: fill failed: %s", exc)

    async def purge(self, *, key_id: str | None = None, model: str | None = None) -> None:
        """Make every entry of `key_id` (or `model`, or all when neither) unreachable, on every replica."""
        field = f"key:{key_id}" if key_id else f"model:{model}" if model else "all"
        await self.store.hincrby(GENERATIONS, {field: 1}, ttl_s=10 * 365 * 86400)
        await self._reload()
        await self.store.publish(EVENTS, field.encode())


def _directive(scope: Scope) -> bytes:
    """The client's cache wish: b"on", b"off", b"refresh" or b""."""
    for name, value in scope["headers"]:
        if name == b"x-gateway-cache":
            return value.strip().lower()
        if name == b"cache-control":
            if b"no-store" in value:
                return b"off"
            if b"no-cache" in value:
                return b"refresh"
    return b""


class CacheMiddleware:
    def __init__(self, app: ASGIApp, *, cache: ResponseCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext | None = scope.get("gateway")
        if scope["type"] != "http" or ctx is None or ctx.operation is None:
            await self.app(scope, receive, send)
            return
        # Planned (and often already run) by the rate limiter, which shares its round trip.
        lookup = ctx.lookup
        if lookup is None and ctx.cache != b"bypass":
            try:
                lookup = ctx.lookup = self.cache.plan(scope, ctx)
            except GatewayError as exc:
                await ctx.send_error(send, exc)
                return
        if lookup is None:
            await self.app(scope, receive, send)
            return
        if lookup.call is None:  # a refresh
            await self.produce(scope, receive, send, ctx, lookup.key, None)
            return
        reply = lookup.reply
        if reply is None:
            trace = ctx.trace
            span = trace.store_call(lookup.call[0].name) if trace is not None else None
            try:
                reply = await self.cache.store.run(*lookup.call)
                if trace is not None:
                    trace.end_store(span, None)
            except StoreError as exc:
                if trace is not None:
                    trace.end_store(span, exc)
                self.cache.outage_seen(exc)
                ctx.without_store += ("cache",)
                if self.cache.outage == "closed":
                    unavailable = ServiceUnavailable(
                        "The response cache is unavailable; try again shortly.", code="cache_unavailable"
                    )
                    await ctx.send_error(send, unavailable)
                    return
                await self.produce(scope, receive, send, ctx, lookup.key, None)
                return
        await self.coalesce(scope, receive, send, ctx, lookup, self.cache.outcome(reply, lookup.token))

    async def coalesce(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext,
        lookup: Lookup,
        claimed: tuple[bytes, Entry | None, str],
    ) -> None:
        """Replay a hit, or lead the flight for the lookup's key, or follow it, claiming again when its
        leader fails."""
        key, lock = lookup.key, lookup.lock
        deadline = time.monotonic() + self.cache.wait_s
        while True:
            outcome, entry, token = claimed
            if outcome == b"miss":
                break
            if outcome == b"hit":
                if entry is not None and await self.replay(ctx, entry, send):
                    return
                break
            if outcome == b"lead":
                await self.produce(scope, receive, send, ctx, key, self.cache.lead(lock, token))
                return
            try:
                if await self.follow(ctx, receive, send, self.cache.follow(lock, token, deadline)):
                    ctx.coalesced = True
                    return
                break  # the flight's answer does not convert to this request's mode
            except FlightLost:
                pass
            except (TimeoutError, StoreError) as exc:
                log.warning("cache: gave up following flight %s, calling upstream alone: %r", token, exc)
                break
            if time.monotonic() >= deadline:
                break
            try:
                claimed = await self.cache.claim(key, lock)
            except StoreError as exc:
                log.warning("cache: claim failed, calling upstream alone: %s", exc)
                break
        await self.produce(scope, receive, send, ctx, key, None)

    async def produce(
        self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext, key: str, flight: Flight | None
    ) -> None:
        """Call upstream through the app; store a complete answer, and copy it to `flight`'s followers."""
        ctx.cache = b"miss"
        captured: list[bytes] = []
        content_type = b""
        shared = False

        async def capture(message: Message) -> None:
            nonlocal content_type, shared
            if message["type"] == "http.response.start":
                content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
                shared = message["status"] == 200  # an error answer is never passed on
                if flight is not None and shared:
                    flight.put(HEAD, content_type)
            elif (body := message.get("body", b"")) != KEEP_ALIVE:  # a heartbeat is no part of the answer
                captured.append(body)
                # ctx.status: a failure after heartbeats (head 200 already out) ends the flight unshared.
                if flight is not None and shared and body and ctx.status == 200:
                    flight.put(CHUNK, body)
            await send(message)

        entry = None
        ttl_s = ctx.lookup.ttl_s if ctx.lookup is not None else self.cache.ttl_s
        try:
            await self.app(scope, receive, capture)
            if ctx.status == 200 and ctx.complete:
                entry = Entry(content_type, b"".join(captured))
        finally:
            if flight is not None:
                flight.finish(None if entry is None else functools.partial(self.cache.put, key, entry, ttl_s))
            elif entry is not None:
                self.cache.fill(key, entry, ttl_s)

    async def follow(self, ctx: RequestContext, receive: Receive, send: Send, follow: Follow) -> bool:
        """`relay`, ended when the client goes away: it would otherwise wait on the flight for nobody."""
        try:
            with Disconnect(receive):
                return await self.relay(ctx, follow, send)
            ctx.complete = False  # reached only when the client left mid-relay
            return True
        finally:
            follow.close()

    async def relay(self, ctx: RequestContext, follow: Follow, send: Send) -> bool:
        """Answer from another request's flight; False when its answer does not convert to this mode.

        A streaming request relays a streamed flight chunk by chunk as the leader sends it; any
        other waits for the end. Raises what `Follow` raises when nothing has been sent yet.
        """
        streaming = ctx.body.get("stream") is True
        content_type = b""
        parts: list[bytes] = []
        started = False
        try:
            async for tag, data in follow.entries():
                if tag == HEAD:
                    content_type = data
                elif streaming and is_sse(content_type):
                    if not started:
                        started = True
                        follow.deadline = math.inf  # a live stream is never cut: the leader's lease decides
                        await self.start(
                            ctx, send, [(b"content-type", content_type), (b"cache-control", b"no-cache")]
                        )
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                else:
                    parts.append(data)
        except (FlightLost, TimeoutError, StoreError) as exc:
            if not started:
                raise
            # Too late for a status or a retry: end the stream as a broken upstream stream ends.
            log.warning("cache: flight %s broke off mid-stream: %r", follow.token, exc)
            error = UpstreamError(
                "The upstream stream this answer shared with an identical request broke off."
            )
            await send(
                {"type": "http.response.body", "body": b"event: error\ndata: " + error.body() + b"\n\n"}
            )
            ctx.complete = False
            return True
        if started:
            await send({"type": "http.response.body", "body": b""})
            ctx.complete = True
            return True
        return await self.replay(ctx, Entry(content_type, b"".join(parts)), send)

    async def replay(self, ctx: RequestContext, entry: Entry, send: Send) -> bool:
        """Answer with `entry` in this request's mode; False (nothing sent) when it does not convert."""
        fitted = fit(entry.content_type, entry.body, ctx.body)
        if fitted is None:
            return False
        content_type, body = fitted
        await self.start(ctx, send, [(b"content-type", content_type), (b"content-length", b"%d" % len(body))])
        await send({"type": "http.response.body", "body": body})
        ctx.complete = True
        return True

    async def start(self, ctx: RequestContext, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        """The head of an answer no upstream call was made for."""
        ctx.cache = b"hit"
        ctx.status = 200
        ctx.responded = True
        await send({"type": "http.response.start", "status": 200, "headers": [*headers, *ctx.headers()]})
