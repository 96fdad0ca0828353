from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hmac
import http.server
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import msgspec
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import jwks
from gateway.auth.jwt import JWTIssuer, JWTVerifier, KeyLoadError, TokenIdentity, intersect
from gateway.errors import AuthenticationError

NOW = 1_700_000_000.0
ISS = "https://idp.example"
AUD = "gateway"
SECRET = "s3cret-" + "x" * 60  # 64 bytes+: long enough for HS512

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_384 = ec.generate_private_key(ec.SECP384R1())


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pem(key: Any) -> str:
    public = key.public_key() if hasattr(key, "public_key") else key
    data: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def jwk(key: Any, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    loader = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    data: dict[str, Any] = loader.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        data["kid"] = kid
    return data | extra


def jwks_doc(*keys: Any) -> bytes:
    return orjson.dumps({"keys": list(keys)})


def token(
    key: Any, alg: str = "RS256", *, kid: str | None = None, drop: tuple[str, ...] = (), **claims: Any
) -> bytes:
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": NOW + 600} | claims
    body = {k: v for k, v in body.items() if k not in drop}
    return pyjwt.encode(body, key, alg, headers={"kid": kid} if kid else None).encode()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] = lambda _: b""
) -> bytes:
    signing_input = b64(orjson.dumps(header)) + b"." + b64(orjson.dumps(claims))
    return signing_input + b"." + b64(sign(signing_input))


def issuer(alg: str = "RS256", **kw: Any) -> JWTIssuer:
    options: dict[str, Any] = {"issuer": ISS, "audience": AUD, "algorithms": [alg]}
    if alg.startswith("HS"):
        options["secret"] = SECRET
    elif "jwks_url" not in kw and "jwks_file" not in kw:
        options["public_keys"] = [pem(EC_KEY if alg.startswith("ES") else RSA_KEY)]
    return JWTIssuer(**(options | kw))


def verifier(*issuers: JWTIssuer, clock: Clock | None = None, **kw: Any) -> JWTVerifier:
    return JWTVerifier(issuers or [issuer()], clock=clock or Clock(), **kw)


def refused(v: JWTVerifier, tok: bytes) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        v.verify(tok)
    err = info.value
    assert err.status == 401
    # Neither the token nor any part of it, nor a secret, ever reaches the client.
    for leak in (tok.decode(errors="replace"), *tok.decode(errors="replace").split("."), SECRET):
        assert len(leak) < 6 or leak not in err.message
    return err


# -- success, per algorithm and key source ------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key"),
    [
        ("HS256", SECRET),
        ("HS512", SECRET),
        ("RS256", RSA_KEY),
        ("RS384", RSA_KEY),
        ("PS256", RSA_KEY),
        ("ES256", EC_KEY),
    ],
)
def test_each_algorithm_with_configured_key(alg: str, key: Any) -> None:
    v = verifier(issuer(alg))
    identity = v.verify(token(key, alg))
    assert identity == TokenIdentity(ISS, "alice", ("*",), NOW + 600)


def test_es384_needs_a_p384_key() -> None:
    v = verifier(issuer("ES384", public_keys=[pem(EC_KEY_384)]))
    assert v.verify(token(EC_KEY_384, "ES384")).subject == "alice"


def test_x509_certificate_as_public_key() -> None:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(RSA_KEY, hashes.SHA256())
    )
    v = verifier(issuer(public_keys=[cert.public_bytes(serialization.Encoding.PEM).decode()]))
    assert v.verify(token(RSA_KEY)).subject == "alice"


