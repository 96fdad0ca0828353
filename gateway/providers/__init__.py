"""Provider kinds: their config structs (a tagged union on `type`) and their adapters.

Open `base.py` first (the `Adapter` interface, capabilities, usage found in answer bytes).
`openai.py` is the OpenAI-compatible family, relayed as is; `azure.py` adds Azure's URLs;
`anthropic.py` and `cohere.py` translate requests, their `*_response.py` the answers and streams
(`anthropic_json.py`: Anthropic's JSON mode as a forced tool).
"""

from __future__ import annotations

from typing import Union

from gateway.providers import anthropic, azure, cohere, openai
from gateway.providers.base import (
    OPERATION_CAPABILITY,
    Adapter,
    Capability,
    Operation,
    ProviderConfig,
    StreamTranslator,
    Target,
)

# One entry per provider kind: its config struct (tagged by `type`) -> its adapter class.
ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {
    **openai.ADAPTERS,
    **azure.ADAPTERS,
    **anthropic.ADAPTERS,
    **cohere.ADAPTERS,
}

# msgspec decodes `providers.<name>` straight into the subclass named by `type`.
AnyProvider = Union[tuple(ADAPTERS)]  # type: ignore[valid-type]  # noqa: UP007

KINDS: tuple[str, ...] = tuple(kind.__struct_config__.tag for kind in ADAPTERS)  # type: ignore[misc]


def build_adapter(name: str, config: ProviderConfig, base_path: str) -> Adapter:
    return ADAPTERS[type(config)](name, config, base_path)


__all__ = [
    "ADAPTERS",
    "KINDS",
    "OPERATION_CAPABILITY",
    "Adapter",
    "AnyProvider",
    "Capability",
    "Operation",
    "ProviderConfig",
    "StreamTranslator",
    "Target",
    "build_adapter",
]
