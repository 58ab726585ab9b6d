"""What the conversation log keeps of one exchange (`keys.conversations()`), written by the controller with
`--log-conversations` and read by `llava-serve export`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from contract.messages import WIRE_VERSION, JobMessage, SamplingParams, Timings, Usage


class ConversationRecord(BaseModel):
    """One finished, failed or cancelled exchange: the conversation sent (images as sha256 digests of bytes kept
    under `keys.image()` as long as the log keeps the record), the reply, and who asked. Never an API key itself."""

    version: int = WIRE_VERSION
    record_id: str | None = Field(default=None, description="the stream entry id; set when read back")
    job_id: str
    model: str
    endpoint: str = Field(description="the path the request came to, e.g. /v1/chat/completions")
    messages: list[JobMessage] | None = Field(default=None, description="the conversation so far (chat endpoints)")
    prompt: str | None = Field(default=None, description="the templated prompt (legacy and LLaVA endpoints)")
    images: list[str] = Field(default_factory=list, description="sha256 digests, in prompt order")
    params: SamplingParams = Field(default_factory=SamplingParams)
    reply: str = Field(default="", description="the text generated, whole or up to the error or cancel")
    finish_reason: str = Field(description="stop, length, eos, cancelled, or error")
    error_code: str | None = None
    error_message: str | None = None
    usage: Usage | None = None
    timings: Timings = Field(default_factory=Timings, description="enqueued, started, first token, finished")
    api_key_name: str | None = Field(default=None, description="`key-` + the start of the key's sha256")
    client_address: str
    end_user: str | None = Field(default=None, description="the end user a trusted front end named (the web page)")
