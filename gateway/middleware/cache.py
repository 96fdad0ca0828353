"""Exact-match response cache, shared by every replica through the store.

Key: SHA-256 of the canonical request (operation, every field but `user`, `stream`
and `stream_options`, keys sorted), scoped to the caller's key unless `cache.shared`.
Cacheable: `temperature` 0, or `cache.mode: always`, or the client's
`x-gateway-cache: on`; `x-gateway-cache: refresh` (or `Cache-Control: no-cache`)
skips the lookup and refills, `off` (or `no-store`) neither reads nor writes.
Only a complete 200 answer is stored, in the mode it was produced in: a stream
is replayed as the same SSE bytes to a streaming request, and a JSON answer to a
non-streaming one. Every answer says `x-cache: hit|miss|bypass`.

Purge without scanning: entry keys carry generation numbers (all, per key, per
model) held in `gw:{cache}:gen` and copied locally, kept exact by pub/sub; a purge
bumps one and the entries it covers become unreachable until their TTL ends.
Entries: `gw:{cache}:<all>.<key>.<model>:<sha256>`.
"""

from __future__ import annotations

import hashlib
import logging

import msgspec
import orjson

from gateway.context import RequestContext
from gateway.store import Store, StoreError, Subscription
from gateway.tasks import Background
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.cache")

GENERATIONS = "gw:{cache}:gen"
EVENTS = "gw:{cache}:events"
_UNKEYED = frozenset({"user", "stream", "stream_options"})


class Entry(msgspec.Struct, array_like=True):
    content_type: bytes
    body: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


class ResponseCache:
    """The store side: generations, lookup, fill, purge."""

    def __init__(self, store: Store, *, ttl_s: float, max_entry_bytes: int, shared: bool) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.shared = shared
        self._gens: dict[str, int] = {}
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
        digest = hashlib.sha256(orjson.dumps([op.value, canonical], option=orjson.OPT_SORT_KEYS)).hexdigest()
        scope = "shared" if self.shared else ctx.policy.key_id
        streamed = "s" if ctx.body.get("stream") is True else "j"
        g = self._gens
        gens = f"{g.get('all', 0)}.{g.get('key:' + scope, 0)}.{g.get('model:' + ctx.model, 0)}"
        return f"gw:{{cache}}:{gens}:{scope}:{streamed}:{digest}"

    async def get(self, key: str) -> Entry | None:
        try:
            raw = await self.store.get(key)
        except StoreError as exc:
            log.warning("cache: lookup failed, serving uncached: %s", exc)  # fail open
            return None
        return None if raw is None else _decode(raw)

    def fill(self, key: str, entry: Entry) -> None:
        if len(entry.body) <= self.max_entry_bytes:
            self._background.spawn(self._set(key, entry))

    async def _set(self, key: str, entry: Entry) -> None:
        try:
            await self.store.set(key, _encode(entry), ttl_s=self.ttl_s)
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
    def __init__(self, app: ASGIApp, *, cache: ResponseCache, always: bool) -> None:
        self.app = app
        self.cache = cache
        self.always = always

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext | None = scope.get("gateway")
        if scope["type"] != "http" or ctx is None or ctx.operation is None:
            await self.app(scope, receive, send)
            return
        wish = _directive(scope)
        cacheable = wish == b"on" or (wish != b"off" and (self.always or ctx.body.get("temperature") == 0))
        if not cacheable or wish == b"off":
            ctx.cache = b"bypass"
            await self.app(scope, receive, send)
            return
        key = self.cache.key(ctx)
        if wish != b"refresh":
            entry = await self.cache.get(key)
            if entry is not None:
                await self.replay(ctx, entry, send)
                return
        ctx.cache = b"miss"
        captured: list[bytes] = []
        content_type = b""

        async def capture(message: Message) -> None:
            nonlocal content_type
            if message["type"] == "http.response.start":
                content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
            else:
                captured.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        if ctx.status == 200 and ctx.complete:
            self.cache.fill(key, Entry(content_type, b"".join(captured)))

    async def replay(self, ctx: RequestContext, entry: Entry, send: Send) -> None:
        ctx.cache = b"hit"
        ctx.status = 200
        ctx.responded = True
        ctx.complete = True
        headers = [
            (b"content-type", entry.content_type),
            (b"content-length", b"%d" % len(entry.body)),
            *ctx.headers(),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body})
