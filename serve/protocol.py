"""The OpenAI-compatible wire format: request bodies (validated strictly) and typed responses.

Requests: pydantic models with ``strict`` (``"0.5"`` is not a temperature, ``true`` is not a max_tokens) and
``extra="forbid"`` (a misspelt or unsupported field is refused by name rather than silently ignored). Responses:
the fields OpenAI always sends are sent, null or not (``content`` of a tool-call message, ``logprobs``); a model's
``_optional`` fields are left out when None (``citations`` without documents, ``usage`` of most chunks).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# vLLM accepts any int64 seed (negative ones included); Python ints beyond it are refused by name.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


# ------------------------------------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    # strict: "0.5" is not a temperature and true is not a max_tokens; forbid: a misspelt or unsupported field is
    # refused by name rather than silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's format)


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict | None = None  # JSON schema of the arguments
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    documents: list[dict[str, str]] | None = None
    citation_mode: Literal["accurate", "fast"] = "accurate"


class CompletionRequest(SamplingFields):
    prompt: str | list[int]


# ----------------------------------------------------------------------------------------------------- responses


class Reply(BaseModel):
    _optional: ClassVar[frozenset[str]] = frozenset()  # fields left out of the JSON when None

    @model_serializer(mode="wrap")
    def _leave_out_optional_nones(self, handler):
        return {k: v for k, v in handler(self).items() if not (v is None and k in self._optional)}

    def dump(self) -> dict:
        return self.model_dump(mode="json")


class ErrorInfo(Reply):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Reply):
    error: ErrorInfo


class Health(Reply):
    status: Literal["ok"] = "ok"
    active: int  # requests in a batch row
    waiting: int  # requests waiting for one


class PromptTokensDetails(Reply):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache instead of a prefill


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ModelCard(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_context: int


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FunctionCallOut(Reply):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCallOut(Reply):
    _optional = frozenset({"index"})
    index: int | None = None  # streamed tool calls only: which call of the list a delta extends
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class CitationOut(Reply):
    start: int  # content[start:end] == text
    end: int
    text: str
    document_ids: list[int]  # 0-based positions in the request's documents


class ChatMessage(Reply):
    _optional = frozenset({"tool_calls", "citations"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    citations: list[CitationOut] | None = None  # extension: with documents


class ChatDelta(Reply):
    _optional = frozenset({"role", "content", "tool_calls", "citations"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    citations: list[CitationOut] | None = None


class ChatChoice(Reply):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: str


class ChatChunkChoice(Reply):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletion(Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Reply):
    _optional = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(Reply):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(Reply):
    _optional = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
