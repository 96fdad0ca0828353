"""A loopback stand-in for Azure OpenAI, built on `MockOpenAI` (same server, Azure's wire format).

Azure serves OpenAI's API per deployment, keyed by an `api-key` header and an
`api-version` query parameter:

    POST /openai/deployments/{deployment}/chat/completions?api-version=2024-10-21
    POST /openai/deployments/{deployment}/completions?api-version=...
    POST /openai/deployments/{deployment}/embeddings?api-version=...
    POST /openai/deployments/{deployment}/images/generations?api-version=...

As the real service does (inference spec `stable/2024-10-21`, and answers seen from it):
- a missing `api-key` or a wrong one is a 401 `{"error": {"code": "401", "message": "Access denied…"}}`;
- no `api-version` is a 404 "Resource not found", an unknown one a 400 "API version not supported";
- an unknown deployment is a 404 `DeploymentNotFound`, an operation the deployment's model
  cannot do a 400 `OperationNotSupported`;
- answers name the deployment's model (`gpt-4o-2024-08-06`), not the deployment, and carry
  `prompt_filter_results` and per-choice `content_filter_results`; a stream starts with the
  prompt-filter event (`choices: []`, `"object": ""`), and a deployment with the asynchronous
  filter also sends annotation events (`content_filter_offsets`, no `delta`); events are compact
  JSON, as Azure writes them; every answer carries Azure's `apim-request-id` and `x-ms-region`;
- `mock.filter_prompt(...)` answers Azure's content-filter 400, `mock.throttle(...)` its 429
  with `retry-after` and `retry-after-ms`; `behave(status=...)` uses Azure's error bodies.

On Your Data (`data_sources`, api-version 2024-02-01 and later): the array must hold one
source of a known `type` with `parameters` (else Azure's 400), `logprobs` is refused beside
it, and the answer is shaped as Azure shapes it: `object` "extensions.chat.completion"
(streamed: "extensions.chat.completion.chunk"), the assistant message's `context` with one
citation from the source's `index_name` and the `intent` (a JSON list of the search
queries: here the last user message), and `end_turn`; a stream carries the `context`
in the first delta, beside the role.

Chat requests with `tools` get a tool call (to `tool_choice`'s function, else the first
tool) whose arguments fill the function's first parameter with the last user message; a
conversation that ends with a tool result is answered by echoing that result. Everything
else (echo answers, embeddings, images, `behave` rules matched on the body's `model`,
which the gateway and the `AzureOpenAI` client both set to the deployment name) is
`MockOpenAI`'s.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs

from tests.mock_openai import Behaviour, Connection, MockOpenAI, RecordedRequest, prompt_tokens

API_KEY = "azure-upstream-key-0f1e2d3c4b5a69788796a5b4"
# GA and preview versions the deployment-based API accepts (a sample: the real list is longer).
API_VERSIONS = frozenset(
    {"2024-02-01", "2024-06-01", "2024-10-21", "2024-12-01-preview", "2025-04-01-preview"}
)


# On Your Data's source types (inference spec 2024-10-21; elasticsearch, pinecone and mongo_db in previews).
DATA_SOURCE_TYPES = frozenset({"azure_search", "azure_cosmos_db", "elasticsearch", "pinecone", "mongo_db"})


@dataclass(frozen=True)
class Deployment:
    model: str  # the model behind the deployment, named in every answer
    operations: frozenset[str]  # the paths its model serves, e.g. {"chat/completions"}
    async_filter: bool = False  # the asynchronous content filter (annotation events in streams)


CHAT = frozenset({"chat/completions"})
DEPLOYMENTS = {
    "chat-dep": Deployment("gpt-4o-2024-08-06", CHAT),
    "chat-async": Deployment("gpt-4o-mini-2024-07-18", CHAT, async_filter=True),
    "instruct-dep": Deployment("gpt-35-turbo-instruct", frozenset({"completions"})),
    "embed-dep": Deployment("text-embedding-3-small", frozenset({"embeddings"})),
    "image-dep": Deployment("dall-e-3", frozenset({"images/generations"})),
}

_PATH = re.compile(
    r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings|images/generations)$"
)
_SAFE = {"filtered": False, "severity": "safe"}
_UNDETECTED = {"filtered": False, "detected": False}
PROMPT_FILTER = {
    "hate": _SAFE,
    "jailbreak": _UNDETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
CHOICE_FILTER = {
    "hate": _SAFE,
    "protected_material_code": _UNDETECTED,
    "protected_material_text": _UNDETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
IMAGE_FILTER = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}

# Error bodies as Azure words them (its own shape: a code and a message).
ERRORS: dict[int, dict[str, Any]] = {
    401: {
        "code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
        "provide a valid key for an active subscription and use a correct regional API endpoint for your "
        "resource.",
    },
    403: {
        "code": "AuthenticationTypeDisabled",
        "message": "Key based authentication is disabled for this resource.",
    },
    404: {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
    },
    429: {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
        "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds.",
    },
    500: {
        "code": "InternalServerError",
        "message": "Backend returned unexpected response. Please contact Microsoft for help.",
    },
    503: {
        "code": "ServiceUnavailable",
        "message": "The service is temporarily unable to process your request. Please try again later.",
    },
}
_MISSING_KEY = (
    "Access denied due to missing subscription key. Make sure to include subscription key when making "
    "requests to an API."
)
CONTENT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read "
    "our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)


def azure_error(status: int, **fields: Any) -> bytes:
    """Azure's error body for `status`, with `fields` over the defaults."""
    return json.dumps(
        {"error": {**ERRORS.get(status, {"code": str(status), "message": "Error"}), **fields}}
    ).encode()


