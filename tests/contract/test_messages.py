"""Wire messages: an error crosses Redis as an `error` event and becomes the same error class again."""

from __future__ import annotations

import pytest

from contract.errors import ERRORS_BY_CODE, ErrorCode, LlavaError, QueueFull
from contract.messages import ErrorEvent, error_event, error_from_event, parse_event


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_error_crosses_redis_as_an_event_and_comes_back(code: ErrorCode) -> None:
    cls = ERRORS_BY_CODE[code]
    error = QueueFull("queue is full") if cls is QueueFull else cls("it failed")
    event = error_event("job-1", error, text="partial")
    read = parse_event(event.model_dump_json())
    assert isinstance(read, ErrorEvent)
    assert (read.job_id, read.code, read.status_code, read.text) == ("job-1", code.value, cls.status_code, "partial")
    back = error_from_event(read)
    assert type(back) is cls and back.message == error.message and back.status_code == cls.status_code


def test_the_event_keeps_a_status_that_differs_from_the_class_default() -> None:
    error = LlavaError("odd")
    error.code, error.status_code = ErrorCode.generation_failed, 502
    back = error_from_event(parse_event(error_event("j", error).model_dump_json()))
    assert back.code == ErrorCode.generation_failed and back.status_code == 502
