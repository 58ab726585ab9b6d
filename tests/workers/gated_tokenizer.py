"""A tokenizer wrapper for tests, named as what it is: it counts the tokenizations of the model's processor and
holds back any tokenization of a text containing `marker` until the test sets `release`, so a test controls a slow
preparation without sleeping."""

from __future__ import annotations

import threading
from typing import Any


class GatedTokenizer:
    """Wraps a tokenizer: `calls` counts calls; a text with `marker` sets `entered` and waits for `release`."""

    def __init__(self, tokenizer: Any, marker: str | None = None, hold_s: float = 120.0) -> None:
        self._tokenizer = tokenizer
        self.marker = marker
        self.hold_s = hold_s
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list | tuple) else []
        if self.marker is not None and any(isinstance(t, str) and self.marker in t for t in texts):
            self.entered.set()
            if not self.release.wait(self.hold_s):
                raise RuntimeError(f"the test never released the tokenization of a text with {self.marker!r}")
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)