def content_filter_error(category: str = "violence", severity: str = "high") -> bytes:
    """The 400 Azure answers when the prompt trips its content filter on `category`."""
    results = {**PROMPT_FILTER, category: {"filtered": True, "severity": severity}}
    if category == "jailbreak":
        results[category] = {"filtered": True, "detected": True}
    error = {
        "message": CONTENT_FILTER_MESSAGE,
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": results},
    }
    return json.dumps({"error": error}).encode()


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class MockAzure(MockOpenAI):
    """The server. `url` is the resource endpoint (`azure_endpoint` for the SDK, `base_url` for the gateway)."""

    def __init__(
        self,
        api_key: str = API_KEY,
        host: str = "127.0.0.1",
        deployments: dict[str, Deployment] | None = None,
    ) -> None:
        super().__init__(api_key, host)
        self.deployments = dict(DEPLOYMENTS if deployments is None else deployments)

    @property
    def base_url(self) -> str:
        return self.url

    def filter_prompt(self, deployment: str, category: str = "violence", severity: str = "high") -> Behaviour:
        """Requests to `deployment` trip the content filter (400 `content_filter`)."""
        return self.behave(model=deployment, status=400, body=content_filter_error(category, severity))

    def throttle(self, deployment: str, retry_after: int = 6) -> Behaviour:
        """Requests to `deployment` are throttled (429) with Azure's retry headers."""
        headers = [
            ("retry-after", str(retry_after)),
            ("retry-after-ms", str(retry_after * 1000)),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "0"),
        ]
        return self.behave(model=deployment, status=429, headers=headers)


