"""Who is using the page: the name the controller's per-client limits count by (`contract.identity`), and the login
that `--auth` and `--auth-keys-file` put in front of the page (Gradio's own login form)."""

from __future__ import annotations

import hashlib
import hmac
import threading
from pathlib import Path

import gradio as gr

from contract.api_keys import ApiKeyCheck, load_api_keys
from contract.errors import HeaderInvalid
from contract.identity import parse_end_user


def end_user(request: gr.Request | None) -> str | None:
    """The person behind `request` as the controller's end-user header names them: `user:` and the login name
    when the page has a login, else `session:` and the browser session's id. A name the header cannot carry is
    sent as its sha256."""
    if request is None:
        return None
    username = getattr(request, "username", None)
    if username:
        kind, name = "user", str(username)
    elif getattr(request, "session_hash", None):
        kind, name = "session", str(request.session_hash)
    else:
        return None
    try:
        return parse_end_user(f"{kind}:{name}")
    except HeaderInvalid:
        return f"{kind}-sha256:{hashlib.sha256(name.encode()).hexdigest()[:32]}"


def parse_auth_pairs(pairs: list[str]) -> dict[str, str]:
    """`user:pass` pairs as a dict; ValueError naming a pair without both parts."""
    found = {}
    for number, pair in enumerate(pairs, 1):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"--auth pair number {number} is not USER:PASSWORD (both parts needed)")
        found[user.strip()] = password
    return found


class PageLogin:
    """Gradio's `auth` callable: a `user:pass` pair, or any name with an API key of the keys file as its password.
    A name logged in with one key is refused with another (while the page runs), so that a key holder cannot
    take another's name and, with it, their share of the service."""

    def __init__(self, pairs: dict[str, str], keys: list[str]) -> None:
        self.pairs = pairs
        self.keys = ApiKeyCheck(keys) if keys else None
        self._names: dict[str, bytes] = {}  # login name -> sha256 of the key it was first accepted with
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        if username in self.pairs:
            return hmac.compare_digest(password.encode(), self.pairs[username].encode())
        if self.keys is None or not self.keys.accepts(password):
            return False
        digest = hashlib.sha256(password.encode()).digest()
        with self._lock:
            bound = self._names.setdefault(username, digest)
        return hmac.compare_digest(bound, digest)


def page_login(auth: list[str], auth_keys_file: Path | None) -> PageLogin | None:
    """The page's login from `--auth` pairs and `--auth-keys-file`; None when neither is set (no login)."""
    pairs = parse_auth_pairs(auth)
    keys = load_api_keys(None, auth_keys_file)
    if not pairs and not keys:
        return None
    return PageLogin(pairs, keys)
