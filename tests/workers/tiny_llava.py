"""One tiny LLaVA per test session, built locally and loaded through the real code path (float32, CPU)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from workers.model import LoadedModel, load_model
from workers.tiny_model import ensure_tiny_model


@functools.cache
def tiny_model_path() -> Path:
    root = Path(tempfile.mkdtemp(prefix="llava-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return ensure_tiny_model(root)


@functools.cache
def tiny_loaded() -> LoadedModel:
    return load_model(str(tiny_model_path()), device="cpu", dtype="float32")
