"""The admin API (/admin/...): its own credential, JSON in and out, OpenAI-style errors.

The admin key is never accepted on /v1 and /v1 keys are never accepted here.
A key's secret is shown once, in the answer that mints it.
"""

from __future__ import annotations

import glob
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth.keys import KeyRecord, KeyStore
from gateway.auth.middleware import credential
from gateway.cache.middleware import ResponseCache
from gateway.config import Limits
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    error_response,
)
from gateway.limits.usage import UsageRecorder
from gateway.routing.breaker import Breakers
from gateway.store import StoreError

UNSET: Any = msgspec.UNSET


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}
    expires_at: float | None = None  # unix time
    expires_in_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    owner: dict[str, str] = {}
    enabled: bool = True


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | msgspec.UnsetType = UNSET
    models: list[str] | msgspec.UnsetType = UNSET
    limits: Limits | msgspec.UnsetType = UNSET
    model_limits: dict[str, Limits] | msgspec.UnsetType = UNSET
    expires_at: float | msgspec.UnsetType | None = UNSET
    owner: dict[str, str] | msgspec.UnsetType = UNSET
    enabled: bool | msgspec.UnsetType = UNSET


class Purge(msgspec.Struct, forbid_unknown_fields=True):
    key: str | None = None
    model: str | None = None


class Rotate(msgspec.Struct, forbid_unknown_fields=True):
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)] = 0


Handler = Callable[[Request], Awaitable[Response]]


