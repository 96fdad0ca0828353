"""Azure OpenAI: OpenAI's wire format behind deployment URLs, an `api-key` header and an api-version.

A request for deployment `D` goes to
`{base_url}/openai/deployments/D/{operation}?api-version={api_version}` with the
key in `api-key`. The body is OpenAI's, sent as the client wrote it with `model`
set to the deployment name: Azure routes on the URL and ignores the field, and it
is what the official `AzureOpenAI` client sends too, so no work is spent removing it.
Azure's one request extension with reach, "On Your Data" (`data_sources`), names
search indexes and credentials, the resource's managed identity among them, for
Azure to read from: a client could aim the resource's identity at any index it can
read. So it is refused unless the provider entry opts in (`allow_data_sources`), and
only api-versions from 2024-02-01 take it (earlier previews spelled it `dataSources`,
on another path; always refused). Its answers are relayed as they come, the message's
`context` (citations, intent) included; streamed, that context rides in the first
chunk, whose `object` ("extensions.chat.completion.chunk") the filter below keeps.

Answers are relayed as bytes. Azure adds `prompt_filter_results` and per-choice
`content_filter_results` fields, which OpenAI clients ignore, so JSON answers and
ordinary stream chunks are not touched. A stream also carries events OpenAI never
sends: the prompt-filter event first (`choices: []`, `"object": ""`) and, with the
asynchronous filter, annotation events whose choices have no `delta`. Client code
written for OpenAI (`chunk.choices[0].delta.content`) breaks on those, and the
official SDK's own stream helpers skip them by the same test (`object` is not a
chunk), so `AzureStreamFilter` drops them; it looks for the marker in the bytes and
never decodes a chunk. As for OpenAI, a stream is asked for its usage event (from
api-version 2024-08-01-preview, which introduced `stream_options`), which the filter
also drops when the client did not ask for it. Errors, which Azure words in several
shapes, are rewritten into OpenAI's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar
from urllib.parse import quote

import msgspec
import orjson

from gateway.errors import InvalidRequest
from gateway.providers.base import (
    USAGE_EVENT,
    Adapter,
    Capability,
    OpenAIWireConfig,
    Operation,
    ProviderConfig,
    StreamTranslator,
    Target,
    UsageFilter,
)
from gateway.providers.openai import OpenAIAdapter

# The newest GA data-plane version of the deployment-based API (inference spec "stable/2024-10-21").
DEFAULT_API_VERSION = "2024-10-21"
ApiVersion = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}(-preview)?$")]
# The first api-version that accepts `stream_options`; older ones refuse the field.
STREAM_OPTIONS_VERSION = "2024-08-01-preview"
# The first api-version with On Your Data's `data_sources` on the chat completions path (GA).
DATA_SOURCES_VERSION = "2024-02-01"


class AzureOpenAIConfig(OpenAIWireConfig, frozen=True, tag="azure_openai"):
    """`base_url` is the resource endpoint, `https://NAME.openai.azure.com`: required, no default.

    A deployment's `model` is the Azure deployment name. Deployments that need
    another api-version (newer models often do) go on a second provider entry.
    """

    api_version: ApiVersion = DEFAULT_API_VERSION
    # Relay clients' On Your Data `data_sources`: they choose the index (and may name the
    # resource's managed identity to read it), so only for clients trusted with that.
    allow_data_sources: bool = False

    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __post_init__(self) -> None:
        # The SDK's `base_url` style (…/openai or …/openai/deployments/D) would double the path.
        if "openai" in self.url.partition("://")[2].split("/")[1:]:
            raise ValueError(
                "base_url: give the resource endpoint (https://NAME.openai.azure.com), "
                "without /openai or a deployment path"
            )
        # ISO dates compare as strings.
        if self.allow_data_sources and self.api_version < DATA_SOURCES_VERSION:
            raise ValueError(
                f"allow_data_sources: On Your Data's data_sources needs api_version {DATA_SOURCES_VERSION} "
                f"or later (this entry has {self.api_version})"
            )

    @property
    def asks_stream_usage(self) -> bool:
        if self.stream_usage is None:
            return self.api_version >= STREAM_OPTIONS_VERSION  # ISO dates compare as strings
        return self.stream_usage


class AzureOpenAIAdapter(OpenAIAdapter):
    config: AzureOpenAIConfig

    def __init__(self, name: str, config: ProviderConfig, base_path: str) -> None:
        super().__init__(name, config, base_path)
        assert isinstance(config, AzureOpenAIConfig)
        self._prefix = f"{base_path}/openai/deployments/".encode()
        self._suffixes = {op: f"/{op.value}?api-version={config.api_version}".encode() for op in Operation}
        self._deployments: dict[str, bytes] = {}

    def build_auth_headers(self, key: str) -> list[tuple[bytes, bytes]]:
        return [(b"api-key", key.encode())]

    def target(self, op: Operation, target: Target) -> bytes:
        deployment = self._deployments.get(target.model)
        if deployment is None:
            # Names come from config, never from the client; quoted so any name stays one segment.
            deployment = self._prefix + quote(target.model, safe="").encode()
            self._deployments[target.model] = deployment
        return deployment + self._suffixes[op]

    def probe_url(self) -> str:
        return f"{self.config.url}/openai/models?api-version={self.config.api_version}"

    def encode_body(self, op: Operation, body: dict[str, Any], target: Target) -> bytes:
        if "data_sources" in body and not self.config.allow_data_sources:
            raise InvalidRequest(
                f"Provider '{self.name}' (azure_openai) does not accept 'data_sources': Azure's On Your "
                "Data is not enabled for this provider.",
                param="data_sources",
            )
        if "dataSources" in body:
            raise InvalidRequest(
                f"Provider '{self.name}' (azure_openai) does not accept 'dataSources': that is the 2023 "
                "previews' spelling; On Your Data takes 'data_sources' where the provider enables it.",
                param="dataSources",
            )
        return super().encode_body(op, body, target)

    def stream_translator(self, op: Operation, body: dict[str, Any]) -> StreamTranslator | None:
        return AzureStreamFilter(strip_usage=self.adds_usage(op, body))

    def translate_error(self, status: int, raw: bytes) -> tuple[int, bytes | None]:
        return translate_error(self.name, status, raw)


# -- streams --------------------------------------------------------------------------------------

# Azure writes compact JSON; one regex pass (~0.5 µs on a 0.5 kB event, against ~0.35 µs for
# the compact needle alone and twice that for two needles) also covers a spaced serialiser.
_ANNOTATION = re.compile(rb'"object":\s*""')
_ANNOTATION_OR_USAGE = re.compile(_ANNOTATION.pattern + b"|" + USAGE_EVENT.pattern)


class AzureStreamFilter(UsageFilter):
    """Relays an Azure stream line by line, less the events whose `object` is empty (and, when
    `strip_usage`, the usage event; see `UsageFilter`).

    Only complete lines are passed on (a line split across reads waits for its end),
    and a read holding no marker is returned as it came, without copying.
    """

    __slots__ = ()

    after_usage = _ANNOTATION

    def __init__(self, *, strip_usage: bool = False) -> None:
        super().__init__(_ANNOTATION_OR_USAGE if strip_usage else _ANNOTATION, strip_usage=strip_usage)

    def dropped(self, line: bytes) -> bool:
        return _ANNOTATION.search(line) is not None or super().dropped(line)


# -- errors ---------------------------------------------------------------------------------------

# Azure's codes that have an OpenAI equivalent; a bare status number ("401") says nothing more.
_CODES = {
    "DeploymentNotFound": "model_not_found",
    "contentFilter": "content_filter",  # images (DALL-E) spell it so
    "429": "rate_limit_exceeded",
}
# The operator's problem rather than the client's (a wrong key, endpoint or deployment in config):
# the message names the provider so the client does not blame its own key or model name.
_CONFIG_FAULTS = frozenset({401, 403, 404})
_TYPES = {429: "rate_limit_exceeded"}  # as the gateway's own 429s; Azure sends no type


def translate_error(provider: str, status: int, raw: bytes) -> tuple[int, bytes | None]:
    """Azure's error answers as OpenAI's `{"error": {message, type, param, code}}`, status kept.

    Shapes seen: OpenAI's own (from the model backend; `type` may be null), Azure's
    `{"error": {"code", "message", "innererror"?}}` (429s, content filter, DeploymentNotFound),
    and the API-management layer's `{"statusCode", "message"}`; None for any other body.
    """
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    named = status in _CONFIG_FAULTS
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        code = error.get("code")
        param = error.get("param")
        kind = error.get("type")
        inner = error.get("innererror") or error.get("inner_error")
    elif isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        message, code, param, kind, inner = parsed["message"], None, None, None, None
    else:
        return status, None

    if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
        code = _CODES.get(str(code))
    elif isinstance(code, str):
        code = _CODES.get(code, code)
    else:
        code = None
    if isinstance(inner, dict):
        message += _filtered_categories(inner)
    if named:
        message = f"Upstream provider '{provider}' answered {status}: {message}"
    if not isinstance(kind, str) or not kind:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = param if isinstance(param, str) else None
    return status, orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def _filtered_categories(inner: dict[str, Any]) -> str:
    """The suffix " (filtered: violence high, jailbreak)" for a content-filter `innererror`, or ""."""
    results = inner.get("content_filter_result") or inner.get("content_filter_results")
    if not isinstance(results, dict):
        return ""
    hits = []
    for category, result in results.items():
        if isinstance(result, dict) and result.get("filtered") is True:
            severity = result.get("severity")
            hits.append(f"{category} {severity}" if isinstance(severity, str) else category)
    return f" (filtered: {', '.join(hits)})" if hits else ""


ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {AzureOpenAIConfig: AzureOpenAIAdapter}
