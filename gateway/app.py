"""build_app(config): the middleware stack folded around the forwarding app.

    AccessLog -> RequestId -> HeadLimit -> [CORS] -> Auth -> Body -> HotRoutes
        HotRoutes -> Forward     (POST /v1/<operation>)
                  -> Starlette   (/v1/models, /admin, health)

AccessLog also records each request's metrics; GET /metrics is a Starlette route (or on its own port).

The few hot routes are dispatched by one dict lookup before any general
router; Starlette serves the rest and runs the lifespan (pools, store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.routing import Route as StarletteRoute

from gateway import config as config_module
from gateway.admin.api import AdminAPI
from gateway.auth.jwt import JWTVerifier, KeyLoadError
from gateway.auth.keys import KeyStore
from gateway.auth.middleware import AuthMiddleware
from gateway.cache.middleware import CacheMiddleware, ResponseCache
from gateway.config import Config
from gateway.errors import MethodNotAllowed, NotFound, ServerError, ServiceUnavailable, error_response
from gateway.limits.limiter import Limiter
from gateway.limits.middleware import RateLimitMiddleware
from gateway.limits.usage import UsageRecorder
from gateway.providers import Operation, Target, build_adapter
from gateway.routing.breaker import Breakers
from gateway.routing.forward import Forward
from gateway.routing.probes import Prober
from gateway.routing.router import Alias, Route, Router
from gateway.store import Store, StoreError, Subscription, store_from_url
from gateway.tasks import Background
from gateway.telemetry import logs, tracing
from gateway.telemetry.access_log import AccessLogMiddleware
from gateway.telemetry.exposition import MetricsEndpoint
from gateway.telemetry.metrics import OPERATIONS, Metrics
from gateway.telemetry.request_id import RequestIdMiddleware
from gateway.telemetry.scrape import MetricsService
from gateway.telemetry.workers import ENV as METRICS_DIR
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream import Timeouts, UpstreamPool
from gateway.validation.head import HeadLimitMiddleware
from gateway.validation.middleware import BodyMiddleware

log = logging.getLogger("gateway")

RELOADS = "gw:{admin}:reload"  # channel: a process reloaded its config; the others should too
HOT_ROUTES: dict[str, Operation] = {f"/v1/{op.value}": op for op in Operation}


class HotRoutes:
    def __init__(self, hot: Mapping[str, ASGIApp], fallback: ASGIApp) -> None:
        self.hot = hot
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.hot.get(scope["path"], self.fallback) if scope["type"] == "http" else self.fallback
        await app(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(
            MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        )
    return error_response(NotFound(f"Unknown request URL: {request.method} {request.url.path}."))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(ServerError("The server had an error processing your request."))


class Snapshot:
    """Everything built from one config: the store, pools, routes, auth and the middleware stack.

    A reload builds a new one, reusing the store and the pools whose config did not change.
    """

    def __init__(self, config: Config, metrics: MetricsService, previous: Snapshot | None = None) -> None:
        self.config = config
        self.created = int(time.time())
        self.inflight = 0  # requests being served by this snapshot
        same_store = previous is not None and previous.config.store == config.store
        self.store: Store = (
            previous.store
            if same_store and previous is not None
            else store_from_url(
                config.store.url,
                timeout_s=config.store.timeout_s,
                max_connections=config.store.max_connections,
            )
        )
        same_tracing = previous is not None and previous.config.telemetry == config.telemetry
        self.tracing = (
            previous.tracing
            if same_tracing and previous is not None
            else tracing.build(config.telemetry.tracing)
        )
        t = config.router.timeouts
        timeouts = Timeouts(
            connect_s=t.connect_s, first_byte_s=t.first_byte_s, idle_s=t.idle_s, total_s=t.total_s
        )
        secret = config.auth.hash_secret.encode() or os.urandom(32)
        self.pools: dict[str, UpstreamPool] = {}
        adapters = {}
        for name, provider in config.enabled_providers().items():
            old = previous.pools.get(name) if previous is not None else None
            if old is not None and previous.config.providers[name] == provider and old.timeouts == timeouts:
                pool = old
            else:
                pool = UpstreamPool(
                    provider.url,
                    max_connections=provider.max_connections,
                    timeouts=timeouts,
                    keepalive_expiry_s=provider.keepalive_s,
                )
            self.pools[name] = pool
            adapters[name] = build_adapter(name, provider, pool.base_path)
        aliases: dict[str, Alias] = {}
        for model in config.models:
            routes = [
                Route(
                    adapters[d.provider],
                    self.pools[d.provider],
                    Target(d.model, d.params),
                    d.weight,
                    d.limits,
                )
                for d in model.deployments
                if d.provider in adapters
            ]
            if routes:
                aliases[model.name] = Alias(
                    model.name,
                    routes,
                    model.strategy,
                    model.fallbacks,
                    retries=config.router.retries if model.retries is None else model.retries,
                    failover=config.router.failover if model.failover is None else model.failover,
                )
            else:
                log.warning("model %s has no deployment on an enabled provider: not served", model.name)
        self.routes = aliases
        self.router = Router(aliases, self.store)
        self.breakers = Breakers(self.store, config.breaker)
        prices = {m.name: (m.price.input_per_mtok, m.price.output_per_mtok) for m in config.models}
        self.usage = UsageRecorder(self.store, prices)
        c = config.cache
        self.cache = (
            ResponseCache(
                self.store,
                ttl_s=c.ttl_s,
                max_ttl_s=c.max_ttl_s,
                max_entry_bytes=c.max_entry_bytes,
                shared=c.shared,
                always=c.mode == "always",
                outage=config.store.outage.cache,
                coalesce=c.coalesce,
                wait_s=c.coalesce_wait_s,
                lease_s=c.coalesce_lease_s,
            )
            if c.enabled
            else None
        )

        self.keys = KeyStore(self.store, secret, config.auth.keys, self.routes, config.store.admin_writes)
        self.admin = AdminAPI(config.auth.admin_key, self.keys, self.breakers, self.usage, self.cache)
        interval = config.router.probe_interval_s
        every_route = [route for alias in aliases.values() for route in alias.routes]
        self.prober = (
            Prober(every_route, self.breakers, interval, config.router.timeouts.connect_s)
            if interval
            else None
        )
        web_routes: list[BaseRoute] = [
            *self.admin.routes(),
            StarletteRoute("/healthz", self.healthz),
            StarletteRoute("/health/providers", self.health_providers),
            StarletteRoute("/health/store", self.health_store),
            StarletteRoute("/readyz", self.readyz),
            StarletteRoute("/v1/models", self.list_models),
            StarletteRoute("/v1/models/{model:path}", self.get_model),
        ]
        recorder = metrics.attach(config.telemetry.metrics, self.store, self.breakers, aliases, prices)
        if recorder is not None and config.telemetry.metrics.port is None:
            web_routes.append(StarletteRoute("/metrics", MetricsEndpoint(metrics.collect, self.metrics_key)))
        starlette = Starlette(
            routes=web_routes, exception_handlers={HTTPException: _http_exception, Exception: _server_error}
        )
        r = config.router
        # A request lives at most total_s: a lease outliving it by a minute is one a dead replica left.
        limiter = Limiter(
            self.store,
            self.breakers,
            prices,
            {m.name: m.completion_estimate for m in config.models},
            lease_s=r.timeouts.total_s + 60,
            outage=config.store.outage.limits,
            budget_outage=config.store.outage.budgets,
        )
        self.limiter = limiter
        forward = Forward(
            self.router,
            self.breakers,
            self.usage,
            limiter,
            total_s=r.timeouts.total_s,
            backoff_s=r.backoff_s,
            backoff_max_s=r.backoff_max_s,
            route_headers=r.headers,
            heartbeat_s=r.heartbeat_s,
        )
        app: ASGIApp = HotRoutes({path: forward for path in HOT_ROUTES}, starlette)
        if self.cache is not None:
            app = CacheMiddleware(app, cache=self.cache)
        app = RateLimitMiddleware(app, limiter=limiter, forward=forward, cache=self.cache)
        app = BodyMiddleware(app, routes=HOT_ROUTES, max_bytes=config.server.max_body_bytes)
        self.jwt = JWTVerifier(config.auth.jwt) if config.auth.jwt else None
        app = AuthMiddleware(app, keys=self.keys, jwt=self.jwt)
        cors = config.cors
        if cors.allow_origins:
            # Outside auth: a preflight carries no credential and must not need one.
            app = CORSMiddleware(
                app,
                allow_origins=cors.allow_origins,
                allow_methods=cors.allow_methods,
                allow_headers=cors.allow_headers,
                expose_headers=cors.expose_headers,
                allow_credentials=cors.allow_credentials,
                max_age=cors.max_age_s,
            )
        if self.tracing is not None:
            app = tracing.TracingMiddleware(app, tracing=self.tracing)
        # Before auth and CORS: an oversized head is refused before anything reads it.
        server = config.server
        app = HeadLimitMiddleware(
            app, max_line_bytes=server.max_header_line_bytes, max_head_bytes=server.max_head_bytes
        )
        app = RequestIdMiddleware(app, hot_paths=HOT_ROUTES)
        if config.server.access_log or recorder is not None:
            app = AccessLogMiddleware(
                app, access_log=config.server.access_log, metrics=recorder, operations=OPERATIONS
            )
        self.app = app

    def metrics_key(self) -> str | None:
        """The key GET /metrics needs, None when it is open (an empty admin key refuses everyone)."""
        return self.config.auth.admin_key if self.config.telemetry.metrics.auth == "admin" else None

    async def start(self) -> None:
        try:
            await self.store.ping()
        except StoreError as exc:
            log.warning("store is not reachable: %s", exc)
        await self.keys.start()
        await self.breakers.start(r.id for a in self.routes.values() for r in a.routes)
        if self.prober is not None:
            self.prober.start()
        self.usage.start()
        if self.cache is not None:
            await self.cache.start()
        if self.jwt is not None:
            try:
                await self.jwt.load()
            except KeyLoadError as exc:
                log.error("jwt: %s; tokens of that issuer are refused until its keys load", exc)
        log.info("gateway ready: %d models, %d providers", len(self.routes), len(self.pools))

    async def aclose(self, successor: Snapshot | None = None) -> None:
        """Release what `successor` does not reuse, once this snapshot's requests have finished."""
        deadline = time.monotonic() + self.config.router.timeouts.total_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.prober is not None:
            await self.prober.aclose()
        await self.usage.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        await self.keys.aclose()
        await self.breakers.aclose()
        if self.jwt is not None:
            await self.jwt.wait_refreshes()
        kept = set(map(id, successor.pools.values())) if successor is not None else set()
        for pool in self.pools.values():
            if id(pool) not in kept:
                await pool.aclose()
        if successor is None or successor.store is not self.store:
            await self.store.aclose()
        if self.tracing is not None and (successor is None or successor.tracing is not self.tracing):
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the last spans: blocking I/O

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except StoreError as exc:
            return error_response(ServiceUnavailable(f"store unreachable: {exc}"))
        return JSONResponse({"status": "ready", "models": len(self.routes)})

    async def health_store(self, request: Request) -> Response:
        """Whether the store answers, the outage policy, and how many requests were decided without it."""
        try:
            await self.store.ping()
            error = None
        except StoreError as exc:
            error = str(exc)
        outage = self.config.store.outage
        return JSONResponse(
            {
                "reachable": error is None,
                "error": error,
                "outage_policy": {"limits": outage.limits, "cache": outage.cache, "budgets": outage.budgets},
                "decided_without_store": {
                    "limits": self.limiter.without_store,
                    "cache": self.cache.without_store if self.cache is not None else 0,
                },
                # Budget spend admitted here while the store was down, not yet written to it.
                "budget_usd_to_reconcile": self.limiter.ledger.owed_usd if self.limiter.ledger else 0.0,
            }
        )

    async def health_providers(self, request: Request) -> Response:
        """Per deployment: breaker state and window, last error (no secrets), latency EWMA."""
        breakers = self.breakers.snapshot()
        deployments = {}
        for alias in self.routes.values():
            for route in alias.routes:
                info = {**breakers.get(route.id, {"state": self.breakers.state(route.id)})}
                info["latency_ewma_ms"] = None if route.ewma_s is None else round(route.ewma_s * 1000, 3)
                info["in_use"], info["idle"] = route.pool.in_use, route.pool.idle
                deployments[route.id] = info
        return JSONResponse({"deployments": deployments})

    def _model(self, alias: str) -> dict[str, object]:
        return {"id": alias, "object": "model", "created": self.created, "owned_by": "gateway"}

    async def list_models(self, request: Request) -> Response:
        allowed = request.scope["gateway"].policy.models
        data = [self._model(alias) for alias in self.routes if alias in allowed]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        alias = request.path_params["model"]
        if alias not in self.routes or alias not in request.scope["gateway"].policy.models:
            return error_response(
                NotFound(
                    f"The model `{alias}` does not exist or you do not have access to it.",
                    code="model_not_found",
                )
            )
        return JSONResponse(self._model(alias))


