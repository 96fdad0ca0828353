"""POST /v1/completions, /v1/embeddings and /v1/images/generations: their request schemas.

Each follows OpenAI's reference for that operation (chat has its own module,
`chat.py`). A prompt or input made of token ids is an array of integers, or an
array of such arrays; msgspec takes one array type per union, so the items'
union (string, token id or array of token ids) is checked per item.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from gateway.validation.fields import (
    MAX_OUTPUT_TOKENS,
    Logprobs,
    Sampling,
    Schema,
)

TokenIds = list[int]


class CompletionRequest(Sampling, kw_only=True):
    # Required, and null is documented: the model then starts a new document.
    prompt: str | Annotated[list[str | int | TokenIds], Meta(min_length=1)] | None
    # 0 is valid here: with echo, the prompt's logprobs alone (evaluation harnesses ask for it).
    max_tokens: Annotated[int, Meta(ge=0, le=MAX_OUTPUT_TOKENS)] | None = None
    best_of: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool | None = None
    logprobs: Logprobs | None = None
    suffix: str | None = None


class EmbeddingRequest(Schema):
    # "cannot be an empty string, and any array must be 2048 dimensions or less"
    input: (
        Annotated[str, Meta(min_length=1)]
        | Annotated[
            list[Annotated[str, Meta(min_length=1)] | int | TokenIds], Meta(min_length=1, max_length=2048)
        ]
    )
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


class ImageRequest(Schema):
    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    style: str | None = None
    quality: str | None = None
    size: str | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    partial_images: Annotated[int, Meta(ge=0, le=3)] | None = None
    stream: bool | None = None
    user: str | None = None
