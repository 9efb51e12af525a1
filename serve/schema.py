"""The HTTP API as typed models, for `/openapi.json` (and `/docs`) only.

Requests are validated by `serve/protocol.py`, which names the wrong field in OpenAI's error shape; these models
describe the same fields so tools (client generators, schemathesis) can read the API. A test holds the two to the
same field names.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from neodeploy.runtime.sampling import MAX_LOGPROBS
from neodeploy.serve.protocol import MAX_N, MAX_STOPS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are refused by name


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class JsonSchemaFormat(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: Optional[JsonSchemaFormat] = Field(None, description="with type json_schema")
    regex: Optional[str] = Field(None, description="extension, with type regex")
    grammar: Optional[str] = Field(None, description="extension, with type grammar: a Lark grammar")


class _Sampling(_Strict):
    model: str = Field(description="the served model's id (GET /v1/models)")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, description="extension: 0 disables it")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="extension: transformers' rule; 1 disables it")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"a string or up to {MAX_STOPS} strings")
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = Field(None, description="needs stream: true")
    user: Optional[str] = Field(None, description="accepted, not used")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id -> bias in [-100, 100]")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="extension")
    response_format: Optional[ResponseFormat] = None
    store: Optional[Literal[False]] = Field(None, description="accepted at its neutral value only")
    metadata: Optional[dict] = Field(None, description="accepted empty only")
    service_tier: Optional[Literal["auto", "default"]] = None
    reasoning_effort: Optional[None] = None
    suffix: Optional[Literal[""]] = None
    audio: Optional[None] = None
    modalities: Optional[list[Literal["text"]]] = None
    prediction: Optional[None] = None
    web_search_options: Optional[None] = None
    functions: Optional[list[None]] = Field(None, description="legacy: accepted empty only; use tools")
    function_call: Optional[None] = None
    length_penalty: Optional[Literal[1]] = None
    parallel_tool_calls: Optional[bool] = Field(None, description="accepted; a response holds at most one call")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: Optional[int] = Field(None, ge=1, description="default 16")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="only equal to n")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class FunctionSpec(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="max_tokens' newer name; give one of them")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length", "cancelled"]]
    logprobs: Optional[dict] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length", "cancelled", "tool_calls"]]
    logprobs: Optional[dict] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    neodeploy: Optional[dict] = Field(None, description="the model's facts: family, parameters, precision, target, "
                                      "backend, chat_template, check")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["loading", "ready", "failed", "draining"]
    model: str
    check: Optional[dict]
    api_key_required: bool
    error: Optional[str] = None
    running: Optional[int] = None
    waiting: Optional[int] = None


class TokenizeRequest(_Strict):
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[int]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Text(BaseModel):
    prompt: str


REQUEST_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
