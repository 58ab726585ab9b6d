"""Parsing JSON request bodies without stalling the event loop, and within a bound on the work a body may ask for.

A body over `inline_max_bytes` is parsed in a small pool of spawned processes: JSON parsing and validation hold the
GIL, so a thread would stall the loop just the same (a 60 MB prompt, or a body of a million small values, takes from
a fifth of a second to many seconds). Such a body reaches its process through a temporary file written off the loop,
not pickled: writing a file releases the GIL, copying 60 MB in memory holds it (about 45 ms).

Before it is parsed, every body's JSON values are counted from its raw bytes (C-speed byte scans, no objects built);
more than `max_values` is refused with 413. A body that does not validate is refused with 422 listing at most
`MAX_REPORTED_ERRORS` of its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from broker.validation import field_errors, read_chunks
from contract.errors import InvalidRequest, LlavaError, PayloadTooLarge, RequestInvalid
from infra.settings import ControllerSettings

M = TypeVar("M", bound=BaseModel)

MAX_REPORTED_ERRORS = 100

# Bytes that make up numbers and literals (true, false, null) outside strings, mapped to `a`; all else to a space.
_SCALAR_TABLE = bytes(
    ord("a") if chr(i).isascii() and (chr(i).isalnum() or chr(i) in "+-.") else ord(" ") for i in range(256)
)


def count_json_values(body: bytes, stop_above: int | None = None) -> int:
    """The JSON values in `body`: arrays, objects, strings, numbers, true/false/null (object keys are not values).
    Counted from the bytes without parsing; for malformed JSON the count is an estimate. With `stop_above`, any
    number over it may come back as soon as the count is known to pass it."""
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes out of the way: every `"` left is a delimiter
    strings = plain.count(b'"') // 2  # keys included
    if stop_above is not None and strings > 2 * stop_above + 1:
        return strings // 2  # each key has a value: at least half of the strings are values
    outside = b"".join(_between_strings(plain))  # brackets, separators, numbers, literals
    keys = outside.count(b":")
    containers = outside.count(b"[") + outside.count(b"{")
    scalars = outside.translate(_SCALAR_TABLE)
    runs = scalars.count(b" a") + scalars.startswith(b"a")
    return containers + strings - keys + runs


def _between_strings(plain: bytes) -> list[bytes]:
    """The pieces of `plain` outside its strings (without copying what is inside them, which may be 60 MB)."""
    pieces = []
    start = 0
    while True:
        opening = plain.find(b'"', start)
        if opening < 0:
            pieces.append(plain[start:])
            return pieces
        pieces.append(plain[start:opening])
        closing = plain.find(b'"', opening + 1)
        if closing < 0:
            return pieces
        start = closing + 1


def invalid_fields(errors: list[dict[str, Any]]) -> RequestInvalid:
    """The 422 of pydantic's `errors`, listing at most `MAX_REPORTED_ERRORS` of them (and saying how many more)."""
    return RequestInvalid(field_errors(errors[:MAX_REPORTED_ERRORS]), total=len(errors))


def parse_body(body: bytes, model: type[M], max_values: int) -> M:
    """`body` validated as `model`: 413 over `max_values` JSON values, 422 naming the bad fields. Runs anywhere
    (inline for small bodies, in a pool process for large ones)."""
    values = count_json_values(body, stop_above=max_values)
    if values > max_values:
        raise PayloadTooLarge(
            f"request body has {values} or more JSON values (arrays, objects, strings, numbers, literals), over "
            f"the limit of {max_values} (max_body_values)"
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_fields(exc.errors(include_url=False)) from None


def parse_file(path: str, model: type[M], max_values: int) -> M:
    """`parse_body` of the body in the file at `path` (run in a pool process)."""
    with open(path, "rb") as file:
        return parse_body(file.read(), model, max_values)


def spill(chunks: list[bytes]) -> str:
    """Write a body's chunks to a new temporary file (each write releases the GIL); returns its path."""
    fd, path = tempfile.mkstemp(prefix="llava-body-")
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


class BodyParser:
    """Reads and parses request bodies for every route; `close()` stops its processes (the app's lifespan does)."""

    def __init__(
        self, *, max_bytes: int, max_values: int, inline_max_bytes: int = 64 * 1024, processes: int = 2
    ) -> None:
        self.max_bytes = max_bytes
        self.max_values = max_values
        self.inline_max_bytes = inline_max_bytes
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> BodyParser:
        return cls(
            max_bytes=settings.max_body_bytes,
            max_values=settings.max_body_values,
            inline_max_bytes=settings.body_inline_max_bytes,
            processes=settings.body_parse_processes,
        )

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Spawned, not forked: a fork of a process running an event loop and threads inherits their locks.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=context)
        return self._pool

    async def read(self, request: Request, model: type[M]) -> M:
        """Read the request's body (413 past `max_bytes`) and parse it as `model` (`parse_body`)."""
        chunks = await read_chunks(request, self.max_bytes)
        if not any(chunk.strip() for chunk in chunks):
            raise InvalidRequest("invalid request: body: a JSON object is required")
        return await self.parse(chunks, model)

    async def parse(self, body: bytes | list[bytes], model: type[M]) -> M:
        """`parse_body` of `body` (or its chunks), inline up to `inline_max_bytes`, else in a pool process."""
        chunks = [body] if isinstance(body, bytes) else body
        if sum(len(chunk) for chunk in chunks) <= self.inline_max_bytes:
            return parse_body(b"".join(chunks), model, self.max_values)
        path = await anyio.to_thread.run_sync(spill, chunks)
        try:
            return await self._parse_file(path, model)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _parse_file(self, path: str, model: type[M]) -> M:
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, parse_file, path, model, self.max_values)
        except BrokenProcessPool as exc:  # a parser process died (killed, out of memory): start afresh next time
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise LlavaError(f"the request body could not be parsed: a parser process died ({exc}); retry") from None

    def process_ids(self) -> list[int]:
        """Pids of the pool's processes now (none before the first large body)."""
        pool = self._pool
        return list(getattr(pool, "_processes", None) or {}) if pool is not None else []

    def close(self) -> None:
        """Stop the pool's processes, waiting for a parse in progress (bounded by the body limits)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
