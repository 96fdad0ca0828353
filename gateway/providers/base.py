"""The provider adapter interface.

An adapter turns a client's OpenAI-shaped request into the upstream's request
(URL path, auth headers, body) and declares what the provider can do. The
OpenAI-compatible family needs no response translation: bytes are relayed as
they come. Translating providers (Anthropic, Cohere) override the response
hooks: `translate_response` for a whole JSON answer, `stream_translator` for a
stream (fed upstream bytes as they arrive, it returns OpenAI SSE bytes), and
`translate_error` for error answers (None for a body not in the provider's error shape).
"""

from __future__ import annotations

import abc
import enum
import re
from typing import Annotated, Any, ClassVar

import msgspec
import orjson

from gateway.providers.keys import KeyRing

_PROMPT_TOKENS = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')


def find_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last usage object in `data`, if it has one."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT_TOKENS.search(data, at)
    if prompt is None:
        return None
    completion = _COMPLETION_TOKENS.search(data, at)
    return int(prompt[1]), int(completion[1]) if completion else 0


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


class Target(msgspec.Struct, frozen=True):
    """Where one deployment sends work: the upstream model and its provider-specific params."""

    model: str
    params: dict[str, Any] = {}


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    """Fields every provider kind accepts; each kind is a tagged subclass (`type: openai`)."""

    base_url: str = ""
    api_key: str = ""
    # Several keys instead of `api_key`: a 429 moves the next request to the next one, a 401/403
    # retires one until reload (`keys.py`).
    api_keys: list[str] = []
    max_connections: PositiveInt = 100
    # Idle pooled connections are dropped sooner than the upstream's own idle timeout
    # (uvicorn-based servers such as vLLM close after 5 s), so a request is never
    # written onto a connection the upstream is closing.
    keepalive_s: Annotated[float, msgspec.Meta(gt=0)] = 4.0
    # Narrows (or, for self-hosted servers, declares) what this provider can do.
    capabilities: frozenset[Capability] | None = None
    # Sent with every request, e.g. OpenRouter's HTTP-Referer and X-Title.
    headers: dict[str, str] = {}

    # Filled in by each kind.
    default_base_url: ClassVar[str] = ""
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset()
    needs_api_key: ClassVar[bool] = True

    @property
    def url(self) -> str:
        return (self.base_url or self.default_base_url).rstrip("/")

    @property
    def credentials(self) -> list[tuple[str, str]]:
        """The keys set (empty ones left out), each with its place in this entry: `api_keys[1]`."""
        if self.api_keys:
            return [(k, f"api_keys[{i}]") for i, k in enumerate(self.api_keys) if k]
        return [(self.api_key, "api_key")] if self.api_key else []

    @property
    def enabled(self) -> bool:
        return bool(self.url) and (bool(self.credentials) or not self.needs_api_key)

    def supports(self, capability: Capability) -> bool:
        return capability in (self.default_capabilities if self.capabilities is None else self.capabilities)


class OpenAIWireConfig(ProviderConfig, frozen=True):
    """The OpenAI wire format's kinds, which may be asked for a stream's usage (`stream_options`)."""

    # Ask the upstream for the usage event of every stream (the gateway counts it, and hides it
    # from a client that did not ask). Off for servers that reject `stream_options`.
    stream_usage: bool | None = None

    default_stream_usage: ClassVar[bool] = False

    @property
    def asks_stream_usage(self) -> bool:
        return self.default_stream_usage if self.stream_usage is None else self.stream_usage


