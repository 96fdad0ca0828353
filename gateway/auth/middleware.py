"""Authentication for /v1: an API key or a JWT (Authorization: Bearer, or x-api-key).

Both checks are local and synchronous (gateway/keys.py, gateway/jwt.py): no store
round trip on the request path. Unknown, disabled and revoked keys get the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.auth.jwt import JWTVerifier, TokenIdentity
from gateway.auth.keys import KeyStore, Policy
from gateway.errors import AuthenticationError, GatewayError
from gateway.types import ASGIApp, Receive, Scope, Send

_POLICY_CACHE = 4096


def credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if name == b"x-api-key":
            return value.strip()
    return None


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, keys: KeyStore, jwt: JWTVerifier | None = None, protected_prefix: str = "/v1/"
    ) -> None:
        self.app = app
        self.keys = keys
        self.jwt = jwt
        self.prefix = protected_prefix
        # Token identities map to few distinct policies; expanding globs once per identity keeps it cheap.
        self._token_policies: dict[tuple[str, str, tuple[str, ...]], Policy] = {}

    def token_policy(self, identity: TokenIdentity) -> Policy:
        key = (identity.issuer, identity.subject, identity.models)
        policy = self._token_policies.get(key)
        if policy is None:
            if len(self._token_policies) >= _POLICY_CACHE:
                self._token_policies.clear()
            models = self.keys.allowed(identity.models)
            policy = Policy(f"jwt:{identity.issuer}:{identity.subject}", identity.subject, models)
            self._token_policies[key] = policy
        return policy

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
            if self.jwt is not None and JWTVerifier.looks_like_jwt(token):
                policy: Policy | None = self.token_policy(self.jwt.verify(token))
            else:
                policy = self.keys.lookup(token)
            if policy is None:
                raise AuthenticationError("Incorrect API key provided.")
        except GatewayError as exc:
            await ctx.send_error(send, exc)
            return
        ctx.policy = policy
        ctx.identity = policy.name
        await self.app(scope, receive, send)
