"""The config file: YAML -> `${VAR}` substitution -> frozen msgspec structs -> cross-checks.

Every problem is reported as `path: reason` (`models[2].deployments[0].provider:
unknown provider 'oai2'`), and no message ever carries a secret's value.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from gateway.auth.jwt import JWTIssuer
from gateway.providers import KINDS, AnyProvider, ProviderConfig
from gateway.routing.breaker import BreakerSettings
from gateway.telemetry.settings import MetricsSettings

log = logging.getLogger("gateway.config")

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
MIN_KEY_CHARS = 16


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(Struct):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: PositiveInt = 1_048_576
    # The request head (nginx's defaults): one line (request line or header) and the whole head; else 431.
    max_header_line_bytes: PositiveInt = 8192
    max_head_bytes: PositiveInt = 32768
    access_log: bool = True  # one JSON line per request on the gateway.access logger


class OutagePolicy(Struct):
    """While the store is unreachable: serve anyway (open) or answer 503 (closed), per concern.

    Auth has no setting: it needs no store call per request (every replica holds the keys).
    """

    limits: Literal["open", "closed"] = "open"  # open: each replica counts on its own
    cache: Literal["open", "closed"] = "open"  # open: answers go uncached
    # Keys with a budget. closed: 503 (spend unchecked is money); open: each replica counts spend
    # against what the store last said, and writes it to the store when it answers again.
    budgets: Literal["open", "closed"] = "closed"


class AdminWrites(Struct):
    """How admin key writes (create, update, rotate, revoke) are confirmed before they are answered:
    on this many replicas of the store's primary (WAIT), so a failover cannot undo them."""

    # "all": every replica connected to the primary at the write (none on a lone node: no wait).
    replicas: Annotated[int, msgspec.Meta(ge=0)] | Literal["all"] = "all"
    aof: bool = False  # WAITAOF: fsynced to the AOF of the primary and those replicas (Redis >= 7.2)
    timeout_ms: PositiveInt = 1000  # the wait's bound; short of it the admin call answers 503


class StoreConfig(Struct):
    url: str = "memory://"
    timeout_s: PositiveFloat = 1.0
    max_connections: PositiveInt = 50
    outage: OutagePolicy = OutagePolicy()
    admin_writes: AdminWrites = AdminWrites()


class Limits(Struct, omit_defaults=True):
    """A key's limits (also per model for a key, and a deployment's quota); unset: unlimited."""

    rpm: PositiveInt | None = None  # requests per minute, sliding
    tpm: PositiveInt | None = None  # prompt + completion tokens per minute, sliding
    rpd: PositiveInt | None = None  # requests per day, sliding
    concurrency: PositiveInt | None = None  # requests and streams in flight (keys only)
    budget_usd: Annotated[float, msgspec.Meta(gt=0)] | None = None  # spend per budget_period, from prices
    budget_period: Literal["day", "month"] = "month"  # UTC calendar day or month

    def __bool__(self) -> bool:
        return any((self.rpm, self.tpm, self.rpd, self.concurrency, self.budget_usd))


class KeyConfig(Struct):
    name: str
    key: str
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}  # alias -> limits of this key on that model, beside `limits`


class AuthConfig(Struct):
    admin_key: str = ""
    # Keys are stored as HMAC-SHA256 under this secret; replicas sharing a store must share it.
    hash_secret: str = ""
    keys: list[KeyConfig] = []
    jwt: list[JWTIssuer] = []  # bearer tokens from these issuers are accepted beside API keys


class Deployment(Struct):
    provider: str
    model: str
    weight: PositiveFloat = 1.0  # for the `weighted` strategy
    limits: Limits = Limits()
    params: dict[str, Any] = {}  # provider-specific, e.g. cohere's input_type


class Price(Struct):
    """USD per million tokens: the usage report's cost and the budgets' currency."""

    input_per_mtok: Annotated[float, msgspec.Meta(ge=0)] = 0
    output_per_mtok: Annotated[float, msgspec.Meta(ge=0)] = 0


class ModelConfig(Struct):
    name: str
    deployments: Annotated[list[Deployment], msgspec.Meta(min_length=1)]
    price: Price = Price()
    strategy: Literal["priority", "weighted", "least_inflight", "lowest_latency"] = "priority"
    fallbacks: list[str] = []  # aliases tried, in order, after this one's deployments
    completion_estimate: PositiveInt = 256  # tokens reserved on admission when a request sets no max_tokens
    retries: Annotated[int, msgspec.Meta(ge=0)] | None = None  # router.retries for this alias
    failover: bool | None = None  # router.failover for this alias


class CacheConfig(Struct):
    enabled: bool = False
    ttl_s: PositiveFloat = 300
    max_ttl_s: PositiveFloat = 86400  # the most a request's x-gateway-cache-ttl may ask for
    mode: Literal["deterministic", "always"] = "deterministic"  # deterministic: temperature 0 only
    shared: bool = False  # one cache for every key, instead of one per key
    max_entry_bytes: PositiveInt = 1_048_576
    coalesce: bool = True  # identical requests in flight together make one upstream call
    coalesce_wait_s: PositiveFloat = 30  # a follower's longest wait for the leader's answer to start
    coalesce_lease_s: PositiveFloat = 5  # a silent leader is presumed dead after this long


