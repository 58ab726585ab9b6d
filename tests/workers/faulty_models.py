"""Model wrappers for fault tests: they call the real model, except on the inputs they are told to fail."""

from __future__ import annotations

import torch


class ModelRaisingOnMarkedToken:
    """A model wrapper for fault tests: a forward whose `input_ids` hold `token_id` raises `error` (in prefills or
    in decode steps, as `stage` says); every other call goes to the model."""

    def __init__(self, model, token_id: int, stage: str, error: Exception) -> None:
        self.model, self.token_id, self.stage, self.error = model, token_id, stage, error
        self.raised = 0

    def __call__(self, **kwargs):
        ids = kwargs["input_ids"]
        stage = "prefill" if ids.shape[1] > 1 else "decode"
        if stage == self.stage and bool((ids == self.token_id).any()):
            self.raised += 1
            raise self.error
        return self.model(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class ModelOutOfMemoryOnBatches:
    """A model wrapper for fault tests: a prefill of more than one row runs out of memory."""

    def __init__(self, model) -> None:
        self.model = model
        self.raised = 0

    def __call__(self, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and kwargs["input_ids"].shape[0] > 1:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class ModelOutOfMemoryOnDecodesOver:
    """A model wrapper for fault injection: a decode step over more than `rows` rows runs out of memory (as a step
    over a batch too large for the device does); prefills and smaller steps go to the model."""

    def __init__(self, model, rows: int) -> None:
        self.model, self.rows = model, rows
        self.raised = 0

    def __call__(self, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1 and ids.shape[0] > self.rows:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)
