"""API keys: read from settings or a keys file, and checked in constant time (the controller's middleware and the
web page's login use the same check)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from contract.errors import Unauthorized


def parse_keys(text: str, *, separator: str | None = None) -> list[str]:
    """Keys from `text`: split on `separator` (default: lines), stripped, blanks and `#` comments dropped."""
    parts = text.split(separator) if separator else text.splitlines()
    keys = []
    for part in parts:
        key = part.split("#", 1)[0].strip() if separator is None else part.strip()
        if key:
            keys.append(key)
    return keys


def load_api_keys(api_keys: str | None, api_keys_file: Path | None) -> list[str]:
    """The configured keys; a keys file that holds none is an error (so a typo never turns auth off)."""
    keys = parse_keys(api_keys, separator=",") if api_keys else []
    if api_keys_file is not None:
        from_file = parse_keys(Path(api_keys_file).read_text())
        if not from_file:
            raise ValueError(f"API keys file {api_keys_file} holds no key")
        keys += from_file
    return keys


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeyCheck:
    """Whether a presented key is one of the configured ones, in time that does not depend on which, or how
    much of it, matched."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyCheck needs at least one key")

    def accepts(self, presented: str | bytes) -> bool:
        digest = _digest(presented)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return matched

    def error_for(self, authorization: str | None) -> Unauthorized | None:
        """None when `authorization` carries a valid key, else the 401 to answer with."""
        if not authorization:
            return Unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("malformed Authorization header: expected `Authorization: Bearer <key>`")
        if not self.accepts(token.strip()):
            return Unauthorized("invalid API key")
        return None