class AzureConnection(Connection):
    mock: MockAzure

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._answer: _Answer | None = None  # set while route() answers an inference request

    async def check_auth(self, request: RecordedRequest) -> bool:
        key = request.header("api-key")
        if key == self.mock.api_key:
            return True
        message = _MISSING_KEY if key is None else ERRORS[401]["message"]
        await self._send_json(401, azure_error(401, message=message))
        return False

    def error_body(self, status: int, fields: dict[str, Any]) -> bytes:
        return azure_error(status, **fields)

    async def route(self, request: RecordedRequest, payload: Any, behaviour: Behaviour | None) -> None:
        match = _PATH.match(request.path)
        versions = parse_qs(request.query).get("api-version")
        if request.method != "POST" or match is None or not versions:
            await self._send_json(404, azure_error(404, code="404", message="Resource not found"))
            return
        if versions[-1] not in API_VERSIONS:
            await self._send_json(
                400, azure_error(400, code="BadRequest", message="API version not supported")
            )
            return
        name, operation = match.groups()
        deployment = self.mock.deployments.get(name)
        if deployment is None:
            await self._send_json(404, azure_error(404))
            return
        if operation not in deployment.operations:
            message = (
                f"The {operation.split('/')[0]} operation does not work with the specified model, "
                f"{deployment.model}. Please choose different model and try again."
            )
            await self._send_json(400, azure_error(400, code="OperationNotSupported", message=message))
            return
        if isinstance(payload, dict):
            # Azure routes on the URL: the body's model is optional and ignored.
            payload = {**payload, "model": name}
        stream = isinstance(payload, dict) and payload.get("stream") is True
        context = None
        if isinstance(payload, dict) and "data_sources" in payload:
            problem = _data_sources_problem(payload)
            if problem is not None:
                await self._send_json(400, azure_error(400, code="BadRequest", message=problem))
                return
            context = on_your_data_context(payload)
        self._answer = _Answer(deployment, stream, context)
        try:
            if isinstance(payload, dict) and operation == "chat/completions" and payload.get("tools"):
                messages: list[Any] = payload.get("messages") or []
                last = messages[-1] if isinstance(messages, list) and messages else None
                if isinstance(last, dict) and last.get("role") == "tool":
                    # Answer the tool result by echoing it, through the ordinary chat path.
                    payload = {
                        **payload,
                        "messages": [*messages, {"role": "user", "content": last.get("content")}],
                    }
                elif isinstance(last, dict):
                    await self._tool_call(payload, stream)
                    return
            await super().route(replace(request, path=f"/v1/{operation}"), payload, behaviour)
        finally:
            self._answer = None

    async def _tool_call(self, payload: dict[str, Any], stream: bool) -> None:
        ident = self.mock._next_id()
        call = tool_call(payload, ident)
        base = {"id": f"chatcmpl-mock{ident}", "created": int(time.time()), "model": payload["model"]}
        usage = {"prompt_tokens": prompt_tokens(payload), "completion_tokens": 1, "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + 1
        if not stream:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            await self._send_json(200, json.dumps(answer).encode())
            return
        include_usage = (payload.get("stream_options") or {}).get("include_usage") is True
        arguments = call["function"]["arguments"]
        opening = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **opening}]}, None),
            *(
                ({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 7]}}]}, None)
                for i in range(0, len(arguments), 7)
            ),
            ({}, "tool_calls"),
        ]
        await self._send_head(200, [("content-type", "text/event-stream; charset=utf-8")])
        for delta, finish in deltas:
            chunk: dict[str, Any] = {**base, "object": "chat.completion.chunk"}
            chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if include_usage:
                chunk["usage"] = None
            await self._send_data(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if include_usage:
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await self._send_data(b"data: " + json.dumps(final).encode() + b"\n\n")
        await self._send_data(b"data: [DONE]\n\n")
        await self._send_end()

    # MockOpenAI writes OpenAI's answers through these; Azure's additions go in on the way out.

    async def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        # Azure's own tracing and placement headers, which a gateway has no reason to relay.
        azure = [("apim-request-id", f"apim-{self.mock._next_id():08d}"), ("x-ms-region", "Sweden Central")]
        await super()._send_head(status, [*azure, *headers])

    async def _send_json(
        self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        if status == 200 and self._answer is not None:
            body = self._answer.json(body)
        extra = list(headers or [])
        if status == 429 and not any(k == "retry-after-ms" for k, _ in extra):
            extra += [("retry-after", "1"), ("retry-after-ms", "1000")]
        await super()._send_json(status, body, extra)

    async def _send_data(self, data: bytes) -> None:
        if self._answer is not None and self._answer.stream and data.startswith(b"data: {"):
            data = b"".join(self._answer.events(data))
        await super()._send_data(data)


class _Answer:
    """Turns the OpenAI answer MockOpenAI wrote for one request into what Azure sends."""

    def __init__(self, deployment: Deployment, stream: bool, context: dict[str, Any] | None = None) -> None:
        self.deployment = deployment
        self.stream = stream
        self.context = context  # On Your Data's citations and intent, when the request named a source
        self.sent = 0  # answer chunks so far (stream)
        self.text = 0  # characters of content so far, for the async filter's offsets

    def json(self, body: bytes) -> bytes:
        answer = json.loads(body)
        self._rebrand(answer)
        if "choices" in answer:
            answer["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": PROMPT_FILTER}]
            for choice in answer["choices"]:
                choice["content_filter_results"] = CHOICE_FILTER
                if self.context is not None:
                    choice["message"].update(end_turn=True, context=self.context)
            if self.context is not None:
                answer["object"] = "extensions.chat.completion"
        elif answer.get("data") and "embedding" not in answer["data"][0]:
            for image in answer["data"]:
                image["content_filter_results"] = IMAGE_FILTER
                image["prompt_filter_results"] = PROMPT_FILTER
        return json.dumps(answer).encode()

    def events(self, data: bytes) -> list[bytes]:
        """One OpenAI stream event in, Azure's events out (the chunk, and what Azure adds around it)."""
        chunk = json.loads(data.removeprefix(b"data: "))
        if "error" in chunk:
            return [data]
        self._rebrand(chunk)
        out = []
        if self.sent == 0:
            prompt = [{"prompt_index": 0, "content_filter_results": PROMPT_FILTER}]
            out.append(_annotation([], prompt_filter_results=prompt))
        self.sent += 1
        for choice in chunk["choices"]:
            piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            self.text += len(piece)
            # Azure rates each piece of content (synchronous filter); role and finish chunks carry `{}`.
            rated = bool(piece) and not self.deployment.async_filter
            choice["content_filter_results"] = CHOICE_FILTER if rated else {}
            if self.context is not None and "delta" in choice:
                if "role" in choice["delta"]:
                    choice["delta"]["context"] = self.context
                choice["end_turn"] = choice.get("finish_reason") is not None
        if self.context is not None:
            chunk["object"] = "extensions.chat.completion.chunk"
        out.append(b"data: " + _compact(chunk) + b"\n\n")
        finished = any(c.get("finish_reason") for c in chunk["choices"])
        if self.deployment.async_filter and chunk["choices"] and (self.sent == 2 or finished):
            offsets = {"check_offset": 0, "start_offset": 0, "end_offset": self.text}
            result = {"index": 0, "finish_reason": None, "content_filter_results": CHOICE_FILTER}
            out.append(_annotation([{**result, "content_filter_offsets": offsets}]))
        return out

    def _rebrand(self, answer: dict[str, Any]) -> None:
        # Azure names the deployment's model, and sends neither of these OpenAI-only fields.
        if "model" in answer:
            answer["model"] = self.deployment.model
        answer.pop("service_tier", None)
        answer.pop("obfuscation", None)


def _annotation(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    """An Azure-only stream event: no id, model or timestamp, and an empty `object`."""
    event = {"choices": choices, "created": 0, "id": "", "model": "", "object": "", **extra}
    return b"data: " + _compact(event) + b"\n\n"


def _data_sources_problem(payload: dict[str, Any]) -> str | None:
    """Azure's validation of On Your Data's request, worded as its 400s are, or None."""
    sources = payload["data_sources"]
    if not isinstance(sources, list) or len(sources) != 1:
        return "Validation error at #/data_sources: exactly one data source is supported."
    source = sources[0]
    if not isinstance(source, dict) or source.get("type") not in DATA_SOURCE_TYPES:
        return "Validation error at #/data_sources/0/type: unknown data source type."
    if not isinstance(source.get("parameters"), dict):
        return (
            f"Validation error at #/data_sources/0/{source['type']}/parameters: Required property not found."
        )
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "logprobs and top_logprobs are not supported with data_sources."
    return None


def on_your_data_context(payload: dict[str, Any]) -> dict[str, Any]:
    """The `context` On Your Data adds to the answer: one citation from the source, and the intent."""
    parameters = payload["data_sources"][0]["parameters"]
    index = str(parameters.get("index_name") or parameters.get("container_name") or "index")
    users = [m for m in payload.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
    question = users[-1].get("content") if users else ""
    question = question if isinstance(question, str) else ""
    citation = {
        "content": f"From {index}: notes on {question}",
        "title": f"{index}-doc1",
        "url": f"https://search.mock/{index}/doc1.md",
        "filepath": "doc1.md",
        "chunk_id": "0",
    }
    return {"citations": [citation], "intent": json.dumps([question])}


def tool_call(payload: dict[str, Any], ident: int) -> dict[str, Any]:
    """The call the mock makes: `tool_choice`'s function (else the first tool), its first parameter
    filled with the last user message."""
    tools: list[dict[str, Any]] = [
        t["function"] for t in payload["tools"] if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    choice = payload.get("tool_choice")
    wanted = choice["function"].get("name") if isinstance(choice, dict) and "function" in choice else None
    function: dict[str, Any] = next((f for f in tools if f.get("name") == wanted), tools[0] if tools else {})
    properties = list((function.get("parameters") or {}).get("properties") or {})
    users = [m for m in payload["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else ""
    arguments = {properties[0]: text} if properties else {}
    return {
        "id": f"call_mock{ident:06d}",
        "type": "function",
        "function": {"name": function.get("name", "tool"), "arguments": json.dumps(arguments)},
    }


MockAzure.connection_class = AzureConnection
