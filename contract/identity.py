"""Who a request is for, when a trusted front end (the web page) sends requests for many people under one API key.

The page names the person in the `X-LLaVA-End-User` header: a login name, or an id of the browser session. The
controller believes the header only from keys listed in `trusted_ui_keys`; per-client limits then count by it.
"""

from __future__ import annotations

import re

from contract.errors import HeaderInvalid

END_USER_HEADER = "X-LLaVA-End-User"
MAX_END_USER_CHARS = 128
# Letters, digits and `. _ : @ + -`: safe in a Redis key name and in a log line.
END_USER_CHARS = "letters, digits and . _ : @ + -"
_END_USER = re.compile(r"[A-Za-z0-9._:@+-]+")


def parse_end_user(value: str | None) -> str | None:
    """The end user a header value names (None when absent); HeaderInvalid (400) naming the rule it breaks."""
    if value is None:
        return None
    if not value:
        raise HeaderInvalid(f"header {END_USER_HEADER} is empty: name the end user, or leave the header out")
    if len(value) > MAX_END_USER_CHARS:
        raise HeaderInvalid(
            f"header {END_USER_HEADER} is {len(value)} characters long, over the limit of {MAX_END_USER_CHARS}"
        )
    if not _END_USER.fullmatch(value):
        raise HeaderInvalid(f"header {END_USER_HEADER} may hold only {END_USER_CHARS}, not {value[:40]!r}")
    return value
