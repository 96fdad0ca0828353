"""Completions, embeddings and images: the SDK's shapes pass, each rule refuses with its path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers import Operation
from gateway.validation.validate import validate

COMPLETIONS, EMBEDDINGS, IMAGES = Operation.completions, Operation.embeddings, Operation.images


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (COMPLETIONS, {"prompt": "Say hi"}),
        (COMPLETIONS, {"prompt": None}),  # documented: the model starts a new document
        (COMPLETIONS, {"prompt": ["a", "b"]}),
        (COMPLETIONS, {"prompt": [1, 2, 3]}),
        (COMPLETIONS, {"prompt": [[1, 2], [3]]}),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 5}),  # prompt logprobs only
        (COMPLETIONS, {"prompt": "x", "best_of": 3, "n": 2, "suffix": "!", "stop": ["\n"], "seed": 1,
                       "temperature": 0.5, "top_p": 0.9, "presence_penalty": 1, "frequency_penalty": -1,
                       "logit_bias": {"50256": -100}, "user": "u"}),
        (COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}),
        (COMPLETIONS, {"prompt": "x", "best_of": None, "n": None, "logprobs": None, "vendor": 1}),
        (EMBEDDINGS, {"input": "text"}),
        (EMBEDDINGS, {"input": ["a", "b"]}),
        (EMBEDDINGS, {"input": [1, 2, 3]}),
        (EMBEDDINGS, {"input": [[1, 2], [3]]}),
        (EMBEDDINGS, {"input": ["x"] * 2048, "dimensions": 256, "encoding_format": "base64", "user": "u"}),
        (EMBEDDINGS, {"input": "x", "encoding_format": "float", "input_type": "query"}),
        (IMAGES, {"prompt": "a cat"}),
        (IMAGES, {"prompt": "a" * 32000, "n": 10, "size": "1024x1536", "quality": "hd", "style": "vivid",
                  "response_format": "b64_json", "background": "transparent", "output_format": "webp",
                  "output_compression": 80, "moderation": "low", "user": "u"}),
        (IMAGES, {"prompt": "a cat", "stream": True, "partial_images": 3, "size": "auto", "quality": "xhigh"}),
        (IMAGES, {"prompt": "a cat", "n": None, "response_format": None, "size": None}),
    ],
)
def test_valid_bodies_pass_untouched(op: Operation, body: dict[str, Any]) -> None:
    body = {"model": "m", **body}
    before = copy.deepcopy(body)
    validate(body, op)
    assert body == before


@pytest.mark.parametrize(
    ("op", "body", "param", "code"),
    [
        (COMPLETIONS, {}, "prompt", "missing_required_parameter"),
        (COMPLETIONS, {"prompt": {}}, "prompt", "invalid_type"),
        (COMPLETIONS, {"prompt": 5}, "prompt", "invalid_type"),
        (COMPLETIONS, {"prompt": []}, "prompt", "empty_array"),
        (COMPLETIONS, {"prompt": ["a", {"b": 1}]}, "prompt[1]", "invalid_type"),
        (COMPLETIONS, {"prompt": [[1, "2"]]}, "prompt[0][1]", "invalid_type"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, "max_tokens", "integer_below_min_value"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 10**23}, "max_tokens", "integer_above_max_value"),
        (COMPLETIONS, {"prompt": "x", "n": 129}, "n", "integer_above_max_value"),
        (COMPLETIONS, {"prompt": "x", "best_of": 21}, "best_of", "integer_above_max_value"),
        (COMPLETIONS, {"prompt": "x", "best_of": 2, "n": 3}, "best_of", "invalid_value"),
        (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs", "integer_above_max_value"),
        (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs", "invalid_type"),
        (COMPLETIONS, {"prompt": "x", "echo": "yes"}, "echo", "invalid_type"),
        (COMPLETIONS, {"prompt": "x", "suffix": 1}, "suffix", "invalid_type"),
        (COMPLETIONS, {"prompt": "x", "temperature": 9}, "temperature", "decimal_above_max_value"),
        (COMPLETIONS, {"prompt": "x", "stop": ["1", "2", "3", "4", "5"]}, "stop", "array_above_max_length"),
        (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        (EMBEDDINGS, {}, "input", "missing_required_parameter"),
        (EMBEDDINGS, {"input": None}, "input", "invalid_type"),
        (EMBEDDINGS, {"input": 3}, "input", "invalid_type"),
        (EMBEDDINGS, {"input": ""}, "input", "empty_string"),
        (EMBEDDINGS, {"input": []}, "input", "empty_array"),
        (EMBEDDINGS, {"input": ["a", ""]}, "input[1]", "empty_string"),
        (EMBEDDINGS, {"input": ["x"] * 2049}, "input", "array_above_max_length"),
        (EMBEDDINGS, {"input": [{"text": "a"}]}, "input[0]", "invalid_type"),
        (EMBEDDINGS, {"input": "x", "dimensions": 0}, "dimensions", "integer_below_min_value"),
        (EMBEDDINGS, {"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        (EMBEDDINGS, {"input": "x", "user": 1}, "user", "invalid_type"),
        (IMAGES, {}, "prompt", "missing_required_parameter"),
        (IMAGES, {"prompt": ["a"]}, "prompt", "invalid_type"),
        (IMAGES, {"prompt": ""}, "prompt", "empty_string"),
        (IMAGES, {"prompt": "a" * 32001}, "prompt", "string_above_max_length"),
        (IMAGES, {"prompt": "a", "n": 0}, "n", "integer_below_min_value"),
        (IMAGES, {"prompt": "a", "n": 11}, "n", "integer_above_max_value"),
        (IMAGES, {"prompt": "a", "response_format": "png"}, "response_format", "invalid_value"),
        (IMAGES, {"prompt": "a", "size": 1024}, "size", "invalid_type"),
        (IMAGES, {"prompt": "a", "output_compression": 101}, "output_compression", "integer_above_max_value"),
        (IMAGES, {"prompt": "a", "partial_images": 4}, "partial_images", "integer_above_max_value"),
        (IMAGES, {"prompt": "a", "stream": "yes"}, "stream", "invalid_type"),
    ],
)
def test_invalid_field_is_refused_with_its_path(op: Operation, body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({"model": "m", **body}, op)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code), info.value.message
