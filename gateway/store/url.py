"""Store URLs: parsing, masking, and the TLS context they ask for.

Forms (ACL username + password everywhere, as `user:pass@`):

    redis://[user:pass@]host[:6379][/db]           rediss://… (TLS)
    unix://[user:pass@]/path/to/redis.sock[?db=N]
    redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]   rediss+sentinel://… (TLS)
    redis+cluster://[user:pass@]host:port[,host:port…]   (seed nodes; the rest is discovered)

Query parameters: `db` (not on a cluster), `password`; for TLS `ssl_ca` (a PEM bundle trusted instead of
the system store), `ssl_cert` and `ssl_key` (a client certificate); for Sentinel
`sentinel_username` and `sentinel_password` (the sentinels' own ACL, when they have one;
`user:pass@` is for the data nodes). An unknown parameter is an error, so a typo fails at start.

Without `ssl_ca`, TLS trusts the system store, which honours `SSL_CERT_FILE` and
`SSL_CERT_DIR`. The certificate is always verified and its name checked against the
host (SNI is the host too): a server that cannot prove itself fails, never falls back to plain.

Every error here names the problem, never the URL: it may hold a password.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

_SCHEMES: dict[str, tuple[Literal["redis", "unix", "sentinel", "cluster"], bool]] = {
    "redis": ("redis", False),
    "rediss": ("redis", True),
    "unix": ("unix", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
}
_QUERY = frozenset(
    {"db", "password", "ssl_ca", "ssl_cert", "ssl_key", "sentinel_username", "sentinel_password"}
)
_TLS_QUERY = frozenset({"ssl_ca", "ssl_cert", "ssl_key"})
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class StoreURL:
    """A parsed Redis store URL: where the nodes are and how to authenticate to them."""

    kind: Literal["redis", "unix", "sentinel", "cluster"]
    tls: bool
    hosts: tuple[tuple[str, int], ...]  # the node (redis), or the sentinels
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    service: str | None = None  # the primary's name at the sentinels
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """What to mask in messages."""
        return tuple(secret for secret in (self.password, self.sentinel_password) if secret)


def url_secrets(url: str) -> tuple[str, ...]:
    """The passwords in `url` (userinfo or query), raw and percent-decoded, even if it does not parse."""
    try:
        parts = urlsplit(url)
        found = [
            value
            for name in ("password", "sentinel_password")
            for value in parse_qs(parts.query).get(name, [])
        ]
        netloc = parts.netloc
    except ValueError:
        return ()
    userinfo, at, _ = netloc.rpartition("@")
    if at:
        found.append(userinfo.partition(":")[2])
    return tuple({variant for secret in found for variant in (secret, unquote(secret)) if variant})


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def mask(url: str) -> str:
    """`url` with its passwords replaced by ***, fit for a log line."""
    return redact(url, url_secrets(url))


def parse(url: str) -> StoreURL:
    """Parse a Redis store URL (the forms above); ValueError names what is wrong."""
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in _SCHEMES:
        raise ValueError("unsupported redis URL scheme")
    kind, tls = _SCHEMES[scheme.lower()]
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("malformed redis URL") from None
    netloc, path, query = parts.netloc, parts.path, parts.query
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    params = _query(query)
    if "password" in params:
        password = params["password"]
    db = _int(params.get("db", "0"), "db")
    options = {name: params.get(name) for name in _TLS_QUERY}
    if not tls and any(options.values()):
        raise ValueError("ssl_ca, ssl_cert and ssl_key need a TLS scheme (rediss://, rediss+sentinel://)")
    if options["ssl_key"] and not options["ssl_cert"]:
        raise ValueError("ssl_key needs ssl_cert")
    common = {
        "tls": tls,
        "username": username,
        "password": password,
        "sentinel_username": params.get("sentinel_username"),
        "sentinel_password": params.get("sentinel_password"),
        **options,
    }
    if kind == "unix":
        if not path or path == "/":
            raise ValueError("unix:// URL without a socket path")
        return StoreURL("unix", hosts=(), path=unquote(path), db=db, **common)  # type: ignore[arg-type]
    hosts = tuple(
        _address(item, DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT)
        for item in hostlist.split(",")
    )
    segments = [unquote(segment) for segment in path.split("/")[1:] if segment]
    if kind == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError("redis+sentinel:// URL needs /service_name[/db] after the sentinels")
        if len(segments) == 2:
            db = _int(segments[1], "db")
        return StoreURL("sentinel", hosts=hosts, service=segments[0], db=db, **common)  # type: ignore[arg-type]
    if kind == "cluster":
        if segments or db:
            raise ValueError("redis+cluster:// URL takes no database: a cluster has database 0 only")
        return StoreURL("cluster", hosts=hosts, **common)  # type: ignore[arg-type]
    if len(hosts) != 1:
        raise ValueError("redis:// URL takes one host (several are for redis+sentinel:// or redis+cluster://)")
    if len(segments) > 1:
        raise ValueError("redis:// URL path must be /db")
    if segments:
        db = _int(segments[0], "db")
    return StoreURL("redis", hosts=hosts, db=db, **common)  # type: ignore[arg-type]


def _query(query: str) -> dict[str, str]:
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    if not set(params) <= _QUERY:
        # Not repeated back: a mangled URL might make a parameter of a password.
        raise ValueError(f"unknown redis URL parameter (known: {', '.join(sorted(_QUERY))})")
    return {name: values[-1] for name, values in params.items()}


def _address(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:6379
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError("redis URL without a host")
    return host, _int(port, "port") if port else default_port


def _int(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"redis URL {what} is not a number")
    return int(text)


def ssl_context(url: StoreURL) -> ssl.SSLContext:
    """The verifying client context for a TLS URL (hostname checked; see the module docstring).

    A file that cannot be read is a ValueError naming the option, so a bad config fails at start.
    """
    try:
        context = (
            ssl.create_default_context(cafile=url.ssl_ca) if url.ssl_ca else ssl.create_default_context()
        )
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"redis URL ssl_ca: cannot load {url.ssl_ca}: {exc}") from None
    if url.ssl_cert:
        try:
            context.load_cert_chain(url.ssl_cert, url.ssl_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"redis URL ssl_cert/ssl_key: cannot load the client certificate: {exc}"
            ) from None
    return context