class Gateway:
    """The ASGI application: serves the current Snapshot and swaps it on reload.

    Requests in flight finish on the snapshot they started with; its unshared
    parts are closed after they end. Reload: SIGHUP, or POST /admin/reload.
    """

    def __init__(self, config: Config, path: str | None = None) -> None:
        self.path = path
        self.metrics = MetricsService(Metrics(), lambda: self.snapshot, os.environ.get(METRICS_DIR))
        self.snapshot = Snapshot(config, self.metrics)
        self.snapshot.admin.reloader = self.reload_everywhere
        self._background = Background()
        self._id = os.urandom(8).hex().encode()  # tells this process's own reload broadcasts apart
        self._reloads: Subscription | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        snapshot = self.snapshot
        snapshot.inflight += 1
        try:
            await snapshot.app(scope, receive, send)
        finally:
            snapshot.inflight -= 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol, served here rather than by a snapshot: it outlives reloads."""
        await receive()  # lifespan.startup
        phase = "startup"
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                phase = "shutdown"
                await receive()  # lifespan.shutdown
        except Exception as exc:
            log.exception("gateway %s failed", phase)
            await send({"type": f"lifespan.{phase}.failed", "message": exc.__class__.__name__})
            return
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def lifespan(self, _: object = None) -> AsyncIterator[None]:
        await self.snapshot.start()
        config = self.snapshot.config
        if config.telemetry.metrics.enabled:
            # The port and the sharing are the start's: a reload changes neither.
            settings = config.telemetry.metrics
            await self.metrics.start(settings, config.server.host, lambda: self.snapshot.metrics_key())
        await self._listen_for_reloads()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # no signal handlers off the main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: self._background.spawn(self._reload_quietly()))
        try:
            yield
        finally:
            with contextlib.suppress(RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            if self._reloads is not None:
                await self._reloads.aclose()
            await self._background.wait()
            await self.metrics.aclose()
            await self.snapshot.aclose()

    async def reload(self) -> list[str]:
        """Load the config file again: the problems it has (nothing changed), or [] once swapped."""
        if self.path is None:
            return ["the gateway was not started from a config file"]
        try:
            config = config_module.load(self.path)
        except config_module.ConfigError as exc:
            return exc.problems
        old = self.snapshot
        new = Snapshot(config, self.metrics, previous=old)
        new.admin.reloader = self.reload_everywhere
        await new.start()
        self.snapshot = new  # one assignment: every later request sees the new config
        self._background.spawn(old.aclose(successor=new))
        if new.store is not old.store:
            await self._listen_for_reloads()
        log.info("config reloaded from %s", self.path)
        return []

    async def reload_everywhere(self) -> list[str]:
        """The admin call: reload here, then tell every other process on the store (workers, replicas)."""
        problems = await self.reload()
        if not problems:
            try:
                await self.snapshot.store.publish(RELOADS, self._id)
            except StoreError as exc:
                log.error("reload not announced to other processes: %s", exc)
        return problems

    async def _listen_for_reloads(self) -> None:
        if self._reloads is not None:
            await self._reloads.aclose()
        try:
            self._reloads = await self.snapshot.store.subscribe(RELOADS, self._on_reload)
        except StoreError as exc:
            self._reloads = None
            log.error("not listening for reload broadcasts: %s", exc)

    def _on_reload(self, origin: bytes) -> None:
        if origin != self._id:
            self._background.spawn(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        problems = await self.reload()
        if problems:
            log.error("config reload refused, nothing changed: %s", "; ".join(problems))

    # Tests and tools reach the current snapshot's parts through the gateway.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.snapshot, name)


def build_app(config: Config, path: str | None = None) -> Gateway:
    return Gateway(config, path)


def app_from_env() -> Gateway:
    """uvicorn factory (`gateway.app:app_from_env`): each worker process loads the config itself."""
    path = os.environ["GATEWAY_CONFIG"]
    config = config_module.load(path)
    logs.configure(config.secrets(), os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    return build_app(config, path)