class Timeouts(Struct):
    connect_s: PositiveFloat = 5
    first_byte_s: PositiveFloat = 60
    idle_s: PositiveFloat = 60
    total_s: PositiveFloat = 600


class RouterConfig(Struct):
    retries: Annotated[int, msgspec.Meta(ge=0)] = 1  # extra attempts on the *same* deployment
    failover: bool = True  # a failed deployment passes the request to the plan's next one
    backoff_s: PositiveFloat = 0.1  # first retry of the same deployment waits up to this (full jitter)...
    backoff_max_s: PositiveFloat = 2.0  # ...doubling per attempt, capped here
    headers: bool = True  # x-gateway-deployment and x-gateway-attempts on answers
    # A stream silent this long (waiting for its first token, or in a gap) gets a `: keep-alive`
    # comment, so proxies with read timeouts keep it; 0: never.
    heartbeat_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    probe_interval_s: PositiveFloat | None = None  # active probes of open breakers (off when unset)
    timeouts: Timeouts = Timeouts()


class CorsConfig(Struct):
    """Browser clients: off unless `allow_origins` lists some (Starlette's CORSMiddleware)."""

    allow_origins: list[str] = []
    allow_methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allow_headers: list[str] = msgspec.field(
        default_factory=lambda: ["authorization", "content-type", "x-api-key", "x-request-id"]
    )
    expose_headers: list[str] = msgspec.field(
        default_factory=lambda: ["x-request-id", "x-gateway-overhead-ms"]
    )
    allow_credentials: bool = False
    max_age_s: Annotated[int, msgspec.Meta(ge=0)] = 600


class TracingConfig(Struct):
    """`telemetry.tracing`: OpenTelemetry traces over OTLP (gateway/telemetry/tracing.py)."""

    enabled: bool = False  # also on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set
    endpoint: str = ""  # "": OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else the SDK's default
    protocol: Literal["", "http/protobuf", "grpc"] = ""  # "": OTEL_EXPORTER_OTLP_PROTOCOL, else http
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # None: OTEL_TRACES_SAMPLER
    service_name: str = ""  # "": OTEL_SERVICE_NAME, else "gateway"
    timeout_s: PositiveFloat = 10  # per export, on the exporter's own thread


class TelemetryConfig(Struct):
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingConfig = TracingConfig()


class Config(Struct):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    providers: dict[str, AnyProvider] = {}
    models: list[ModelConfig] = []
    cors: CorsConfig = CorsConfig()
    cache: CacheConfig = CacheConfig()
    breaker: BreakerSettings = BreakerSettings()
    router: RouterConfig = RouterConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def secrets(self) -> list[str]:
        """Every secret value in this config, for the log masker."""
        values = [self.auth.admin_key, self.auth.hash_secret, *(k.key for k in self.auth.keys)]
        values += [issuer.secret for issuer in self.auth.jwt]
        values += [key for p in self.providers.values() for key in (p.api_key, *p.api_keys)]
        return [v for v in values if v]

    def enabled_providers(self) -> dict[str, ProviderConfig]:
        return {name: p for name, p in self.providers.items() if p.enabled}


