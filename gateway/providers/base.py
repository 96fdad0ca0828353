"""The provider adapter interface.

An adapter turns a client's OpenAI-shaped request into the upstream's request
(URL path, auth headers, body) and declares what the provider can do. The
OpenAI-compatible family needs no response translation: bytes are relayed as
they come. Translating providers (Anthropic, Cohere) override the response
hooks.
"""

from __future__ import annotations

import abc
import enum
from typing import Annotated, Any, ClassVar

import msgspec
import orjson


class Operation(enum.Enum):
    """What a client asks for; the value is the path under /v1 (and the capability name)."""

    chat = "chat/completions"
    completions = "completions"
    embeddings = "embeddings"
    images = "images/generations"


class Capability(enum.StrEnum):
    chat = "chat"
    completions = "completions"
    embeddings = "embeddings"
    images = "images"
    streaming = "streaming"
    tools = "tools"


OPERATION_CAPABILITY = {
    Operation.chat: Capability.chat,
    Operation.completions: Capability.completions,
    Operation.embeddings: Capability.embeddings,
    Operation.images: Capability.images,
}

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    """Fields every provider kind accepts; each kind is a tagged subclass (`type: openai`)."""

    base_url: str = ""
    api_key: str = ""
    max_connections: PositiveInt = 100
    # Narrows (or, for self-hosted servers, declares) what this provider can do.
    capabilities: frozenset[Capability] | None = None

    # Filled in by each kind.
    default_base_url: ClassVar[str] = ""
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset()
    needs_api_key: ClassVar[bool] = True

    @property
    def url(self) -> str:
        return (self.base_url or self.default_base_url).rstrip("/")

    @property
    def enabled(self) -> bool:
        return bool(self.url) and (bool(self.api_key) or not self.needs_api_key)

    def supports(self, capability: Capability) -> bool:
        return capability in (self.default_capabilities if self.capabilities is None else self.capabilities)


class Adapter(abc.ABC):
    """Builds upstream requests for one configured provider.

    `base_path` is the path part of the provider's base_url (e.g. "/v1"); the
    adapter appends its own operation paths to it.
    """

    def __init__(self, name: str, config: ProviderConfig, base_path: str) -> None:
        self.name = name
        self.config = config
        self.base_path = base_path
        # Built once: every request to this provider sends the same head fields.
        self.request_headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            *self.build_auth_headers(),
        ]

    @abc.abstractmethod
    def build_auth_headers(self) -> list[tuple[bytes, bytes]]:
        """The provider credential as request headers, built once."""

    @abc.abstractmethod
    def target(self, op: Operation, upstream_model: str) -> bytes:
        """The request-target for `op` (path and query)."""

    def encode_body(self, op: Operation, body: dict[str, Any], upstream_model: str) -> bytes:
        """The upstream body; the client's alias is replaced by the deployment's model."""
        body["model"] = upstream_model
        return orjson.dumps(body)
