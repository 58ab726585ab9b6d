"""The error hierarchy: one class per code, rebuilt from its code, and LLaVA's numeric codes derived from it."""

from __future__ import annotations

import pytest

from contract.errors import (
    ERRORS_BY_CODE,
    ErrorCode,
    InvalidRequest,
    LlavaError,
    LlavaWireCode,
    QueueFull,
    RequestInvalid,
    error_from_code,
    llava_wire_code,
)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_its_class_and_comes_back_as_it(code: ErrorCode) -> None:
    cls = ERRORS_BY_CODE[code]
    assert cls.code == code
    error = error_from_code(code.value, "what happened")  # a code read back from JSON is a plain str
    assert type(error) is cls and error.code == code and error.message == "what happened"


def test_a_code_shared_by_a_subclass_comes_back_as_the_base_class() -> None:
    assert RequestInvalid.code == InvalidRequest.code
    error = error_from_code("invalid_request", "prompt: too long")
    assert type(error) is InvalidRequest and error.message == "prompt: too long"


def test_an_unknown_code_keeps_its_code() -> None:
    error = error_from_code("from_a_newer_version", "something new")
    assert type(error) is LlavaError and error.code == "from_a_newer_version" and error.status_code == 500


def test_queue_full_comes_back_with_its_retry_header() -> None:
    error = error_from_code("queue_full", "full")
    assert isinstance(error, QueueFull) and error.headers == {"Retry-After": "5"}


def test_request_invalid_names_each_field_in_one_message() -> None:
    fields = [{"field": f"messages[{i}].content", "message": "too long"} for i in range(10)]
    error = RequestInvalid(fields)
    assert error.status_code == 422 and error.fields == fields
    assert error.message.startswith("invalid request: messages[0].content: too long; messages[1].content")
    assert "messages[7].content" in error.message and "messages[8].content" not in error.message
    assert error.message.endswith("; and 2 more")


def test_llava_wire_codes_derive_from_the_error_codes() -> None:
    wire = {code: llava_wire_code(code) for code in ErrorCode}
    assert wire.pop(ErrorCode.no_worker) == LlavaWireCode.no_worker == 2
    assert wire.pop(ErrorCode.model_not_found) == LlavaWireCode.no_worker
    assert wire.pop(ErrorCode.redis_unavailable) == LlavaWireCode.worker_unreachable == 3
    assert set(wire.values()) == {LlavaWireCode.request_failed}
    assert llava_wire_code("no_worker") == 2 and llava_wire_code("from_a_newer_version") == 1
