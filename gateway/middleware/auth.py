"""API-key authentication for /v1 (Authorization: Bearer, or x-api-key).

Keys are held only as HMAC-SHA256 digests under a per-process secret: a memory
dump reveals no key, and the lookup is by digest, so an unknown key and a known
one take the same path (the final compare is constant-time all the same).
"""

from __future__ import annotations

import fnmatch
import hmac
import os
from collections.abc import Container, Iterable

from gateway.config import KeyConfig, Limits
from gateway.errors import AuthenticationError
from gateway.types import ASGIApp, Receive, Scope, Send


class Policy:
    """What one credential may do."""

    __slots__ = ("digest", "limits", "models", "name")

    def __init__(self, name: str, digest: bytes, models: frozenset[str], limits: Limits) -> None:
        self.name = name
        self.digest = digest
        self.models = models  # the aliases this key may use, globs already expanded
        self.limits = limits


class KeyTable:
    def __init__(self, keys: Iterable[KeyConfig], aliases: Iterable[str]) -> None:
        self._secret = os.urandom(32)
        aliases = list(aliases)
        self._by_digest: dict[bytes, Policy] = {}
        for key in keys:
            allowed = frozenset(a for a in aliases if any(fnmatch.fnmatchcase(a, p) for p in key.models))
            digest = self.digest(key.key.encode())
            self._by_digest[digest] = Policy(key.name, digest, allowed, key.limits)

    def digest(self, key: bytes) -> bytes:
        return hmac.digest(self._secret, key, "sha256")

    def lookup(self, key: bytes) -> Policy | None:
        digest = self.digest(key)
        policy = self._by_digest.get(digest)
        if policy is None or not hmac.compare_digest(policy.digest, digest):
            return None
        return policy


def credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if name == b"x-api-key":
            return value.strip()
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyTable, public_paths: Container[str]) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        ctx = scope["gateway"]
        token = credential(scope["headers"])
        if not token:
            error = AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key'.",
                code="missing_api_key",
            )
            await ctx.send_error(send, error)
            return
        policy = self.keys.lookup(token)
        if policy is None:
            await ctx.send_error(send, AuthenticationError("Incorrect API key provided."))
            return
        ctx.policy = policy
        await self.app(scope, receive, send)
