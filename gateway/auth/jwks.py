"""Signing keys for JWT verification: PEM keys from config, JWKS documents from a file or URL.

A `KeyRing` is one issuer's immutable snapshot of keys. Reloading builds a new
ring and swaps it in, so `JWTVerifier.verify` never sees a half-built one and
never does I/O. Every key is prepared by PyJWT once per algorithm it may verify:
that is where an EC key is refused for RS256 or a P-384 key for ES256, so the
hot path only calls `Algorithm.verify`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

log = logging.getLogger("gateway.jwt")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
ALGORITHMS: dict[str, Algorithm] = {
    name: alg
    for name, alg in get_default_algorithms().items()
    if name in HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
}
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT_S = 10.0
_KTY_LOADER = {"RSA": "RS256", "EC": "ES256"}  # whose `from_jwk` builds a key of that type


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    alg: str
    key: Any  # as `ALGORITHMS[alg].prepare_key` returned it


def prepare(key: Any, algorithms: Iterable[str]) -> dict[str, Any]:
    """The public-key algorithms among `algorithms` that `key` can verify, each with the prepared key."""
    usable = {}
    for name in algorithms:
        alg = ALGORITHMS[name]
        try:
            prepared = alg.prepare_key(key)
        except (InvalidKeyError, TypeError, ValueError):  # wrong key type or curve (HMAC: TypeError)
            continue
        # PyJWT only warns about short RSA keys; a gateway refuses them.
        if alg.check_key_length(prepared) is None:
            usable[name] = prepared
    return usable


def prepare_secret(secret: str, algorithms: Iterable[str]) -> bytes:
    """An HS* secret as bytes; ValueError when short or shaped like a public key (confusion).

    RFC 7518 3.2: at least as long as the hash output (32 bytes for HS256, 64 for HS512).
    """
    raw = secret.encode()
    for name in algorithms:
        length = _HMAC_KEY_BYTES[name]
        if len(raw) < length:
            raise ValueError(f"shorter than {length} bytes (the minimum for {name})")
    try:
        prepared: bytes = ALGORITHMS["HS256"].prepare_key(raw)
    except InvalidKeyError:
        raise ValueError("looks like a public key or certificate, not a shared secret") from None
    return prepared


def load_pem(pem: str) -> Any:
    """A public key from a PEM public key or X.509 certificate; ValueError otherwise."""
    data = pem.strip().encode()
    try:
        if data.startswith(b"-----BEGIN CERTIFICATE-----"):
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key or certificate") from None


def check_jwks_url(url: str) -> None:
    """https, or http to a loopback host (a local sidecar); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        if parts.hostname == "localhost":
            return
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return
        except ValueError:
            pass
    raise ValueError("must be an https:// URL (http:// only to a loopback host)")


def parse_jwks(document: bytes, algorithms: Sequence[str], source: str) -> list[SigningKey]:
    """The signature keys of a JWKS document usable with `algorithms`; ValueError if it is not a JWKS.

    Keys for encryption, symmetric keys (HS* secrets come only from config),
    private keys and keys no allowed algorithm can use are skipped with a warning.
    """
    try:
        data = orjson.loads(document)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: list[SigningKey] = []
    for i, jwk in enumerate(data["keys"]):
        try:
            keys += _parse_jwk(jwk, algorithms)
        except ValueError as exc:
            log.warning("JWKS %s: key %d skipped: %s", source, i, exc)
    return keys


def _parse_jwk(jwk: Any, algorithms: Sequence[str]) -> list[SigningKey]:
    if not isinstance(jwk, dict):
        raise ValueError("not an object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use is {jwk.get('use')!r}, not 'sig'")
    loader = _KTY_LOADER.get(jwk.get("kty"))  # type: ignore[arg-type]
    if loader is None:
        raise ValueError(f"unsupported kty {jwk.get('kty')!r}")
    try:
        key = ALGORITHMS[loader].from_jwk(jwk)
    except (InvalidKeyError, TypeError, ValueError, KeyError):
        raise ValueError(f"malformed {jwk['kty']} key") from None
    if not isinstance(key, RSAPublicKey | EllipticCurvePublicKey):
        raise ValueError("holds private key material: it must not be published")
    wanted = algorithms
    if "alg" in jwk:
        if jwk["alg"] not in algorithms:
            raise ValueError(f"alg {jwk['alg']!r} is not allowed for this issuer")
        wanted = [jwk["alg"]]
    usable = prepare(key, wanted)
    if not usable:
        raise ValueError("fits none of the issuer's algorithms (or RSA shorter than 2048 bits)")
    return [SigningKey(kid, alg, prepared) for alg, prepared in usable.items()]


class KeyRing:
    """One issuer's keys, indexed by (alg, kid) for the hot path."""

    __slots__ = ("_all", "_by_kid", "_kidless", "size")

    def __init__(self, keys: Iterable[SigningKey]) -> None:
        by_kid: dict[tuple[str, str], list[Any]] = {}
        everything: dict[str, list[Any]] = {}
        kidless: dict[str, list[Any]] = {}
        for k in keys:
            everything.setdefault(k.alg, []).append(k.key)
            if k.kid is None:
                kidless.setdefault(k.alg, []).append(k.key)
            else:
                by_kid.setdefault((k.alg, k.kid), []).append(k.key)
        self._by_kid = {name: tuple(v) for name, v in by_kid.items()}
        self._all = {name: tuple(v) for name, v in everything.items()}
        self._kidless = {name: tuple(v) for name, v in kidless.items()}
        self.size = sum(len(v) for v in self._all.values())

    def candidates(self, alg: str, kid: str | None) -> tuple[tuple[Any, ...], bool]:
        """The keys to try for a token, and whether its kid (if any) is known.

        A kid not in the ring falls back on the keys that have none (PEM keys
        from config): issuers put a kid in tokens whether or not we know it.
        """
        if kid is None:
            return self._all.get(alg, ()), True
        keys = self._by_kid.get((alg, kid))
        if keys is not None:
            return keys, True
        return self._kidless.get(alg, ()), False


async def read_jwks_file(path: str) -> bytes:
    data = await asyncio.to_thread(Path(path).read_bytes)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


async def fetch_jwks_url(client: httpx.AsyncClient, url: str) -> bytes:
    # No redirects: one could lead from https to http, which config refused.
    response = await client.get(
        url, headers={"accept": "application/json"}, timeout=FETCH_TIMEOUT_S, follow_redirects=False
    )
    response.raise_for_status()
    if len(response.content) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return response.content
