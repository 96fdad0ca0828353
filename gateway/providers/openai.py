"""OpenAI and the OpenAI-compatible family: same wire format, different hosts and capabilities.

Requests go out with the model name rewritten and the provider's key; responses
and streams are relayed byte for byte.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.providers.base import Adapter, Capability, Operation, ProviderConfig, Target

C = Capability
ALL = frozenset(Capability)


class OpenAIConfig(ProviderConfig, frozen=True, tag="openai"):
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = ALL


class PerplexityConfig(ProviderConfig, frozen=True, tag="perplexity"):
    default_base_url: ClassVar[str] = "https://api.perplexity.ai"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset({C.chat, C.streaming})


class GrokConfig(ProviderConfig, frozen=True, tag="grok"):
    default_base_url: ClassVar[str] = "https://api.x.ai/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = ALL


class BlackboxConfig(ProviderConfig, frozen=True, tag="blackbox"):
    default_base_url: ClassVar[str] = "https://api.blackbox.ai"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset({C.chat, C.streaming})


class OpenRouterConfig(ProviderConfig, frozen=True, tag="openrouter"):
    default_base_url: ClassVar[str] = "https://openrouter.ai/api/v1"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {C.chat, C.completions, C.streaming, C.tools}
    )


class OpenAICompatibleConfig(ProviderConfig, frozen=True, tag="openai_compatible"):
    """vLLM, Ollama, LM Studio, TGI: the operator names the URL and what the server can do."""

    needs_api_key: ClassVar[bool] = False
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {C.chat, C.completions, C.embeddings, C.streaming, C.tools}
    )


class OpenAIAdapter(Adapter):
    def build_auth_headers(self) -> list[tuple[bytes, bytes]]:
        if not self.config.api_key:
            return []
        return [(b"authorization", b"Bearer " + self.config.api_key.encode())]

    def target(self, op: Operation, target: Target) -> bytes:
        return f"{self.base_path}/{op.value}".encode()


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
