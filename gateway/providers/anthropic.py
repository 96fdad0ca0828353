"""Anthropic's Messages API behind OpenAI's chat completions: the config, the adapter, the request.

A chat request becomes one `POST {base}/v1/messages`: system messages are lifted
to `system`, tool calls and tool results become `tool_use` / `tool_result`
blocks, consecutive turns of one role are merged (the API wants user and
assistant to alternate, and tool results are user-role blocks), and `max_tokens`
is always sent because the API requires it. Parameters Anthropic cannot honour
are refused with a 400 naming the provider and the parameter; advisory ones are
dropped. Answers, streams and errors are translated in `anthropic_response`.

JSON mode (`response_format` json_object / json_schema) is a forced tool, built in
`anthropic_json`; client tools beside it are refused, since the forced call would
leave the model no way to call them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from gateway.errors import InvalidRequest, UnsupportedOperation
from gateway.providers import anthropic_json
from gateway.providers.anthropic_response import (
    AnthropicStreamTranslator,
    translate_error,
    translate_message,
)
from gateway.providers.base import (
    Adapter,
    Capability,
    Operation,
    PositiveInt,
    ProviderConfig,
    StreamTranslator,
    Target,
    client_asks_usage,
)

# Advisory for Anthropic: accepted and not sent. `stream_options` is the gateway's own business.
DROPPED = frozenset(
    {
        "metadata",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "seed",
        "service_tier",
        "store",
        "stream_options",
        "verbosity",
    }
)
# Refused whenever set (not null): Anthropic has no equivalent, and the answer would differ.
REFUSED = frozenset(
    {"audio", "function_call", "functions", "moderation", "top_logprobs", "web_search_options"}
)
# Translated below (or, for `top_k`, an Anthropic field a client may send through `extra_body`).
HANDLED = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "modalities",
        "model",
        "n",
        "parallel_tool_calls",
        "presence_penalty",
        "response_format",
        "safety_identifier",
        "stop",
        "stream",
        "temperature",
        "tool_choice",
        "tools",
        "top_k",
        "top_p",
        "user",
    }
)
_EMPTY_SCHEMA = {"type": "object", "properties": {}}


class AnthropicConfig(ProviderConfig, frozen=True, tag="anthropic"):
    # The API refuses a request without this header; a newer one opts into newer behaviour.
    anthropic_version: str = "2023-06-01"
    # Anthropic requires max_tokens; OpenAI clients may omit it.
    default_max_tokens: PositiveInt = 4096

    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.chat, Capability.streaming, Capability.tools}
    )


class AnthropicAdapter(Adapter):
    config: AnthropicConfig

    def build_auth_headers(self, key: str) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-api-key", key.encode()),
            (b"anthropic-version", self.config.anthropic_version.encode()),
        ]

    def target(self, op: Operation, target: Target) -> bytes:
        return f"{self.base_path}/v1/messages".encode()

    def probe_url(self) -> str:
        return self.config.url + "/v1/models"

    def encode_body(self, op: Operation, body: dict[str, Any], target: Target) -> bytes:
        if op is not Operation.chat:
            # Only reachable when an operator's `capabilities` claims more than the Messages API does.
            raise UnsupportedOperation(
                f"Provider '{self.name}' (anthropic) does not support {op.value}.", param="model"
            )
        return orjson.dumps(RequestTranslator(self.name, self.config).translate(body, target))

    def translate_response(self, op: Operation, request: dict[str, Any], body: bytes) -> bytes:
        return translate_message(body, self.name, anthropic_json.answer_tool_name(request))

    def stream_translator(self, op: Operation, body: dict[str, Any]) -> StreamTranslator | None:
        answer_tool = anthropic_json.answer_tool_name(body)
        return AnthropicStreamTranslator(self.name, client_asks_usage(body), answer_tool)

    def translate_error(self, status: int, raw: bytes) -> tuple[int, bytes | None]:
        return translate_error(status, raw, self.name)


class RequestTranslator:
    """One OpenAI chat request -> one Messages API body; every refusal names its parameter."""

    def __init__(self, provider: str, config: AnthropicConfig) -> None:
        self.provider = provider
        self.config = config

    def refuse(self, param: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"Provider '{self.provider}' (anthropic) {why}", param=param)

    def translate(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        self.check_params(body)
        system, messages = self.messages(body["messages"])
        out: dict[str, Any] = {"model": target.model}
        if system:
            out["system"] = system
        out["messages"] = messages
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            out["max_tokens"] = max_tokens
        stop = body.get("stop")
        if stop is not None:
            out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) is not None:
                out[name] = body[name]
        user = body.get("user") or body.get("safety_identifier")
        if user:
            out["metadata"] = {"user_id": user}
        answer_tool = anthropic_json.answer_tool(body.get("response_format"), self.provider)
        if answer_tool is not None:
            out["tools"] = [answer_tool]
            # One call, so one JSON answer.
            out["tool_choice"] = {
                "type": "tool",
                "name": answer_tool["name"],
                "disable_parallel_tool_use": True,
            }
        elif body.get("tools"):
            out["tools"] = [self.tool(i, tool) for i, tool in enumerate(body["tools"])]
            choice = self.tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
            if choice is not None:
                out["tool_choice"] = choice
        if body.get("stream") is True:
            out["stream"] = True
        # Per-deployment defaults (models[].deployments[].params), in the API's own field names.
        for name, value in target.params.items():
            out.setdefault(name, value)
        out.setdefault("max_tokens", self.config.default_max_tokens)
        return out

    def check_params(self, body: dict[str, Any]) -> None:
        for name, value in body.items():
            if value is None or name in HANDLED or name in DROPPED:
                continue
            if name in REFUSED:
                raise self.refuse(name, f"does not support '{name}'.")
            raise self.refuse(name, f"does not recognise the request argument '{name}'.")
        n = body.get("n")
        if n is not None and n != 1:
            raise self.refuse("n", "returns one choice per request: 'n' must be 1.")
        if body.get("logprobs"):
            raise self.refuse("logprobs", "does not return log probabilities.")
        if body.get("logit_bias"):
            raise self.refuse("logit_bias", "does not support 'logit_bias'.")
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name):
                raise self.refuse(name, f"does not support '{name}'.")
        temperature = body.get("temperature")
        if isinstance(temperature, (int, float)) and temperature > 1:
            raise self.refuse("temperature", "accepts a temperature between 0 and 1.")
        modalities = body.get("modalities")
        if isinstance(modalities, list) and any(m != "text" for m in modalities):
            raise self.refuse("modalities", "answers with text only.")
        fmt = body.get("response_format")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if fmt is not None and kind not in ("text", "json_object", "json_schema"):
            raise self.refuse(
                "response_format", "supports response_format text, json_object and json_schema."
            )
        if kind in ("json_object", "json_schema") and body.get("tools"):
            raise self.refuse(
                "response_format",
                "answers in JSON by a forced tool call, which leaves no room for the request's own "
                "'tools': send either tools or a JSON response_format.",
            )

    # -- messages ----------------------------------------------------------------

    def messages(self, messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        system: list[str] = []
        turns: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            role = message.get("role")
            where = f"messages[{i}]"
            if role in ("system", "developer"):
                # The Messages API has one top-level system prompt: every system message joins it, in order.
                system.append(self.text_only(message.get("content"), where + ".content"))
                continue
            if role == "user":
                content = self.user_content(message.get("content"), where + ".content")
                self.append(turns, "user", content)
            elif role == "assistant":
                self.append(turns, "assistant", self.assistant_content(message, where))
            elif role == "tool":
                self.append(turns, "user", [self.tool_result(message, where)])
            else:
                raise self.refuse(where + ".role", f"does not support messages with role {role!r}.")
        return "\n\n".join(system), turns

    @staticmethod
    def append(turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
        if not content and role == "assistant":
            return  # an assistant turn with nothing in it (no text, no tool calls) says nothing
        if turns and turns[-1]["role"] == role:
            last = turns[-1]
            last["content"] = _as_blocks(last["content"]) + _as_blocks(content)
        else:
            turns.append({"role": role, "content": content})

    def text_only(self, content: Any, where: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise self.refuse(f"{where}[{j}]", "accepts only text parts here.")
                texts.append(part["text"])
            return "\n".join(texts)
        raise self.refuse(where, "needs content as a string or an array of text parts.")

    def user_content(self, content: Any, where: str) -> str | list[dict[str, Any]]:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise self.refuse(where, "needs user content as a string or an array of content parts.")
        blocks = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                blocks.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                blocks.append(self.image(part.get("image_url"), f"{where}[{j}].image_url"))
            else:
                raise self.refuse(f"{where}[{j}]", f"does not support content parts of type {kind!r}.")
        return blocks

    def image(self, image: Any, where: str) -> dict[str, Any]:
        url = image.get("url") if isinstance(image, dict) else None
        if isinstance(url, str) and url.startswith("https://"):
            return {"type": "image", "source": {"type": "url", "url": url}}
        if isinstance(url, str) and url.startswith("data:"):
            meta, comma, data = url[5:].partition(",")
            media_type, _, encoding = meta.partition(";")
            if comma and encoding == "base64" and media_type:
                return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        raise self.refuse(where + ".url", "takes images as https URLs or base64 data URLs.")

    def assistant_content(self, message: dict[str, Any], where: str) -> list[dict[str, Any]]:
        content = message.get("content")
        blocks: list[dict[str, Any]] = []
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                text = part.get(kind) if kind in ("text", "refusal") else None
                if not isinstance(text, str):
                    raise self.refuse(f"{where}.content[{j}]", "accepts only text parts from the assistant.")
                if text:
                    blocks.append({"type": "text", "text": text})
        elif content is not None:
            raise self.refuse(where + ".content", "needs assistant content as a string, an array or null.")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise self.refuse(where + ".tool_calls", "needs tool_calls as an array.")
        for j, call in enumerate(calls):
            blocks.append(self.tool_use(call, f"{where}.tool_calls[{j}]"))
        return blocks

    def tool_use(self, call: Any, where: str) -> dict[str, Any]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise self.refuse(where, "needs each tool call to have an id and a function.")
        if not isinstance(function.get("name"), str):
            raise self.refuse(where + ".function.name", "needs the tool call's function name.")
        arguments = function.get("arguments") or "{}"
        try:
            parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise self.refuse(where + ".function.arguments", "needs tool call arguments as a JSON object.")
        return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": parsed}

    def tool_result(self, message: dict[str, Any], where: str) -> dict[str, Any]:
        tool_call_id = message.get("tool_call_id")
        if not isinstance(tool_call_id, str):
            raise self.refuse(where + ".tool_call_id", "needs tool_call_id on a tool message.")
        content = message.get("content")
        if not isinstance(content, str):
            content = [{"type": "text", "text": self.text_only(content, where + ".content")}]
        return {"type": "tool_result", "tool_use_id": tool_call_id, "content": content}

    # -- tools -------------------------------------------------------------------

    def tool(self, i: int, tool: Any) -> dict[str, Any]:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise self.refuse(f"tools[{i}]", "supports function tools with a name only.")
        out: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            out["description"] = function["description"]
        out["input_schema"] = function.get("parameters") or _EMPTY_SCHEMA
        return out

    def tool_choice(self, choice: Any, parallel: Any) -> dict[str, Any] | None:
        out: dict[str, Any]
        if choice is None or choice == "auto":
            out = {"type": "auto"}
        elif choice == "none":
            return {"type": "none"}
        elif choice == "required":
            out = {"type": "any"}
        elif (
            isinstance(choice, dict)
            and choice.get("type") == "function"
            and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)
        ):
            out = {"type": "tool", "name": choice["function"]["name"]}
        else:
            raise self.refuse(
                "tool_choice", "supports tool_choice 'auto', 'none', 'required' or one function."
            )
        if parallel is False:
            out["disable_parallel_tool_use"] = True
        elif choice is None:
            return None  # the API's default is auto with parallel calls, as OpenAI's is
        return out


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {AnthropicConfig: AnthropicAdapter}