def test_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_doc(jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1")))
    v = verifier(issuer("RS256", algorithms=["RS256", "ES256"], jwks_file=str(path)))
    asyncio.run(v.load())
    assert v.verify(token(RSA_KEY, kid="r1")).subject == "alice"
    assert v.verify(token(EC_KEY, "ES256", kid="e1")).subject == "alice"
    # A token without kid is tried against every key of its algorithm.
    assert v.verify(token(EC_KEY, "ES256", sub="bob")).subject == "bob"


class JWKSHandler:
    """httpx.MockTransport handler serving a JWKS document that tests can swap or break."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.status = 200
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        assert request.url == "https://idp.example/jwks"
        return httpx.Response(self.status, content=self.document)


def url_issuer(**kw: Any) -> JWTIssuer:
    return issuer("RS256", jwks_url="https://idp.example/jwks", **kw)


def test_jwks_url_via_client() -> None:
    handler = JWKSHandler(jwks_doc(jwk(RSA_KEY, "r1")))
    v = verifier(url_issuer())

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)

    asyncio.run(main())
    assert handler.calls == 1
    assert v.verify(token(RSA_KEY, kid="r1")).subject == "alice"


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    served = {"document": jwks_doc(jwk(EC_KEY, "e1"))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served["document"]
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_jwks_url_on_loopback_with_own_client(jwks_server: tuple[str, dict[str, bytes]]) -> None:
    url, served = jwks_server
    v = verifier(issuer("ES256", jwks_url=url))
    asyncio.run(v.load())
    assert v.verify(token(EC_KEY, "ES256", kid="e1")).subject == "alice"

    # A background refresh without a client of ours opens (and closes) its own.
    served["document"] = jwks_doc(jwk(EC_KEY, "e1"), jwk(EC_KEY, "e2"))

    async def rotate() -> None:
        assert refused(v, token(EC_KEY, "ES256", kid="e2")).code == "unknown_key"
        await v.wait_refreshes()

    asyncio.run(rotate())
    assert v.verify(token(EC_KEY, "ES256", kid="e2")).subject == "alice"


# -- each failure -------------------------------------------------------------------------


def test_expired_says_so() -> None:
    err = refused(verifier(), token(RSA_KEY, exp=NOW - 3600))
    assert err.code == "token_expired" and "expired" in err.message


def test_not_yet_valid() -> None:
    err = refused(verifier(), token(RSA_KEY, nbf=NOW + 3600))
    assert err.code == "token_not_yet_valid"


@pytest.mark.parametrize(
    "claims", [{"iss": "https://evil.example"}, {"iss": ["https://idp.example"]}, {"iss": None}]
)
def test_unknown_or_missing_issuer(claims: dict[str, Any]) -> None:
    tok = forge({"alg": "RS256"}, {"aud": AUD, "sub": "alice"} | claims, lambda _: b"sig")
    assert refused(verifier(), tok).code == "invalid_issuer"


@pytest.mark.parametrize("aud", ["other", ["other", "more"], 42, [42], None])
def test_wrong_audience(aud: Any) -> None:
    tok = token(RSA_KEY, aud=aud) if aud is not None else token(RSA_KEY, drop=("aud",))
    assert refused(verifier(), tok).code == "invalid_audience"


def test_audience_lists_on_both_sides() -> None:
    v = verifier(issuer(audience=["gateway", "gateway-eu"]))
    assert v.verify(token(RSA_KEY, aud=["other", "gateway-eu"])).subject == "alice"
    assert v.verify(token(RSA_KEY, aud="gateway", sub="bob")).subject == "bob"


def test_alg_none_refused() -> None:
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": NOW + 600}
    for alg in ("none", "None", "NONE"):
        tok = forge({"alg": alg, "typ": "JWT"}, claims)
        assert refused(verifier(), tok).code == "algorithm_not_allowed"
        assert refused(verifier(issuer("HS256")), tok).code == "algorithm_not_allowed"


def test_hs256_signed_with_rs_public_key_refused_by_rs256_issuer() -> None:
    """The classic confusion: the public key (PEM, as published) used as the HMAC secret."""
    public_pem = pem(RSA_KEY).encode()
    claims = {"iss": ISS, "aud": AUD, "sub": "mallory", "exp": NOW + 600}
    for alg, digest in (("HS256", "sha256"), ("HS512", "sha512")):
        tok = forge({"alg": alg}, claims, functools.partial(hmac.digest, public_pem, digest=digest))
        assert refused(verifier(), tok).code == "algorithm_not_allowed"
    # And a JWKS-configured RS256 issuer likewise.
    v = verifier(url_issuer())
    tok = forge({"alg": "HS256", "kid": "r1"}, claims, lambda data: hmac.digest(public_pem, data, "sha256"))
    assert refused(v, tok).code == "algorithm_not_allowed"


def test_rs_token_refused_by_hs_issuer() -> None:
    assert refused(verifier(issuer("HS256")), token(RSA_KEY)).code == "algorithm_not_allowed"


def test_algorithm_outside_the_allowlist() -> None:
    assert refused(verifier(issuer("RS256")), token(RSA_KEY, "PS256")).code == "algorithm_not_allowed"


@pytest.mark.parametrize(
    ("alg", "signer", "other"),
    [
        ("RS256", RSA_KEY, RSA_KEY_2),
        ("ES256", EC_KEY, ec.generate_private_key(ec.SECP256R1())),
        ("HS256", SECRET, "another-secret-" + "y" * 60),
    ],
)
def test_bad_signature(alg: str, signer: Any, other: Any) -> None:
    v = verifier(issuer(alg))
    assert refused(v, token(other, alg)).code == "invalid_signature"
    # A valid token with its claims edited no longer verifies.
    header, _, sig = token(signer, alg).split(b".")
    edited = b64(orjson.dumps({"iss": ISS, "aud": AUD, "sub": "admin", "exp": NOW + 600}))
    assert refused(v, b".".join([header, edited, sig])).code == "invalid_signature"


def test_kid_means_nothing_without_jwks() -> None:
    v = verifier(issuer("HS256"))
    assert v.verify(token(SECRET, "HS256", kid="k1")).subject == "alice"
    assert refused(v, token("z" * 64, "HS256", kid="k1")).code == "invalid_signature"


def test_ecdsa_signature_of_wrong_length() -> None:
    head, body, _ = token(EC_KEY, "ES256").split(b".")
    assert (
        refused(verifier(issuer("ES256")), head + b"." + body + b"." + b64(b"x" * 10)).code
        == "invalid_signature"
    )


@pytest.mark.parametrize(
    "tok",
    [
        b"",
        b"eyJ",
        b"a.b",
        b"a.b.c.d",
        b"eyJhbGciOiJIUzI1NiJ9.!!!!.c2ln",
        b"eyJhbGciOiJIUzI1NiJ9.eyJ.c2ln",  # non-canonical
        b"eyJhbGciOiJIUzI1NiJ9." + b64(b'{"iss": nope') + b".c2ln",  # not JSON
        b64(b"[1]") + b"." + b64(b"{}") + b".c2ln",  # header not an object
        b64(b'{"alg":"HS256"}') + b"." + b64(b"[]") + b".c2ln",  # payload not an object
        b64(b'{"alg":"HS256"}') + b"=." + b64(b"{}") + b".c2ln",  # padding
        b64(b'{"alg":"HS256"}') + b"." + b64(b"{}") + b".c2l",  # non-canonical final bits
        b64(b'{"alg":"HS256"}') + b"." + b64(b"{}") + b".c2",  # same, one byte short
        b64(b'{"alg":"HS256"}') + b"." + b64(b"{}") + b".c2lnc",  # impossible length
        b64(b'{"alg":"HS256"}') + b"." + b64(b"{}") + b".c2l+",  # standard, not url-safe, alphabet
        b64(b'{"alg":256}') + b"." + b64(b"{}") + b".c2ln",
        b64(b'{"typ":"JWT"}') + b"." + b64(b"{}") + b".c2ln",
        b"eyJ" + b"A" * 20_000 + b".e30.c2ln",
    ],
)
def test_malformed(tok: bytes) -> None:
    err = refused(verifier(issuer("HS256")), tok)
    assert (err.code, err.message) == ("invalid_token", "Invalid bearer token.")


def test_malformed_header_fields_and_claims() -> None:
    v = verifier(issuer("HS256"))
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": NOW + 600}
    for header in ({"alg": "HS256", "kid": 7}, {"alg": "HS256", "crit": ["b64"], "b64": False}):
        assert refused(v, forge(header, claims)).code == "invalid_token"
    for bad in ({"exp": "tomorrow"}, {"exp": True}, {"nbf": [1]}):
        tok = pyjwt.encode(claims | bad, SECRET, "HS256").encode()
        assert refused(v, tok).code == "invalid_token"


def test_subject_claim() -> None:
    v = verifier(issuer("HS256", subject_claim="client_id"))
    assert v.verify(token(SECRET, "HS256", client_id="svc-7")).subject == "svc-7"
    assert v.verify(token(SECRET, "HS256", client_id=1234)).subject == "1234"
    for value in ("", None, True, ["svc"]):
        tok = token(SECRET, "HS256", client_id=value)
        err = refused(v, tok)
        assert err.code == "invalid_token" and "'client_id'" in err.message


# -- keys: rotation, refresh, failures ----------------------------------------------------


def test_kid_rotation_via_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_doc(jwk(RSA_KEY, "r1")))
    clock = Clock()
    v = verifier(issuer(jwks_file=str(path)), clock=clock)
    new = token(RSA_KEY_2, kid="r2")

    async def main() -> None:
        await v.load()
        assert v.verify(token(RSA_KEY, kid="r1")).subject == "alice"
        path.write_bytes(jwks_doc(jwk(RSA_KEY_2, "r2")))
        err = refused(v, new)
        assert err.code == "unknown_key"
        await v.wait_refreshes()
        assert v.verify(new).subject == "alice"
        # The old key left the JWKS: its tokens go, cached or not.
        assert refused(v, token(RSA_KEY, kid="r1")).code == "unknown_key"

    asyncio.run(main())


def test_unknown_kid_refresh_is_rate_limited() -> None:
    handler = JWKSHandler(jwks_doc(jwk(RSA_KEY, "r1")))
    clock = Clock()
    v = verifier(url_issuer(), clock=clock)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)
            assert handler.calls == 1
            for _ in range(5):
                assert refused(v, token(RSA_KEY_2, kid="r2")).code == "unknown_key"
                await v.wait_refreshes()
            assert handler.calls == 2  # one refresh, not five
            clock.now += 59
            refused(v, token(RSA_KEY_2, kid="r2"))
            await v.wait_refreshes()
            assert handler.calls == 2
            clock.now += 2
            handler.document = jwks_doc(jwk(RSA_KEY, "r1"), jwk(RSA_KEY_2, "r2"))
            refused(v, token(RSA_KEY_2, kid="r2"))
            await v.wait_refreshes()
            assert handler.calls == 3
            assert v.verify(token(RSA_KEY_2, kid="r2")).subject == "alice"
            # A known kid with a bad signature is a bad signature, and fetches nothing.
            clock.now += 120
            assert refused(v, token(RSA_KEY, kid="r2")).code == "invalid_signature"
            await v.wait_refreshes()
            assert handler.calls == 3

    asyncio.run(main())


def test_unknown_kid_outside_an_event_loop_schedules_nothing() -> None:
    handler = JWKSHandler(jwks_doc(jwk(RSA_KEY, "r1")))
    v = verifier(url_issuer())

    async def load() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)

    asyncio.run(load())
    assert refused(v, token(RSA_KEY_2, kid="r2")).code == "unknown_key"
    assert handler.calls == 1


def test_kid_unknown_to_jwks_falls_back_on_pem_keys() -> None:
    handler = JWKSHandler(jwks_doc(jwk(RSA_KEY, "r1")))
    v = verifier(url_issuer(public_keys=[pem(RSA_KEY_2)]))

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)
            assert v.verify(token(RSA_KEY_2, kid="whatever")).subject == "alice"
            assert v.verify(token(RSA_KEY, kid="r1")).subject == "alice"
            await v.wait_refreshes()
            assert handler.calls == 1  # the token verified: nothing to look up

    asyncio.run(main())


@pytest.mark.parametrize(
    "failure",
    [
        lambda h: setattr(h, "status", 500),
        lambda h: setattr(h, "status", 302),  # redirects are not followed
        lambda h: setattr(h, "document", b"<html>"),
        lambda h: setattr(h, "document", b'{"keys": "none"}'),
        lambda h: setattr(h, "document", jwks_doc(jwk(RSA_KEY, "enc", use="enc"))),
        lambda h: setattr(h, "document", b"{" + b" " * jwks.MAX_JWKS_BYTES + b"}"),
    ],
)
def test_failing_jwks_url_keeps_previous_keys(
    failure: Callable[[JWKSHandler], None], caplog: pytest.LogCaptureFixture
) -> None:
    handler = JWKSHandler(jwks_doc(jwk(RSA_KEY, "r1")))
    v = verifier(url_issuer())
    tok = token(RSA_KEY, kid="r1")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)
            failure(handler)
            with caplog.at_level(logging.WARNING, logger="gateway.jwt"):
                await v.load(client)  # a reload: logs, keeps, does not raise

    asyncio.run(main())
    assert v.verify(tok).subject == "alice"
    assert any("keeping 1 previous key" in r.getMessage() for r in caplog.records)


def test_no_keys_at_start_raises() -> None:
    handler = JWKSHandler(b"")
    handler.status = 503

    async def main(v: JWTVerifier) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await v.load(client)

    with pytest.raises(KeyLoadError, match=r"idp\.example"):
        asyncio.run(main(verifier(url_issuer())))
    # With a configured PEM key besides, the issuer still has a key: no error.
    asyncio.run(main(verifier(url_issuer(public_keys=[pem(RSA_KEY)]))))


def test_missing_jwks_file_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError):
        asyncio.run(verifier(issuer(jwks_file=str(tmp_path / "absent.json"))).load())


def test_jwks_keys_that_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private = RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True) | {"kid": "private"}
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = jwks_doc(
        jwk(RSA_KEY, "good", alg="RS256"),
        jwk(RSA_KEY_2, "enc", use="enc"),
        {"kty": "oct", "k": b64(SECRET.encode()).decode(), "kid": "hmac"},
        private,
        jwk(RSA_KEY_2, "ps", alg="PS256"),  # not in this issuer's allowlist
        jwk(short, "short"),
        jwk(EC_KEY_384, "p384"),  # fits neither RS256 nor ES256
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        jwk(RSA_KEY_2, kid=None) | {"kid": 5},
        "not an object",
    )
    path = tmp_path / "jwks.json"
    path.write_bytes(document)
    v = verifier(issuer("RS256", algorithms=["RS256", "ES256"], jwks_file=str(path)))
    with caplog.at_level(logging.WARNING, logger="gateway.jwt"):
        asyncio.run(v.load())
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 10
    assert v.verify(token(RSA_KEY, kid="good")).subject == "alice"
    assert refused(v, token(RSA_KEY_2, kid="enc")).code == "unknown_key"
    assert refused(v, token(RSA_KEY, kid="private")).code == "unknown_key"
    # The symmetric JWK never became an HMAC key.
    assert refused(v, token(SECRET, "HS256", kid="hmac")).code == "algorithm_not_allowed"


def test_jwks_alg_binds_the_key() -> None:
    keys = jwks.parse_jwks(jwks_doc(jwk(RSA_KEY, "r", alg="PS256")), ["RS256", "PS256"], "test")
    assert [(k.kid, k.alg) for k in keys] == [("r", "PS256")]
    keys = jwks.parse_jwks(jwks_doc(jwk(RSA_KEY, "r")), ["RS256", "PS256"], "test")
    assert [(k.kid, k.alg) for k in keys] == [("r", "RS256"), ("r", "PS256")]


def test_jwks_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(b" " * (jwks.MAX_JWKS_BYTES + 1))
    with pytest.raises(ValueError, match="larger"):
        asyncio.run(jwks.read_jwks_file(str(path)))


def test_unchanged_jwks_keeps_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_doc(jwk(RSA_KEY, "r1")))
    v = verifier(issuer(jwks_file=str(path)))
    asyncio.run(v.load())
    first = v.verify(token(RSA_KEY, kid="r1"))
    asyncio.run(v.load())
    assert v.verify(token(RSA_KEY, kid="r1")) is first


# -- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"exp": NOW - 29.9}, True),
        ({"exp": NOW - 30}, False),
        ({"nbf": NOW + 30}, True),
        ({"nbf": NOW + 30.1}, False),
        ({"exp": NOW}, True),
    ],
)
def test_leeway_boundaries(claims: dict[str, Any], ok: bool) -> None:
    v = verifier()
    tok = token(RSA_KEY, **claims)
    if ok:
        assert v.verify(tok).subject == "alice"
    else:
        refused(v, tok)


def test_zero_leeway() -> None:
    v = verifier(issuer(leeway_s=0))
    refused(v, token(RSA_KEY, exp=NOW))
    assert v.verify(token(RSA_KEY, exp=NOW + 0.001)).subject == "alice"


def test_token_without_exp() -> None:
    clock = Clock()
    v = verifier(clock=clock)
    tok = token(RSA_KEY, drop=("exp",))
    assert v.verify(tok).expires_at is None
    clock.now += 10 * 365 * 86400
    assert v.verify(tok).subject == "alice"


# -- cache --------------------------------------------------------------------------------


def test_cache_hit_returns_same_identity_until_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    v = verifier(clock=clock)
    tok = token(RSA_KEY, exp=NOW + 60)
    first = v.verify(tok)
    calls: list[Any] = []

    def spy(*args: Any) -> bool:
        calls.append(args)
        return True

    monkeypatch.setattr(jwks.ALGORITHMS["RS256"], "verify", spy)
    assert v.verify(tok) is first
    clock.now = NOW + 60 + 29
    assert v.verify(tok) is first
    assert not calls  # served from the cache: no signature check
    clock.now = NOW + 60 + 30
    err = refused(v, tok)
    assert err.code == "token_expired" and "expired" in err.message


def test_failures_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    v = verifier()
    tok = token(RSA_KEY_2)
    refused(v, tok)
    calls: list[Any] = []
    real = jwks.ALGORITHMS["RS256"].verify

    def spy(*args: Any) -> bool:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(jwks.ALGORITHMS["RS256"], "verify", spy)
    refused(v, tok)
    assert len(calls) == 1


def test_cache_is_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    v = verifier(cache_size=2)
    a, b, c = (token(RSA_KEY, sub=s) for s in "abc")
    first_a = v.verify(a)
    v.verify(b)
    assert v.verify(a) is first_a  # a is now the most recent
    v.verify(c)  # evicts b
    assert v.verify(a) is first_a
    assert len(v._cache) == 2
    assert v.verify(b) == TokenIdentity(ISS, "b", ("*",), NOW + 600)


def test_cache_keeps_no_token() -> None:
    v = verifier()
    tok = token(RSA_KEY)
    v.verify(tok)
    assert all(len(k) == 16 and k not in tok for k in v._cache)


def test_cache_disabled() -> None:
    v = verifier(cache_size=0)
    tok = token(RSA_KEY)
    assert v.verify(tok) == v.verify(tok)
    assert not v._cache


# -- models and tiers ---------------------------------------------------------------------


def test_models_and_tiers() -> None:
    v = verifier(
        issuer(
            "HS256",
            models=["gpt-*", "claude-3-haiku"],
            tier_claim="tier",
            tiers={"free": ["gpt-4o-mini", "claude-*"], "pro": ["*"]},
            models_claim="models",
        )
    )

    def models(**claims: Any) -> tuple[str, ...]:
        return v.verify(token(SECRET, "HS256", **claims)).models

    assert models(tier="pro", models=["*"]) == ("gpt-*", "claude-3-haiku")
    assert models(tier="free", models=["*"]) == ("gpt-4o-mini", "claude-3-haiku")
    assert models(tier="pro", models=["gpt-4*", "mistral-large"]) == ("gpt-4*",)
    assert models(tier="free", models="gpt-4o-mini claude-3-haiku") == ("gpt-4o-mini", "claude-3-haiku")
    assert models(tier="free", models=[]) == ()
    for claims in ({"tier": "gold", "models": ["*"]}, {"models": ["*"]}, {"tier": 1, "models": ["*"]}):
        err = refused(v, token(SECRET, "HS256", **claims))
        assert err.code == "invalid_token" and "'tier'" in err.message
    for bad in ({"tier": "pro"}, {"tier": "pro", "models": [1]}, {"tier": "pro", "models": {"a": 1}}):
        err = refused(v, token(SECRET, "HS256", **bad))
        assert err.code == "invalid_token" and "'models'" in err.message


def test_issuer_models_only() -> None:
    v = verifier(issuer(models=["gpt-4o", "emb-*"]))
    assert v.verify(token(RSA_KEY)).models == ("gpt-4o", "emb-*")


@pytest.mark.parametrize(
    ("a", "b", "both"),
    [
        (["*"], ["gpt-4o"], ("gpt-4o",)),
        (["gpt-*"], ["gpt-4o", "claude"], ("gpt-4o",)),
        (["gpt-*"], ["gpt-4*"], ("gpt-4*",)),
        (["gpt-4*"], ["gpt-*"], ("gpt-4*",)),
        (["gpt-?o"], ["gpt-4o", "gpt-40x"], ("gpt-4o",)),
        (["gpt-*"], ["*-mini"], ()),  # overlapping, but not provably: dropped
        (["gpt-[45]*"], ["gpt-*"], ("gpt-[45]*",)),
        (["g[p]t-*"], ["gpt-4*"], ()),  # unsure: dropped
        (["gpt-4o", "gpt-4o"], ["*"], ("gpt-4o",)),
    ],
)
def test_intersect_is_conservative(a: list[str], b: list[str], both: tuple[str, ...]) -> None:
    assert intersect(tuple(a), tuple(b)) == both


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algorithms": ["HS256"]}, "secret: HS* algorithms need a shared secret"),
        (
            {"algorithms": ["HS256"], "secret": "x" * 31},
            "secret: shorter than 32 bytes (the minimum for HS256)",
        ),
        (
            {"algorithms": ["HS256", "HS512"], "secret": "x" * 63},
            "secret: shorter than 64 bytes (the minimum for HS512)",
        ),
        ({"algorithms": ["HS256"], "secret": pem(RSA_KEY)}, "secret: looks like a public key"),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, "cannot share an issuer"),
        ({"algorithms": ["RS256", "HS512"], "public_keys": [pem(RSA_KEY)]}, "cannot share an issuer"),
        ({"algorithms": ["none"]}, "'none' is never allowed"),
        ({"algorithms": ["RS256", "None"], "public_keys": [pem(RSA_KEY)]}, "'none' is never allowed"),
        ({"algorithms": ["RS1"]}, "unknown algorithm 'RS1'"),
        ({"algorithms": ["EdDSA"]}, "unknown algorithm 'EdDSA'"),
        ({"algorithms": []}, "at least one algorithm"),
        ({"algorithms": ["RS256"]}, "needs public_keys, jwks_url or jwks_file"),
        ({"algorithms": ["RS256"], "public_keys": ["garbage"]}, "public_keys[0]: not a PEM public key"),
        ({"algorithms": ["RS256"], "public_keys": [pem(EC_KEY)]}, "public_keys[0]: fits none of RS256"),
        ({"algorithms": ["ES256"], "public_keys": [pem(EC_KEY_384)]}, "fits none of ES256"),
        (
            {
                "algorithms": ["RS256"],
                "public_keys": [pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))],
            },
            "RSA shorter than 2048 bits",
        ),
        ({"algorithms": ["RS256"], "public_keys": [pem(RSA_KEY)], "secret": SECRET}, "secret: only for HS*"),
        ({"algorithms": ["HS256"], "secret": SECRET, "jwks_file": "k.json"}, "not used by HS* algorithms"),
        (
            {"algorithms": ["RS256"], "jwks_url": "http://idp.example/jwks"},
            "jwks_url: must be an https:// URL",
        ),
        ({"algorithms": ["RS256"], "jwks_url": "ftp://127.0.0.1/jwks"}, "jwks_url: must be an https:// URL"),
        ({"algorithms": ["RS256"], "jwks_url": "https:///jwks"}, "jwks_url: must be an https:// URL"),
        ({"algorithms": ["RS256"], "jwks_url": "http://10.0.0.1/jwks"}, "jwks_url: must be an https:// URL"),
        ({"issuer": ""}, "issuer: must not be empty"),
        ({"audience": ""}, "audience: must name at least one"),
        ({"audience": []}, "audience: must name at least one"),
        ({"subject_claim": ""}, "subject_claim: must not be empty"),
        ({"tier_claim": "tier"}, "tiers: tier_claim is set but no tiers"),
        ({"tiers": {"free": ["x"]}}, "tier_claim: tiers are configured but no claim"),
        ({"leeway_s": 3600}, "Expected `float` <= 300"),
        ({"secrte": SECRET}, "Object contains unknown field `secrte`"),
    ],
)
def test_config_validation(options: dict[str, Any], message: str) -> None:
    raw = {"issuer": ISS, "audience": AUD, "algorithms": ["HS256"], "secret": SECRET} | options
    if "algorithms" in options and "secret" not in options:
        raw.pop("secret")
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"jwt": [raw]}, dict[str, list[JWTIssuer]])
    assert message in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example/.well-known/jwks.json",
        "http://127.0.0.1:8081/jwks",
        "http://localhost/jwks",
        "http://[::1]/jwks",
    ],
)
def test_jwks_url_allowed(url: str) -> None:
    assert JWTIssuer(issuer=ISS, audience=AUD, algorithms=["RS256"], jwks_url=url).jwks_url == url


def test_duplicate_issuer_refused() -> None:
    with pytest.raises(ValueError, match="configured twice"):
        JWTVerifier([issuer(), issuer("ES256")])


def test_looks_like_jwt() -> None:
    assert JWTVerifier.looks_like_jwt(token(RSA_KEY))
    assert JWTVerifier.looks_like_jwt(token(SECRET, "HS256"))
    for key in (b"sk-team-a-0123456789", b"eyJhbGci", b"eyJ.a.b.c", b"abc.def.ghi", b""):
        assert not JWTVerifier.looks_like_jwt(key)