class AdminAPI:
    def __init__(
        self,
        admin_key: str,
        keys: KeyStore,
        breakers: Breakers,
        usage: UsageRecorder,
        cache: ResponseCache | None,
    ) -> None:
        self._admin_digest = hmac.digest(b"admin", admin_key.encode(), "sha256") if admin_key else None
        self.keys = keys
        self.breakers = breakers
        self.usage = usage
        self.cache = cache
        # Set by the Gateway: reloads the config file, returning its problems ([] when swapped).
        self.reloader: Callable[[], Awaitable[list[str]]] | None = None

    def routes(self) -> list[Route]:
        return [
            Route("/admin/keys", self.guard(self.list_keys), methods=["GET"]),
            Route("/admin/keys", self.guard(self.create_key), methods=["POST"]),
            Route("/admin/keys/{key_id}", self.guard(self.show_key), methods=["GET"]),
            Route("/admin/keys/{key_id}", self.guard(self.update_key), methods=["PATCH"]),
            Route("/admin/keys/{key_id}", self.guard(self.revoke_key), methods=["DELETE"]),
            Route("/admin/keys/{key_id}/rotate", self.guard(self.rotate_key), methods=["POST"]),
            Route("/admin/breakers/{name:path}/reset", self.guard(self.reset_breaker), methods=["POST"]),
            Route("/admin/reload", self.guard(self.reload), methods=["POST"]),
            Route("/admin/usage", self.guard(self.read_usage), methods=["GET"]),
            Route("/admin/cache/purge", self.guard(self.purge_cache), methods=["POST"]),
        ]

    def guard(self, handler: Handler) -> Handler:
        """Admin credential check, then the handler; GatewayErrors become OpenAI-shaped answers."""

        async def guarded(request: Request) -> Response:
            ctx = request.scope["gateway"]
            try:
                token = credential(request.scope["headers"])
                if self._admin_digest is None:
                    raise AuthenticationError("The admin API is disabled: set auth.admin_key.")
                given = hmac.digest(b"admin", token or b"", "sha256")
                if not hmac.compare_digest(given, self._admin_digest):
                    raise AuthenticationError("Invalid admin credential.")
                ctx.identity = "admin"
                return await handler(request)
            except StoreError as exc:
                return error_response(ServiceUnavailable(f"The store is unreachable: {exc}"))
            except GatewayError as exc:
                return error_response(exc)

        return guarded

    async def decode(self, request: Request, kind: type[Any]) -> Any:
        body = await request.body()
        try:
            spec = msgspec.json.decode(body or b"{}", type=kind)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"Invalid request body: {exc}") from None
        except msgspec.DecodeError:
            raise InvalidRequest("The request body is not valid JSON.") from None
        for alias, limits in (getattr(spec, "model_limits", None) or {}).items():
            if alias not in self.keys.allowed([glob.escape(alias)]):
                raise InvalidRequest(f"model_limits: unknown model '{alias}'", param="model_limits")
            if limits.concurrency:
                raise InvalidRequest("model_limits: concurrency is a key limit only", param="model_limits")
        return spec

    def record(self, request: Request, *, writable: bool = False) -> KeyRecord:
        key_id = request.path_params["key_id"]
        record = self.keys.get(key_id)
        if record is None:
            raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
        if writable and record.source == "config":
            raise InvalidRequest(
                f"Key '{key_id}' comes from the config file; change it there.", code="read_only"
            )
        return record

    async def list_keys(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [r.public() for r in self.keys.records()]})

    async def show_key(self, request: Request) -> Response:
        return JSONResponse(self.record(request).public())

    async def create_key(self, request: Request) -> Response:
        spec: KeyCreate = await self.decode(request, KeyCreate)
        now = time.time()
        expires_at = spec.expires_at if spec.expires_in_s is None else now + spec.expires_in_s
        secret, digest = self.keys.mint()
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            name=spec.name,
            digest=digest,
            created_at=now,
            models=spec.models,
            limits=spec.limits,
            model_limits=spec.model_limits,
            expires_at=expires_at,
            enabled=spec.enabled,
            owner=spec.owner,
        )
        written = await self.keys.save(record)
        return JSONResponse({**record.public(), "secret": secret, **written}, status_code=201)

    async def update_key(self, request: Request) -> Response:
        record = self.record(request, writable=True)
        patch: KeyUpdate = await self.decode(request, KeyUpdate)
        changes = {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not UNSET}
        record = msgspec.structs.replace(record, **changes)
        written = await self.keys.save(record)
        return JSONResponse({**record.public(), **written})

    async def rotate_key(self, request: Request) -> Response:
        record = self.record(request, writable=True)
        spec: Rotate = await self.decode(request, Rotate)
        secret, digest = self.keys.mint()
        grace = {"previous_digest": None, "previous_valid_until": None}
        if spec.grace_s:
            grace = {"previous_digest": record.digest, "previous_valid_until": time.time() + spec.grace_s}
        record = msgspec.structs.replace(record, digest=digest, **grace)
        written = await self.keys.save(record)
        return JSONResponse({**record.public(), "secret": secret, **written})

    async def reset_breaker(self, request: Request) -> Response:
        deployment = request.path_params["name"]
        if deployment not in self.breakers.snapshot():
            raise NotFound(f"No deployment '{deployment}'.", code="deployment_not_found")
        await self.breakers.reset(deployment)
        return JSONResponse({"deployment": deployment, "state": self.breakers.state(deployment)})

    async def read_usage(self, request: Request) -> Response:
        """GET /admin/usage?key=ID[&start=UNIX&end=UNIX]: per model, hourly resolution, default last 24 h."""
        query = request.query_params
        key_id = query.get("key")
        if not key_id:
            raise InvalidRequest("Name the key: /admin/usage?key=ID.", param="key")
        try:
            end = float(query.get("end", time.time()))
            start = float(query.get("start", end - 86400))
        except ValueError:
            raise InvalidRequest("start and end are unix times in seconds.", param="start") from None
        if not 0 <= start < end or end - start > 366 * 86400:
            raise InvalidRequest("Need 0 <= start < end, at most 366 days apart.", param="start")
        models = await self.usage.read(key_id, start, end)
        return JSONResponse({"key": key_id, "start": start, "end": end, "models": models})

    async def purge_cache(self, request: Request) -> Response:
        """POST /admin/cache/purge {"key": ID} | {"model": ALIAS} | {} (everything)."""
        spec: Purge = await self.decode(request, Purge)
        if self.cache is None:
            raise InvalidRequest("The response cache is off (cache.enabled).", code="cache_disabled")
        if spec.key and spec.model:
            raise InvalidRequest("Purge one key or one model (or, with neither, everything).", param="key")
        await self.cache.purge(key_id=spec.key, model=spec.model)
        return JSONResponse({"purged": {"key": spec.key, "model": spec.model}})

    async def reload(self, request: Request) -> Response:
        problems = await self.reloader() if self.reloader is not None else ["reload is not available"]
        if problems:
            raise InvalidRequest("The config was not reloaded: " + "; ".join(problems), code="invalid_config")
        return JSONResponse({"reloaded": True})

    async def revoke_key(self, request: Request) -> Response:
        record = self.record(request, writable=True)
        written = await self.keys.remove(record.id)
        return JSONResponse({"id": record.id, "revoked": True, **written})
