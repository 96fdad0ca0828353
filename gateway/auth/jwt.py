"""JWT bearer tokens: per-issuer config, verification, and a cache of verified tokens.

The issuer is picked by the token's unverified `iss`; from then on only that
issuer's algorithm allowlist and keys count. That is what stops algorithm
confusion: an issuer configured for RS256 has no HMAC key at all, so an HS256
token "signed" with its public key is refused before any signature is checked.

Order of checks: shape, issuer, algorithm, key, signature, then the claims
(exp, nbf, aud, subject, models). Claim errors are only reported for tokens the
issuer really signed. Signature arithmetic is PyJWT's (`Algorithm.verify`);
parsing is ours, to read the token once and keep verification within budget.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import msgspec
import orjson

from gateway.auth import jwks
from gateway.errors import AuthenticationError

log = logging.getLogger("gateway.jwt")

MAX_TOKEN_BYTES = 16_384
REFRESH_INTERVAL_S = 60.0
_GLOB_CHARS = frozenset("*?[")


class JWTIssuer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One trusted issuer (an entry of `auth.jwt`)."""

    issuer: str
    audience: str | list[str]
    algorithms: list[str]
    secret: str = ""  # HS*: a secret (Config.secrets() masks it)
    public_keys: list[str] = []
    jwks_url: str = ""
    jwks_file: str = ""
    leeway_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30
    subject_claim: str = "sub"
    models_claim: str = ""
    tier_claim: str = ""
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    tiers: dict[str, list[str]] = {}

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("issuer: must not be empty")
        audiences = [self.audience] if isinstance(self.audience, str) else self.audience
        if not audiences or not all(audiences):
            raise ValueError("audience: must name at least one non-empty audience")
        if not self.subject_claim:
            raise ValueError("subject_claim: must not be empty")
        if not self.algorithms:
            raise ValueError("algorithms: must list at least one algorithm")
        for name in self.algorithms:
            if name.lower() == "none":
                raise ValueError("algorithms: 'none' is never allowed (unsigned tokens)")
            if name not in jwks.ALGORITHMS:
                raise ValueError(
                    f"algorithms: unknown algorithm {name!r} (one of: {', '.join(jwks.ALGORITHMS)})"
                )
        hmac = [a for a in self.algorithms if a in jwks.HMAC_ALGORITHMS]
        public = [a for a in self.algorithms if a in jwks.PUBLIC_KEY_ALGORITHMS]
        if hmac and public:
            raise ValueError(
                f"algorithms: {hmac[0]} and {public[0]} cannot share an issuer "
                "(a public key would become a usable HMAC secret: algorithm confusion)"
            )
        if hmac:
            self._check_hmac()
        else:
            self._check_public_keys()
        if self.tier_claim and not self.tiers:
            raise ValueError("tiers: tier_claim is set but no tiers are configured")
        if self.tiers and not self.tier_claim:
            raise ValueError("tier_claim: tiers are configured but no claim names them")

    def _check_hmac(self) -> None:
        if not self.secret:
            raise ValueError("secret: HS* algorithms need a shared secret")
        try:
            jwks.prepare_secret(self.secret, self.algorithms)
        except ValueError as exc:
            raise ValueError(f"secret: {exc}") from None
        if self.public_keys or self.jwks_url or self.jwks_file:
            raise ValueError("public_keys/jwks_url/jwks_file: not used by HS* algorithms; remove them")

    def _check_public_keys(self) -> None:
        if self.secret:
            raise ValueError("secret: only for HS* algorithms; this issuer uses public keys")
        if not (self.public_keys or self.jwks_url or self.jwks_file):
            raise ValueError(f"public_keys: {self.algorithms[0]} needs public_keys, jwks_url or jwks_file")
        for i, pem in enumerate(self.public_keys):
            try:
                key = jwks.load_pem(pem)
            except ValueError as exc:
                raise ValueError(f"public_keys[{i}]: {exc}") from None
            if not jwks.prepare(key, self.algorithms):
                raise ValueError(
                    f"public_keys[{i}]: fits none of {', '.join(self.algorithms)} "
                    "(wrong key type or curve, or RSA shorter than 2048 bits)"
                )
        if self.jwks_url:
            try:
                jwks.check_jwks_url(self.jwks_url)
            except ValueError as exc:
                raise ValueError(f"jwks_url: {exc}") from None


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    issuer: str
    subject: str
    models: tuple[str, ...]  # model globs this token may use (issuer models ∩ tier ∩ models claim)
    expires_at: float | None


def _fail(message: str, code: str = "invalid_token") -> AuthenticationError:
    return AuthenticationError(message, code=code)


def _malformed() -> AuthenticationError:
    return _fail("Invalid bearer token.")


def _b64decode(segment: bytes) -> bytes:
    # One token, one spelling: only the url-safe alphabet, no padding, no stray bits in the last character.
    rest = len(segment) % 4
    if rest == 1 or _B64URL.fullmatch(segment) is None:
        raise _malformed()
    if rest and _B64URL_VALUE[segment[-1]] & (0x0F if rest == 2 else 0x03):
        raise _malformed()
    return binascii.a2b_base64(segment.translate(_TO_STD) + b"=" * (-rest % 4))