class ConfigError(Exception):
    """One or more problems, each `path: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
# Set by the gateway itself (framing, routing, the provider credential): never from config.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "authorization", "api-key", "x-api-key"}
)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*) - at `\$\.?(?P<path>[^`]*)`$", re.S)


def _substitute(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        for k in node:
            if not isinstance(k, str):
                where = path or "(top level)"
                problems.append(
                    f"{where}: key {k!r} is not a string (quote it: YAML reads off/yes/no as booleans)"
                )
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    return _VAR.sub(value, node)


def _cross_check(config: Config) -> list[str]:
    problems = []
    if config.server.max_header_line_bytes > config.server.max_head_bytes:
        problems.append(
            "server.max_header_line_bytes: larger than server.max_head_bytes, which bounds every line too"
        )
    for name, provider in config.providers.items():
        if provider.api_key and provider.api_keys:
            problems.append(f"providers.{name}.api_keys: set beside api_key; give the keys in one of them")
        seen: dict[str, str] = {}
        for key, where in provider.credentials:
            if key != key.strip() or any(c in key for c in "\r\n\0"):
                problems.append(f"providers.{name}.{where}: spaces or line breaks around or in the key")
            elif key in seen:
                problems.append(f"providers.{name}.{where}: same key as {seen[key]}")
            seen.setdefault(key, where)
        if provider.url and not provider.url.startswith(("http://", "https://")):
            problems.append(f"providers.{name}.base_url: must start with http:// or https://")
        for header, value in provider.headers.items():
            if not _TOKEN(header) or header.lower() in _RESERVED_HEADERS:
                problems.append(f"providers.{name}.headers: '{header}' is not a header the config may set")
            elif "\r" in value or "\n" in value or "\0" in value:
                problems.append(f"providers.{name}.headers.{header}: line breaks are not allowed")
    aliases: set[str] = set()
    for i, model in enumerate(config.models):
        if model.name in aliases:
            problems.append(f"models[{i}].name: duplicate model '{model.name}'")
        aliases.add(model.name)
        for j, dep in enumerate(model.deployments):
            if dep.provider not in config.providers:
                problems.append(f"models[{i}].deployments[{j}].provider: unknown provider '{dep.provider}'")
            if dep.limits.concurrency:
                problems.append(f"models[{i}].deployments[{j}].limits.concurrency: a key limit only")
    for i, model in enumerate(config.models):
        for j, fallback in enumerate(model.fallbacks):
            if fallback == model.name:
                problems.append(f"models[{i}].fallbacks[{j}]: a model cannot fall back to itself")
            elif fallback not in aliases:
                problems.append(f"models[{i}].fallbacks[{j}]: unknown model '{fallback}'")
    names: set[str] = set()
    secrets: set[str] = set()
    for i, key in enumerate(config.auth.keys):
        path = f"auth.keys[{i}]"
        if key.name in names:
            problems.append(f"{path}.name: duplicate key name '{key.name}'")
        names.add(key.name)
        if len(key.key) < MIN_KEY_CHARS:
            problems.append(f"{path}.key: shorter than {MIN_KEY_CHARS} characters")
        elif key.key in secrets:
            problems.append(f"{path}.key: same key as another entry")
        secrets.add(key.key)
        for alias, limits in key.model_limits.items():
            if alias not in aliases:
                problems.append(f"{path}.model_limits.{alias}: unknown model '{alias}'")
            elif limits.concurrency:
                problems.append(f"{path}.model_limits.{alias}.concurrency: set it in the key's limits")
    if config.telemetry.metrics.auth == "admin" and not config.auth.admin_key:
        problems.append("telemetry.metrics.auth: 'admin' needs auth.admin_key")
    if config.auth.admin_key and len(config.auth.admin_key) < MIN_KEY_CHARS:
        problems.append(f"auth.admin_key: shorter than {MIN_KEY_CHARS} characters")
    if config.auth.hash_secret and len(config.auth.hash_secret) < 32:
        problems.append("auth.hash_secret: shorter than 32 characters")
    issuers: set[str] = set()
    for i, issuer in enumerate(config.auth.jwt):
        if issuer.issuer in issuers:
            problems.append(f"auth.jwt[{i}].issuer: duplicate issuer '{issuer.issuer}'")
        issuers.add(issuer.issuer)
    if "*" in config.cors.allow_origins and config.cors.allow_credentials:
        problems.append("cors.allow_origins: '*' cannot be used with allow_credentials; list the origins")
    shared = not config.store.url.startswith("memory://")
    if shared and config.auth.admin_key and not config.auth.hash_secret:
        problems.append(
            "auth.hash_secret: required with a shared store and the admin API "
            "(every replica must derive the same key digests)"
        )
    return problems


def _convert(raw: Any, kind: Any, prefix: str) -> tuple[Any, list[str]]:
    try:
        return msgspec.convert(raw, kind, strict=False), []
    except msgspec.ValidationError as exc:
        m = _MSGSPEC_PATH.match(str(exc))
        if m is None:
            return None, [f"{prefix or '(top level)'}: {exc}"]
        path = ".".join(p for p in (prefix, m["path"]) if p).replace(".[", "[")
        return None, [f"{path or '(top level)'}: {m['msg']}"]


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    """Decode config text; raises ConfigError listing every problem found."""
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "file"
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of sections"])
    problems: list[str] = []
    raw = _substitute(raw, "", dict(os.environ if env is None else env), problems)
    providers = raw.get("providers")
    for name, provider in providers.items() if isinstance(providers, dict) else ():
        # Checked one by one: msgspec names a dict entry `[...]`, and the operator needs its name.
        kind = provider.get("type") if isinstance(provider, dict) else None
        if kind is not None and kind not in KINDS:
            problems.append(
                f"providers.{name}.type: unknown provider type '{kind}' (one of: {', '.join(KINDS)})"
            )
        else:
            problems += _convert(provider, AnyProvider, f"providers.{name}")[1]
    if problems:
        raise ConfigError(problems)
    config, problems = _convert(raw, Config, "")
    if problems:
        raise ConfigError(problems)
    problems = _cross_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def load(path: str | Path, *, warn: bool = True) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read ({exc.__class__.__name__})"]) from None
    config = parse(text)
    if not warn:
        return config
    mode = path.stat().st_mode
    # Only what is written outright counts: a `${VAR:-default}` is a placeholder the operator overrides.
    bare = _VAR.sub("", text)
    literal = [s for s in config.secrets() if s in bare]
    if literal and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "config %s holds secrets and is readable by group or others; chmod 600 it or use ${VAR}", path
        )
    for name, provider in config.providers.items():
        if not provider.enabled:
            log.warning("provider %s is disabled: its api_key/api_keys (or base_url) is empty", name)
        elif len(provider.credentials) < len(provider.api_keys):
            empty = [f"api_keys[{i}]" for i, key in enumerate(provider.api_keys) if not key]
            log.warning("provider %s: %s empty, left out", name, ", ".join(empty))
    return config
