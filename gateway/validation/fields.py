"""The field types the request schemas share: OpenAI's documented ranges as msgspec constraints.

A schema declares only the fields it checks. A field it does not declare is not
looked at (msgspec skips unknown keys), so it reaches the upstream untouched:
providers add fields every month. Every optional field also takes `null`, which
OpenAI reads as "not set" and the SDKs send when a caller passes None.
Enumerations are checked only where the set is the wire format's structure
(roles, part and tool types); open-ended ones (sizes, qualities, reasoning
efforts, image detail) are typed as strings, since each new model adds values.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

# No model produces a million tokens in one answer: a larger max_tokens is a mistake (or an attempt to
# reserve a limit's whole token budget), refused before the limiter's estimate reserves it.
MAX_OUTPUT_TOKENS = 1_048_576
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Schema(msgspec.Struct, gc=False):
    """A request object's checked fields. Built per request and dropped: never in a cycle, so no GC."""


Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Choices = Annotated[int, Meta(ge=1, le=128)]
OutputTokens = Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
Seed = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
# OpenAI documents 0-20 for chat's top_logprobs and at most 5 for completions' logprobs; 20 for both,
# since the OpenAI-compatible servers (vLLM) accept up to 20 and the upstream knows its own cap.
Logprobs = Annotated[int, Meta(ge=0, le=20)]
Stop = str | Annotated[list[str], Meta(max_length=4)]
# Token id (a JSON object key, so a string of digits) -> bias.
LogitBias = dict[int, Annotated[float, Meta(ge=-100, le=100)]]
# Function, tool and schema names: OpenAI's pattern.
Name = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_-]+$")]
JSONObject = dict[str, Any]


class StreamOptions(Schema):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class Sampling(Schema):
    """The fields chat and completions share."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Stop | None = None
    logit_bias: LogitBias | None = None
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
