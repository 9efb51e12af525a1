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


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: Optional[int] = Field(None, ge=1, description="default 16")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None


class ChatMessage(_Strict):
    role: str
    content: str
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="max_tokens' newer name; give one of them")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length", "cancelled"]]
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
    error: Optional[str] = None
    running: Optional[int] = None
    waiting: Optional[int] = None


REQUEST_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
