"""Cheap bounds checked before costly work whose size the client controls: how much prompt text a model's context
can hold, in characters, checked by the controller (from its workers' `context_length`) and by the worker before it
templates or tokenizes anything."""

from __future__ import annotations

from contract.errors import PayloadTooLarge
from contract.messages import JobMessage, JobText

# Characters one token may stand for, generously: real text averages 3 to 5 characters per token in the tokenizers
# of the models served here, and the longest merges (runs of spaces or punctuation) are 16 to 32 characters. A
# prompt longer than this many characters per context token cannot fit the context, whatever it says.
CHARS_PER_TOKEN_BOUND = 32


def max_prompt_chars(context_tokens: int) -> int:
    """The most prompt text, in characters, that a context of `context_tokens` tokens could hold."""
    return CHARS_PER_TOKEN_BOUND * max(context_tokens, 1)


def check_prompt_chars(chars: int, context_tokens: int | None, model: str | None = None) -> None:
    """PayloadTooLarge (413) naming the limit when `chars` characters of prompt text cannot fit a context of
    `context_tokens` tokens; nothing is checked when the context is unknown (None)."""
    if context_tokens is None:
        return
    limit = max_prompt_chars(context_tokens)
    if chars > limit:
        whose = f"model {model!r}" if model else "the model"
        raise PayloadTooLarge(
            f"prompt text is {chars} characters, over the limit of {limit} characters for {whose} "
            f"({CHARS_PER_TOKEN_BOUND} characters per token x its context of {context_tokens} tokens)"
        )


def job_text_chars(messages: list[JobMessage] | None, prompt: str | None) -> int:
    """Characters of text in a job's prompt or messages (images left out)."""
    if prompt is not None:
        return len(prompt)
    return sum(len(part.text) for message in messages or [] for part in message.content if isinstance(part, JobText))
