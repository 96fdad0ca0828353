"""OpenAI and the OpenAI-compatible family: same wire format, different hosts and capabilities.

Requests go out with the model name rewritten and the provider's key; responses
and streams are relayed byte for byte, but for one event: a stream is asked for its
usage (`stream_options.include_usage`, where the provider accepts it) so the gateway
can count it, and when the client did not ask, that final usage event is dropped.
The `"usage":null` the option adds to every other chunk is left in: the SDKs read a
null usage as they read a missing one, and removing it would rewrite every chunk.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from gateway.providers.base import (
    Adapter,
    Capability,
    OpenAIWireConfig,
    Operation,
    ProviderConfig,
    StreamTranslator,
    Target,
    UsageFilter,
    client_asks_usage,
)

C = Capability
ALL = frozenset(Capability)


class OpenAIConfig(OpenAIWireConfig, frozen=True, tag="openai"):
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = ALL
    default_stream_usage: ClassVar[bool] = True


class PerplexityConfig(OpenAIWireConfig, frozen=True, tag="perplexity"):
    default_base_url: ClassVar[str] = "https://api.perplexity.ai"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset({C.chat, C.streaming})


class GrokConfig(OpenAIWireConfig, frozen=True, tag="grok"):
    default_base_url: ClassVar[str] = "https://api.x.ai/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = ALL


class BlackboxConfig(OpenAIWireConfig, frozen=True, tag="blackbox"):
    default_base_url: ClassVar[str] = "https://api.blackbox.ai"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset({C.chat, C.streaming})


class OpenRouterConfig(OpenAIWireConfig, frozen=True, tag="openrouter"):
    default_base_url: ClassVar[str] = "https://openrouter.ai/api/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {C.chat, C.completions, C.streaming, C.tools}
    )


class OpenAICompatibleConfig(OpenAIWireConfig, frozen=True, tag="openai_compatible"):
    """vLLM, Ollama, LM Studio, TGI: the operator names the URL and what the server can do."""

    needs_api_key: ClassVar[bool] = False
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {C.chat, C.completions, C.embeddings, C.streaming, C.tools}
    )


# The operations whose streams OpenAI can end with a usage event.
_STREAM_USAGE = frozenset({Operation.chat, Operation.completions})


class OpenAIAdapter(Adapter):
    config: OpenAIWireConfig

    def build_auth_headers(self, key: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", b"Bearer " + key.encode())] if key else []

    def target(self, op: Operation, target: Target) -> bytes:
        return f"{self.base_path}/{op.value}".encode()

    def adds_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        """Whether the gateway asks this stream for the usage event the client did not ask for."""
        return (
            self.config.asks_stream_usage
            and op in _STREAM_USAGE
            and body.get("stream") is True
            and not client_asks_usage(body)
        )

    def encode_body(self, op: Operation, body: dict[str, Any], target: Target) -> bytes:
        if not self.adds_usage(op, body):
            return super().encode_body(op, body, target)
        body["model"] = target.model
        # A copy: the relay reads the client's own `stream_options` from `body`.
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps({**body, "stream_options": options})

    def stream_translator(self, op: Operation, body: dict[str, Any]) -> StreamTranslator | None:
        return UsageFilter() if self.adds_usage(op, body) else None


ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {
    kind: OpenAIAdapter
    for kind in (
        OpenAIConfig,
        PerplexityConfig,
        GrokConfig,
        BlackboxConfig,
        OpenRouterConfig,
        OpenAICompatibleConfig,
    )
}