class StreamTranslator(abc.ABC):
    """Turns one upstream event stream into OpenAI `chat.completion.chunk` SSE events, incrementally.

    Never buffers the stream: each `feed` returns what the bytes so far complete.
    """

    # (prompt, completion) tokens once the stream has reported them, whether or not the client
    # sees them: the gateway's own count.
    usage: tuple[int, int] | None = None

    @abc.abstractmethod
    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in (split anywhere), OpenAI SSE bytes out (may be empty)."""

    @abc.abstractmethod
    def finish(self) -> bytes:
        """The upstream stream ended: whatever is still owed (a translator's last events and
        `data: [DONE]`, or an error event; a filter's unterminated tail)."""


# The usage event that `include_usage` adds is the only event with a usage object (the others say
# `"usage":null`); JSON escaping keeps `"usage":` out of string contents.
USAGE_EVENT = re.compile(rb'"usage":\s*\{')
# It has no choices: OpenAI sends `[]`, some compatible servers null or no field. A content chunk
# that carries a running usage (servers that always send one) is relayed.
_NO_CHOICES = re.compile(rb'"choices":\s*(?:\[\s*\]|null)')


class UsageFilter(StreamTranslator):
    """Relays an OpenAI-format stream less the usage event the gateway asked for and the client did
    not, keeping its counts as `usage`.

    Until that event has gone by, only complete lines are passed on (a line split across reads
    waits for its end) and each read is searched for the marker, never parsed; a read without it
    is returned as it came, without copying. After it, reads are relayed as they come.
    """

    __slots__ = ("_dropping", "_marker", "_partial", "_strip", "usage")

    # What marks the events still to drop once the usage event is out (a subclass's own).
    after_usage: re.Pattern[bytes] | None = None

    def __init__(self, marker: re.Pattern[bytes] = USAGE_EVENT, *, strip_usage: bool = True) -> None:
        self._partial = b""
        self._dropping = False  # inside an event being dropped, until its blank line
        self._marker: re.Pattern[bytes] | None = marker  # a read without it holds nothing to drop
        self._strip = strip_usage
        self.usage: tuple[int, int] | None = None

    def feed(self, data: bytes) -> bytes:
        if self._partial:
            data = self._partial + data
        if self._marker is None and not self._dropping:
            self._partial = b""
            return data
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        lines = data[:end]
        if self._dropping or self._marker.search(lines):  # type: ignore[union-attr]
            return self._drop(lines)
        return lines

    def finish(self) -> bytes:
        # The upstream's own `data: [DONE]` has been relayed; only an unterminated line is left.
        rest, self._partial = self._partial, b""
        return self._drop(rest) if rest else b""

    def dropped(self, line: bytes) -> bool:
        """Whether `line` starts an event to drop; the usage event's counts are noted."""
        if not self._strip or not USAGE_EVENT.search(line):
            return False
        if b'"choices"' in line and not _NO_CHOICES.search(line):
            return False
        self.usage = find_usage(line)
        self._strip = False
        self._marker = self.after_usage
        return True

    def _drop(self, lines: bytes) -> bytes:
        kept = []
        for line in lines.splitlines(keepends=True):
            if self.dropped(line):
                self._dropping = True
            elif not self._dropping:
                kept.append(line)
            elif not line.strip():
                self._dropping = False  # the blank line that ended the dropped event
        return b"".join(kept)


def client_asks_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for a stream's usage event (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_error(status: int, raw: bytes) -> tuple[int, bytes | None]:
    """An upstream error answer in OpenAI's shape: kept when it already is, completed when nearly.

    None for any other body (a proxy's HTML page, plain text, JSON of another shape): the
    gateway answers with a message of its own and logs the body (`gateway.routing.failures`).
    """
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return status, None
    if isinstance(error.get("type"), str) and {"param", "code"} <= error.keys():
        return status, raw
    # Nearly OpenAI's shape (some compatible servers omit fields): complete it.
    kind = error.get("type") if isinstance(error.get("type"), str) else "upstream_error"
    fields = {
        "message": error["message"],
        "type": kind,
        "param": error.get("param"),
        "code": error.get("code"),
    }
    return status, orjson.dumps({"error": fields})


class Adapter(abc.ABC):
    """Builds upstream requests for one configured provider.

    `base_path` is the path part of the provider's base_url (e.g. "/v1"); the
    adapter appends its own operation paths to it.
    """

    def __init__(self, name: str, config: ProviderConfig, base_path: str) -> None:
        self.name = name
        self.config = config
        self.base_path = base_path
        extra = [(k.lower().encode(), v.encode()) for k, v in config.headers.items()]
        # Built once per key: every request sends its key's head as it is.
        self.keys = KeyRing(
            name,
            config.credentials,
            lambda key: [(b"content-type", b"application/json"), *self.build_auth_headers(key), *extra],
        )
        # Whole JSON answers of this provider must be read and rewritten, whatever their framing.
        self.translates = type(self).translate_response is not Adapter.translate_response

    # Upstream statuses that mean the key itself is refused (revoked, unknown, not allowed): it is retired.
    refused_key_statuses: ClassVar[frozenset[int]] = frozenset({401, 403})

    @abc.abstractmethod
    def build_auth_headers(self, key: str) -> list[tuple[bytes, bytes]]:
        """`key` as request headers (built once per key; "" for a provider that takes none)."""

    @abc.abstractmethod
    def target(self, op: Operation, target: Target) -> bytes:
        """The request-target for `op` (path and query)."""

    def encode_body(self, op: Operation, body: dict[str, Any], target: Target) -> bytes:
        """The upstream body; the client's alias is replaced by the deployment's model.

        Raises InvalidRequest for a parameter the provider cannot honour.
        """
        body["model"] = target.model
        return orjson.dumps(body)

    def probe_url(self) -> str:
        """A cheap authenticated GET that tells whether the provider answers (the health probe)."""
        return self.config.url + "/models"

    def translate_response(self, op: Operation, request: dict[str, Any], body: bytes) -> bytes:
        """A successful JSON answer in OpenAI's shape (only called on adapters that override it).

        `request` is the body `encode_body` saw (its `model` already the upstream's).
        """
        return body

    def stream_translator(self, op: Operation, body: dict[str, Any]) -> StreamTranslator | None:
        """A translator for this request's stream, or None to relay the upstream bytes as they are."""
        return None

    def translate_error(self, status: int, raw: bytes) -> tuple[int, bytes | None]:
        """An upstream error answer (provider key already masked) as (status, OpenAI error JSON);
        the JSON is None when the body is not an error in this provider's shape."""
        return openai_error(status, raw)
