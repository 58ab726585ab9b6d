"""Optional API keys: with keys configured, every controller endpoint but health and metrics needs
`Authorization: Bearer <key>`.

Keys come from `LLAVA_API_KEYS` (comma-separated) and/or `--api-keys FILE` (one per line, `#` comments). The check
is a pure ASGI middleware, so it covers every route (OpenAI, LLaVA-compatible, docs) before any body is read;
keys are compared as sha256 digests with `hmac.compare_digest`, against every configured key, in constant time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from contract.api_keys import ApiKeyCheck, load_api_keys, parse_keys
from contract.errors import LlavaError

__all__ = ["ApiKeyCheck", "ApiKeyMiddleware", "load_api_keys", "parse_keys", "trusted_ui_check"]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def trusted_ui_check(
    trusted_ui_keys: str | None, trusted_ui_keys_file: Path | None, api_keys: list[str]
) -> ApiKeyCheck | None:
    """The check of the keys trusted to name their end user (None when there are none). Each must be an API key:
    without key checks nobody is authenticated, so nobody can be trusted."""
    trusted = load_api_keys(trusted_ui_keys, trusted_ui_keys_file)
    if not trusted:
        return None
    if not api_keys:
        raise ValueError("trusted UI keys need API keys: set api_keys or api_keys_file (--api-keys) as well")
    unknown = [i for i, key in enumerate(trusted, 1) if key not in api_keys]
    if unknown:
        raise ValueError(f"trusted UI key number {unknown[0]} is not one of the API keys; add it to them")
    return ApiKeyCheck(trusted)


class ApiKeyMiddleware:
    """Answers 401 (with `WWW-Authenticate: Bearer`) to any HTTP request outside OPEN_PATHS without a valid key;
    `render_error(path, error)` builds the body, so `/v1/...` gets OpenAI's error shape."""

    def __init__(self, app: ASGIApp, *, check: ApiKeyCheck, render_error: Callable[[str, LlavaError], dict]) -> None:
        self.app = app
        self.check = check
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        error = self.check.error_for(Headers(scope=scope).get("authorization"))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            self.render_error(scope["path"], error),
            status_code=error.status_code,
            headers={"WWW-Authenticate": 'Bearer realm="llava-serve"'},
        )
        await response(scope, receive, send)
