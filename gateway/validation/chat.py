"""POST /v1/chat/completions: the request schema (OpenAI's Chat Completions reference).

Messages are a tagged union on `role`, content parts on `type`, tools and tool calls
on `type`: an unknown role is refused with the field's path (`messages[0].role`); a
part of a type OpenAI does not document (vLLM's `video_url`) is another provider's
and passes unchecked (`validate.py`). Each role takes the content every role may carry in some
provider (a text, or an array of text/image_url/input_audio/file/refusal parts):
which role may carry which part is the upstream's rule, since providers differ
(an image inside a tool result is valid for Anthropic, not for OpenAI).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from gateway.validation.fields import (
    JSONObject,
    Logprobs,
    Name,
    OutputTokens,
    Sampling,
    Schema,
)

# -- content parts --------------------------------------------------------------------------------


class Part(Schema, tag_field="type"):
    pass


class TextPart(Part, tag="text"):
    text: str


class ImageURL(Schema):
    url: str
    detail: str | None = None


class ImagePart(Part, tag="image_url"):
    image_url: ImageURL


class InputAudio(Schema):
    data: str
    format: str


class AudioPart(Part, tag="input_audio"):
    input_audio: InputAudio


class FileRef(Schema):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(Part, tag="file"):
    file: FileRef


class RefusalPart(Part, tag="refusal"):
    refusal: str


AnyPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
PART_TYPES = frozenset(str(p.__struct_config__.tag) for p in AnyPart.__args__)  # type: ignore[attr-defined]
Content = str | Annotated[list[AnyPart], Meta(min_length=1)]
# An assistant turn may carry no content (a call); some clients say so with [] rather than null.
AssistantContent = str | list[AnyPart]

# -- tool calls an assistant message carries ------------------------------------------------------


class CalledFunction(Schema):
    name: str
    arguments: str


class CalledCustom(Schema):
    name: str
    input: str


class ToolCall(Schema, tag_field="type"):
    id: str


class FunctionToolCall(ToolCall, tag="function"):
    function: CalledFunction


class CustomToolCall(ToolCall, tag="custom"):
    custom: CalledCustom


class AudioRef(Schema):
    id: str


# -- messages -------------------------------------------------------------------------------------


class Message(Schema, tag_field="role"):
    name: str | None = None


class SystemMessage(Message, tag="system", kw_only=True):
    content: Content


class DeveloperMessage(Message, tag="developer", kw_only=True):
    content: Content


class UserMessage(Message, tag="user", kw_only=True):
    content: Content


class AssistantMessage(Message, tag="assistant", kw_only=True):
    content: AssistantContent | None = None
    refusal: str | None = None
    tool_calls: list[FunctionToolCall | CustomToolCall] | None = None
    function_call: CalledFunction | None = None
    audio: AudioRef | None = None

    def __post_init__(self) -> None:
        # OpenAI: content is required unless the turn is a call (or a stored audio or refusal answer).
        if (
            self.content is None
            and self.tool_calls is None
            and self.function_call is None
            and self.audio is None
            and self.refusal is None
        ):
            raise ValueError("Object missing required field `content`")  # msgspec's words: one translation


class ToolMessage(Message, tag="tool", kw_only=True):
    content: Content
    tool_call_id: str


class FunctionMessage(Message, tag="function", kw_only=True):
    content: str | None
    name: str


AnyMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage

# -- tools and the choice among them --------------------------------------------------------------


class FunctionDefinition(Schema):
    name: Name
    description: str | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class CustomDefinition(Schema):
    name: str
    description: str | None = None
    format: JSONObject | None = None


class Tool(Schema, tag_field="type"):
    pass


class FunctionTool(Tool, tag="function"):
    function: FunctionDefinition


class CustomTool(Tool, tag="custom"):
    custom: CustomDefinition


class Named(Schema):
    name: str


class Choice(Schema, tag_field="type"):
    pass


class NamedFunction(Choice, tag="function"):
    function: Named


class NamedCustom(Choice, tag="custom"):
    custom: Named


class AllowedTools(Schema):
    mode: Literal["auto", "required"]
    tools: list[JSONObject]


class AllowedToolsChoice(Choice, tag="allowed_tools"):
    allowed_tools: AllowedTools


ToolChoice = Literal["none", "auto", "required"] | NamedFunction | NamedCustom | AllowedToolsChoice

# -- response_format ------------------------------------------------------------------------------


class JSONSchema(Schema):
    name: Name
    description: str | None = None
    schema: JSONObject | None = None
    strict: bool | None = None


class ResponseFormat(Schema, tag_field="type"):
    pass


class TextFormat(ResponseFormat, tag="text"):
    pass


class JSONObjectFormat(ResponseFormat, tag="json_object"):
    pass


class JSONSchemaFormat(ResponseFormat, tag="json_schema"):
    json_schema: JSONSchema


# -- the request ----------------------------------------------------------------------------------


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[AnyMessage], Meta(min_length=1)]
    max_tokens: OutputTokens | None = None
    max_completion_tokens: OutputTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    tools: list[FunctionTool | CustomTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # deprecated for tools, still sent
    function_call: Literal["none", "auto"] | Named | None = None  # deprecated for tool_choice
    response_format: TextFormat | JSONObjectFormat | JSONSchemaFormat | None = None
