"""Authentication for /v1: an API key (Authorization: Bearer, or x-api-key).

The lookup is local and synchronous (see gateway/keys.py): no store round trip
on the request path. Unknown, disabled and revoked keys get the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.errors import AuthenticationError, GatewayError
from gateway.keys import KeyStore
from gateway.types import ASGIApp, Receive, Scope, Send


def credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if name == b"x-api-key":
            return value.strip()
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyStore, protected_prefix: str = "/v1/") -> None:
        self.app = app
        self.keys = keys
        self.prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        ctx = scope["gateway"]
        token = credential(scope["headers"])
        try:
            if not token:
                raise AuthenticationError(
                    "You didn't provide an API key. "
                    "Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key'.",
                    code="missing_api_key",
                )
            policy = self.keys.lookup(token)
            if policy is None:
                raise AuthenticationError("Incorrect API key provided.")
        except GatewayError as exc:
            await ctx.send_error(send, exc)
            return
        ctx.policy = policy
        ctx.identity = policy.name
        await self.app(scope, receive, send)
