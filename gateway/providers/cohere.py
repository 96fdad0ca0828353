"""Cohere (API v2): OpenAI chat and embeddings requests in Cohere's wire format.

    POST /v1/chat/completions -> POST {base}/v2/chat    (stream or not)
    POST /v1/embeddings       -> POST {base}/v2/embed

Requests are rebuilt field by field: what Cohere can honour is translated, what
is only advisory is dropped, and anything else is refused with a 400 naming the
provider and the parameter, so no OpenAI field silently changes meaning. Answers,
streams and errors are turned back into OpenAI's shapes by `cohere_response`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gateway.errors import InvalidRequest, UnsupportedOperation
from gateway.providers import cohere_response
from gateway.providers.base import (
    Adapter,
    Capability,
    Operation,
    ProviderConfig,
    StreamTranslator,
    Target,
    client_asks_usage,
)

C = Capability

# Deployment `params` this adapter reads, and their defaults.
DEFAULT_INPUT_TYPE = "search_document"

# Chat fields with the same name and meaning on both sides.
_SAME = ("temperature", "seed", "frequency_penalty", "presence_penalty")
# Advisory fields with no Cohere counterpart and no effect on the answer's content.
_DROPPED = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction"}
)
# Fields read elsewhere (the model is the deployment's; stream_options by the stream translator).
_HANDLED = frozenset({"model", "stream_options"})
# Cohere's `p` must lie in [0.01, 0.99]; OpenAI's top_p in [0, 1].
_P_MIN, _P_MAX = 0.01, 0.99
_TOOL_CHOICE = {"required": "REQUIRED", "none": "NONE"}


class CohereConfig(ProviderConfig, frozen=True, tag="cohere"):
    default_base_url: ClassVar[str] = "https://api.cohere.com"
    default_capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {C.chat, C.embeddings, C.streaming, C.tools}
    )


class CohereAdapter(Adapter):
    # 498 is Cohere's "invalid token".
    refused_key_statuses: ClassVar[frozenset[int]] = frozenset({401, 403, 498})

    def build_auth_headers(self, key: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", b"Bearer " + key.encode())]

    def target(self, op: Operation, target: Target) -> bytes:
        path = "/v2/embed" if op is Operation.embeddings else "/v2/chat"
        return f"{self.base_path}{path}".encode()

    def probe_url(self) -> str:
        return self.config.url + "/v1/models"

    def encode_body(self, op: Operation, body: dict[str, Any], target: Target) -> bytes:
        if op is Operation.chat:
            payload = self._chat(body, target)
        elif op is Operation.embeddings:
            payload = self._embed(body, target)
        else:
            raise UnsupportedOperation(
                f"Provider '{self.name}' (cohere) does not support {op.value}.", param="model"
            )
        # Answers name the upstream model, as relayed OpenAI answers do.
        body["model"] = target.model
        return cohere_response.dumps(payload)

    def translate_response(self, op: Operation, request: dict[str, Any], body: bytes) -> bytes:
        # A Cohere answer names neither the model nor the encoding the client asked for.
        answer = cohere_response.Answer(str(request["model"]), request.get("encoding_format") == "base64")
        if op is Operation.embeddings:
            return cohere_response.embeddings(body, answer, self.name)
        return cohere_response.chat_completion(body, answer, self.name)

    def stream_translator(self, op: Operation, body: dict[str, Any]) -> StreamTranslator:
        return cohere_response.ChatStream(self.name, str(body.get("model")), client_asks_usage(body))

    def translate_error(self, status: int, raw: bytes) -> tuple[int, bytes | None]:
        return cohere_response.error(status, raw, self.name)

    # -- requests ---------------------------------------------------------------

    def _refuse(self, param: str, why: str) -> InvalidRequest:
        return InvalidRequest(
            f"Provider '{self.name}' (cohere) does not support '{param}': {why}", param=param
        )

    def _chat(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        out: dict[str, Any] = {"model": target.model}
        named: str | None = None
        for key, value in body.items():
            # OpenAI reads an explicit null as "not set".
            if value is None or key in _DROPPED or key in _HANDLED:
                continue
            if key in _SAME:
                out[key] = value
            elif key == "messages":
                out["messages"] = self._messages(value)
            elif key == "max_tokens":
                out.setdefault("max_tokens", value)
            elif key == "max_completion_tokens":
                out["max_tokens"] = value  # the newer name wins when both are sent
            elif key == "stop":
                out["stop_sequences"] = [value] if isinstance(value, str) else value
            elif key == "top_p":
                out["p"] = min(max(value, _P_MIN), _P_MAX) if _is_number(value) else value
            elif key == "stream":
                if value is True:
                    out["stream"] = True
            elif key == "tools":
                out.update(self._tools(value))
            elif key == "tool_choice":
                choice = self._tool_choice(value)
                if choice is not None:
                    out["tool_choice"] = choice
                named = _named_function(value)
            elif key == "response_format":
                out.update(self._response_format(value))
            else:
                self._check_unsupported(key, value)
        if "messages" not in out:
            raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
        if named is not None:
            out.pop("strict_tools", None)  # recomputed from the one tool kept
            out.update(self._only_tool(body.get("tools"), named))
        return out

    def _check_unsupported(self, key: str, value: Any) -> None:
        """Fields Cohere has no way to honour: fine at their neutral value, refused otherwise."""
        if key == "n":
            if value != 1:
                raise self._refuse("n", "Cohere returns one choice per request; send n=1 or leave it out.")
        elif key in ("logprobs", "top_logprobs"):
            if value not in (False, 0):
                raise self._refuse(key, "OpenAI-shaped log probabilities are not available from Cohere.")
        elif key == "logit_bias":
            if value != {}:
                raise self._refuse("logit_bias", "Cohere has no token biasing.")
        elif key == "parallel_tool_calls":
            if value is not True:
                raise self._refuse("parallel_tool_calls", "Cohere may always call several tools at once.")
        elif key in ("functions", "function_call"):
            raise self._refuse(key, "use 'tools' and 'tool_choice' instead.")
        else:
            raise self._refuse(key, "it has no Cohere equivalent.")

    def _messages(self, messages: Any) -> list[dict[str, Any]]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
        return [self._message(m, f"messages[{i}]") for i, m in enumerate(messages)]

    def _message(self, message: Any, where: str) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            return {"role": "system", "content": _content(content, where, ("text",))}
        if role == "user":
            return {"role": "user", "content": _content(content, where, ("text", "image_url"))}
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(
                    f"'{where}.tool_call_id' must be a string.", param=f"{where}.tool_call_id"
                )
            return {"role": "tool", "tool_call_id": call_id, "content": _content(content, where, ("text",))}
        if role == "assistant":
            out: dict[str, Any] = {"role": "assistant"}
            text = None if content is None else _content(content, where, ("text", "refusal"))
            calls = message.get("tool_calls")
            if calls:
                out["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
                # Cohere keeps an assistant's words around its tool calls as the tool plan.
                if text:
                    out["tool_plan"] = text if isinstance(text, str) else "".join(p["text"] for p in text)
            elif text is not None:
                out["content"] = text
            return out
        raise InvalidRequest(
            f"Provider '{self.name}' (cohere) does not support the message role {role!r} in '{where}'.",
            param=f"{where}.role",
        )

    def _tools(self, tools: Any) -> dict[str, Any]:
        if not isinstance(tools, list):
            raise InvalidRequest("'tools' must be an array.", param="tools")
        out = []
        strict = False
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
                raise self._refuse(f"tools[{i}]", "only function tools are available on Cohere.")
            spec: dict[str, Any] = {
                "name": function.get("name"),
                # Cohere requires a schema; OpenAI's default is a function without parameters.
                "parameters": function.get("parameters") or {"type": "object", "properties": {}},
            }
            if function.get("description") is not None:
                spec["description"] = function["description"]
            strict = strict or function.get("strict") is True
            out.append({"type": "function", "function": spec})
        # Cohere's strictness is per request, not per tool: one strict tool makes all strict.
        return {"tools": out, "strict_tools": True} if strict else {"tools": out}

    def _tool_choice(self, choice: Any) -> str | None:
        if choice == "auto":
            return None
        if isinstance(choice, str) and choice in _TOOL_CHOICE:
            return _TOOL_CHOICE[choice]
        if _named_function(choice) is not None:
            return "REQUIRED"
        raise self._refuse(
            "tool_choice",
            "use 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}.",
        )

    def _only_tool(self, tools: Any, name: str) -> dict[str, Any]:
        """The tools of a request whose tool_choice names one function: that one alone.

        Cohere's tool_choice can only require *some* call (REQUIRED), so a named choice is
        REQUIRED with the other tools left out: the model can then call only the named one
        (possibly more than once, as with OpenAI's named choice and parallel calls).
        """
        chosen = [
            tool
            for tool in tools or ()
            if isinstance(tool, dict) and (tool.get("function") or {}).get("name") == name
        ]
        if not chosen:
            raise InvalidRequest(
                f"tool_choice names the function {name!r}, which is not in 'tools'.", param="tool_choice"
            )
        return self._tools(chosen[:1])

    def _response_format(self, fmt: Any) -> dict[str, Any]:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return {}
        if kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            out: dict[str, Any] = {"type": "json_object"}
            if schema is not None:
                out["json_schema"] = schema
            return {"response_format": out}
        raise self._refuse("response_format", f"unknown type {kind!r} (text, json_object, json_schema).")

    def _embed(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise self._refuse("input", "Cohere embeds text: send a string or a non-empty list of strings.")
        out: dict[str, Any] = {
            "model": target.model,
            "texts": texts,
            "input_type": target.params.get("input_type", DEFAULT_INPUT_TYPE),
            # Floats always: base64 is made here, in OpenAI's exact byte layout.
            "embedding_types": ["float"],
        }
        if "truncate" in target.params:
            out["truncate"] = target.params["truncate"]
        for key, value in body.items():
            if value is None or key in ("model", "input", "user"):
                continue
            if key == "dimensions":
                out["output_dimension"] = value
            elif key == "encoding_format":
                if value not in ("float", "base64"):
                    raise self._refuse("encoding_format", "use 'float' or 'base64'.")
            else:
                raise self._refuse(key, "it has no Cohere equivalent.")
        return out


def _named_function(choice: Any) -> str | None:
    """The function an OpenAI `tool_choice` names (`{"type": "function", "function": {"name"}}`), or None."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _content(content: Any, where: str, kinds: tuple[str, ...]) -> str | list[dict[str, Any]]:
    """A message's content in Cohere's form: a string as is, OpenAI parts as Cohere parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{where}.content' must be a string or an array of parts.", param=f"{where}.content"
        )
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise InvalidRequest(
                f"Content part type {kind!r} is not supported by Cohere in '{where}' "
                f"(allowed: {', '.join(kinds)}).",
                param=f"{where}.content[{i}]",
            )
        if kind == "image_url":
            parts.append({"type": "image_url", "image_url": part.get("image_url")})
        else:
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            parts.append({"type": "text", "text": text})
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{where}' must be an array.", param=where)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequest(f"'{where}[{i}]' must be a function tool call.", param=f"{where}[{i}]")
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": function.get("arguments", "")},
            }
        )
    return out


ADAPTERS: dict[type[ProviderConfig], type[Adapter]] = {CohereConfig: CohereAdapter}