_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_VALUE = bytes(_B64URL_ALPHABET.find(bytes([c])) % 64 for c in range(256))
_TO_STD = bytes.maketrans(b"-_", b"+/")


def _json_object(segment: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64decode(segment))
    except orjson.JSONDecodeError:
        raise _malformed() from None
    if not isinstance(value, dict):
        raise _malformed()
    return value


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):  # bool is an int, and not a time
        raise _malformed()
    return float(value)


def _within(narrow: str, wide: str) -> bool:
    """Whether every model `narrow` matches is matched by `wide`; False when unsure.

    Exact for a literal name; for two globs, only `*`, equality and a literal
    prefix followed by `*` are recognised. Never true when it should not be.
    """
    if wide == "*" or narrow == wide:
        return True
    if not _GLOB_CHARS.intersection(narrow):
        return fnmatch.fnmatchcase(narrow, wide)
    stem = wide[:-1]
    return wide.endswith("*") and not _GLOB_CHARS.intersection(stem) and narrow.startswith(stem)


@functools.lru_cache(maxsize=4096)  # few distinct claims, many tokens
def intersect(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """Globs matching only models both lists allow (conservative: may drop an odd overlap)."""
    out = [g for g in b if any(_within(g, w) for w in a)]
    out += [g for g in a if any(_within(g, w) for w in b)]
    return tuple(dict.fromkeys(out))


class _Issuer:
    """Run-time state of one configured issuer."""

    __slots__ = (
        "audiences",
        "config",
        "documents",
        "last_refresh",
        "models",
        "ring",
        "sources",
        "static",
        "tiers",
    )

    def __init__(self, config: JWTIssuer) -> None:
        self.config = config
        audience = config.audience
        self.audiences = frozenset([audience] if isinstance(audience, str) else audience)
        self.static: list[jwks.SigningKey] = []
        if config.secret:
            secret = jwks.prepare_secret(config.secret, config.algorithms)
            self.static = [jwks.SigningKey(None, alg, secret) for alg in config.algorithms]
        for pem in config.public_keys:
            usable = jwks.prepare(jwks.load_pem(pem), config.algorithms)
            self.static += [jwks.SigningKey(None, alg, key) for alg, key in usable.items()]
        self.sources = [s for s in (config.jwks_url, config.jwks_file) if s]
        # The last good document and its keys, per source: kept when a refresh fails.
        self.documents: dict[str, tuple[bytes, list[jwks.SigningKey]]] = {}
        self.ring = jwks.KeyRing(self.static)
        self.last_refresh = float("-inf")
        self.models = tuple(config.models)
        self.tiers = {name: intersect(self.models, tuple(globs)) for name, globs in config.tiers.items()}

    def rebuild(self) -> None:
        keys = list(self.static)
        for _, found in self.documents.values():
            keys += found
        self.ring = jwks.KeyRing(keys)


class JWTVerifier:
    """Verifies bearer JWTs against the configured issuers.

    `verify` is synchronous and does no I/O: keys come from `load` (at start
    and on reload) and from refreshes it schedules in the background when a
    token names an unknown kid (at most once a minute per issuer).
    """

    def __init__(
        self,
        issuers: Sequence[JWTIssuer],
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self._issuers: dict[str, _Issuer] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ValueError(f"issuer {config.issuer!r} is configured twice")
            self._issuers[config.issuer] = _Issuer(config)
        self._clock = clock
        # Cached by a keyed digest, not the token: like KeyTable, no credential sits in memory.
        self._cache_key = os.urandom(16)
        self._cache: OrderedDict[bytes, tuple[TokenIdentity, float]] = OrderedDict()
        self._cache_size = cache_size
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def looks_like_jwt(token: bytes) -> bool:
        """Cheap shape test, so API keys never go through JWT parsing."""
        return token.startswith(b"eyJ") and token.count(b".") == 2

    # -- keys -------------------------------------------------------------

    async def load(self, client: httpx.AsyncClient | None = None) -> None:
        """Fetch every JWKS file and URL; a failing source keeps its previous keys.

        Raises `KeyLoadError` if an issuer is left with no key at all. A given
        `client` is kept for background refreshes (the caller closes it).
        """
        if client is not None:
            self._client = client
        if any(i.config.jwks_url for i in self._issuers.values()):
            async with self._http() as http:
                await asyncio.gather(*(self._load_issuer(i, http) for i in self._issuers.values()))
        else:
            await asyncio.gather(*(self._load_issuer(i, None) for i in self._issuers.values()))
        empty = [i.config.issuer for i in self._issuers.values() if i.ring.size == 0]
        if empty:
            raise KeyLoadError(f"no usable signing keys for issuer(s): {', '.join(empty)}")

    async def wait_refreshes(self) -> None:
        """Wait for the background key refreshes under way (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    @contextlib.asynccontextmanager
    async def _http(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None and not self._client.is_closed:
            yield self._client
            return
        async with httpx.AsyncClient() as client:
            yield client

    async def _load_issuer(self, issuer: _Issuer, http: httpx.AsyncClient | None) -> None:
        changed = False
        for source in issuer.sources:
            try:
                if source == issuer.config.jwks_url:
                    assert http is not None
                    document = await jwks.fetch_jwks_url(http, source)
                else:
                    document = await jwks.read_jwks_file(source)
                previous = issuer.documents.get(source)
                if previous is not None and previous[0] == document:
                    continue
                keys = jwks.parse_jwks(document, issuer.config.algorithms, source)
                if not keys:
                    raise ValueError("no usable signature key")
            except (httpx.HTTPError, OSError, ValueError) as exc:
                kept = len(issuer.documents.get(source, (b"", []))[1])
                log.warning(
                    "JWKS %s for issuer %s unavailable (%s: %s); keeping %d previous key(s)",
                    source,
                    issuer.config.issuer,
                    type(exc).__name__,
                    exc,
                    kept,
                )
                continue
            issuer.documents[source] = (document, keys)
            changed = True
        if changed:
            issuer.rebuild()
            # A key may have gone: tokens it signed must not live on in the cache.
            self._cache.clear()

    def _schedule_refresh(self, issuer: _Issuer, now: float) -> None:
        if not issuer.sources or now - issuer.last_refresh < REFRESH_INTERVAL_S:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        issuer.last_refresh = now
        task = loop.create_task(self._refresh(issuer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, issuer: _Issuer) -> None:
        if not issuer.config.jwks_url:
            await self._load_issuer(issuer, None)
            return
        async with self._http() as http:
            await self._load_issuer(issuer, http)

    # -- tokens -----------------------------------------------------------

    def verify(self, token: bytes) -> TokenIdentity:
        """The identity a valid token carries; raises AuthenticationError (401) otherwise."""
        now = self._clock()
        digest = hashlib.blake2b(token, key=self._cache_key, digest_size=16).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit[1]:
                self._cache.move_to_end(digest)
                return hit[0]
            del self._cache[digest]  # expired: the full path says so
        identity, valid_until = self._verify(token, now)
        if self._cache_size > 0:
            self._cache[digest] = (identity, valid_until)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity

    def _verify(self, token: bytes, now: float) -> tuple[TokenIdentity, float]:
        if len(token) > MAX_TOKEN_BYTES:
            raise _malformed()
        parts = token.split(b".")
        if len(parts) != 3:
            raise _malformed()
        header = _json_object(parts[0])
        claims = _json_object(parts[1])
        signature = _b64decode(parts[2])
        alg, kid = header.get("alg"), header.get("kid")
        # We implement no JWS extension, so any `crit` (b64=false included) is refused.
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)) or "crit" in header:
            raise _malformed()

        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _fail("The bearer token's issuer is not trusted.", "invalid_issuer")
        config = issuer.config
        if alg not in config.algorithms:
            raise _fail("The bearer token's signing algorithm is not allowed.", "algorithm_not_allowed")
        keys, known = issuer.ring.candidates(alg, kid)
        signing_input = token[: len(parts[0]) + 1 + len(parts[1])]
        algorithm = jwks.ALGORITHMS[alg]
        if not any(algorithm.verify(signing_input, key, signature) for key in keys):
            if known or not issuer.sources:
                raise _fail("The bearer token's signature is invalid.", "invalid_signature")
            # Perhaps the issuer rotated its keys: look again, in the background.
            self._schedule_refresh(issuer, now)
            raise _fail("The bearer token was signed with an unknown key.", "unknown_key")

        exp, nbf = _number(claims, "exp"), _number(claims, "nbf")
        leeway = config.leeway_s
        if exp is not None and now >= exp + leeway:
            raise _fail("The bearer token has expired.", "token_expired")
        if nbf is not None and now < nbf - leeway:
            raise _fail("The bearer token is not valid yet.", "token_not_yet_valid")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in issuer.audiences for a in audiences):
            raise _fail("The bearer token's audience does not match.", "invalid_audience")
        subject = claims.get(config.subject_claim)
        if type(subject) is int:
            subject = str(subject)
        if not isinstance(subject, str) or not subject:
            raise _fail(f"The bearer token has no {config.subject_claim!r} claim.")
        identity = TokenIdentity(config.issuer, subject, self._models(issuer, claims), exp)
        return identity, float("inf") if exp is None else exp + leeway

    @staticmethod
    def _models(issuer: _Issuer, claims: dict[str, Any]) -> tuple[str, ...]:
        # A token lacking a configured claim is refused: its absence must not read as "no limit".
        config = issuer.config
        models = issuer.models
        if config.tier_claim:
            tier = claims.get(config.tier_claim)
            narrowed = issuer.tiers.get(tier) if isinstance(tier, str) else None
            if narrowed is None:
                raise _fail(f"The bearer token's {config.tier_claim!r} claim names no configured tier.")
            models = narrowed
        if config.models_claim:
            value = claims.get(config.models_claim)
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise _fail(f"The bearer token's {config.models_claim!r} claim must list model names.")
            models = intersect(models, tuple(value))
        return models


class KeyLoadError(Exception):
    """An issuer has no signing key after `JWTVerifier.load` (every source failed)."""
