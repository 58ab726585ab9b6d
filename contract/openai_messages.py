"""OpenAI-compatible wire messages (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and OpenAI-shaped
error bodies.

Requests are validated here with the same limits as `GenerateRequest`, so errors name the OpenAI field
(`max_tokens`, not `max_new_tokens`); `to_generate_request` and `sampling_params` then map them onto the
controller's own request and job parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from contract.errors import InvalidRequest, LlavaError, ModelNotFound
from contract.messages import (
    MAX_NEW_TOKENS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    ChatMessage,
    ContentPart,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Usage,
)

DEFAULT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for legacy completions


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, `refusal`, ... are accepted and not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Fields that chat and legacy completions requests share; fields this server has no use for are ignored,
    unsupported values of the ones it knows are refused."""

    model_config = ConfigDict(extra="ignore")
    default_max_tokens: ClassVar[int] = DEFAULT_MAX_TOKENS
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        if value and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and value != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return value

    def sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        """The job's sampling parameters: `max_new_tokens`, else `max_tokens`, else the endpoint's default; OpenAI's
        defaults for the rest (temperature 1, top_p 1)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=max_new_tokens or self.max_tokens or self.default_max_tokens,
            stop=self.stop or [],
            seed=self.seed,
        )


class ChatCompletionRequest(OpenAIRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    def to_generate_request(self) -> GenerateRequest:
        """The same request as `POST /api/v1/generate` takes; OpenAI's defaults (temperature 1, top_p 1)."""
        messages = []
        for i, message in enumerate(self.messages):
            if message.content is None or message.content == []:
                raise InvalidRequest(f"invalid request: messages[{i}].content: must not be empty")
            role = "system" if message.role == "developer" else message.role
            messages.append(ChatMessage(role=role, content=message.content))
        sampling = self.sampling_params(self.max_completion_tokens)
        return GenerateRequest(model=self.model, messages=messages, **sampling.model_dump())


# Legacy completions fields whose other values this server cannot honour: the values it accepts, and why not.
_HONOURED_ONLY: dict[str, tuple[tuple[object, ...], str]] = {
    "echo": ((None, False), "only false is supported (the reply never repeats the prompt)"),
    "logprobs": ((None,), "log probabilities are not returned by this server; leave logprobs unset"),
    "best_of": ((None, 1), "only 1 is supported (one sampled completion per request)"),
    "suffix": ((None, ""), "insertion after a suffix is not supported; leave suffix unset"),
}


class CompletionRequest(OpenAIRequest):
    """Body of `POST /v1/completions` (OpenAI's legacy completions): one text prompt, sent to the model as is."""

    default_max_tokens: ClassVar[int] = DEFAULT_COMPLETION_MAX_TOKENS
    prompt: str = Field(description="the prompt, already templated (a string, or a list of exactly one string)")
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if value and all(isinstance(v, (int, list)) for v in value):
            raise ValueError("token arrays are not supported; send the prompt as text")
        raise ValueError(f"one prompt per request: a string or a list of exactly one string, not {len(value)}")

    @field_validator("echo", "logprobs", "best_of", "suffix", mode="before")
    @classmethod
    def _only_honoured_values(cls, value: object, info: ValidationInfo) -> object:
        accepted, why = _HONOURED_ONLY[str(info.field_name)]
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            raise ValueError(why)
        return value


# ---- Responses ----------------------------------------------------------------------------------------------


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI knows stop and length; an end-of-sequence token is a `stop`, and so is a cancelled job."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.length else "stop"


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> CompletionUsage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}  # OpenAI leaves unset delta fields out


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(BaseModel):
    """A legacy completion, and also each chunk of its stream (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-serve"


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- Errors -------------------------------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def openai_status(error: LlavaError) -> int:
    """OpenAI answers a malformed request with 400, where the controller's own API says 422."""
    return 400 if error.status_code == 422 else error.status_code


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _param(error: LlavaError) -> str | None:
    fields = getattr(error, "fields", None)
    if fields:
        return fields[0].get("field")
    if isinstance(error, ModelNotFound):
        return "model"
    return getattr(error, "param", None)


def openai_error(error: LlavaError, *, status: int | None = None) -> OpenAIError:
    """The OpenAI error body of `error`: `{"error": {"message", "type", "param", "code"}}`."""
    status = openai_status(error) if status is None else status
    return OpenAIError(
        error=OpenAIErrorDetail(message=error.message, type=_error_type(status), param=_param(error), code=error.code)
    )


def openai_error_from_event(code: str, message: str, status: int) -> OpenAIError:
    """The same body for an error that arrived as a stream event."""
    return OpenAIError(error=OpenAIErrorDetail(message=message, type=_error_type(status), code=code))
