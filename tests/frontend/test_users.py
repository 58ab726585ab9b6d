"""Who uses the page: each browser session or login is its own client of the controller's limits, and `--auth` /
`--auth-keys-file` put a login in front of the page."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from gradio_client import Client

from broker.convlog import read_conversations
from contract.client import ControllerClient
from contract.errors import RateLimited
from contract.messages import GenerateRequest
from frontend.conversation import Conversation
from frontend.handlers import ChatHandlers
from frontend.texts import describe_error
from frontend.users import PageLogin, end_user, page_login
from infra.settings import WebSettings
from tests.frontend.conftest import RecordingClient, launched_ui, running_controller, session, start_worker

UI_KEY = "key-of-the-page"


def test_the_end_user_is_the_login_else_the_browser_session():
    assert end_user(None) is None
    assert end_user(SimpleNamespace(username=None, session_hash="abc123")) == "session:abc123"
    assert end_user(SimpleNamespace(username="alice", session_hash="abc123")) == "user:alice"
    odd = end_user(SimpleNamespace(username="Zoë Smith", session_hash="abc123"))
    assert odd.startswith("user-sha256:") and len(odd) == len("user-sha256:") + 32


def waiting(handlers: ChatHandlers, model: str, name: str):
    """Start a reply for browser session `name` and run it until its job is queued; returns the running call."""
    conv = handlers.add_message(Conversation(), {"text": f"hello from {name}", "files": []}, "default")[0]
    stream = handlers.generate(conv, model, 0.2, 0.7, 16, session(name))
    while conv.last_reply is None or not conv.last_reply.job_id:
        next(stream)
    assert not conv.last_reply.failed, conv.last_reply.status
    return stream


def test_two_people_on_the_page_each_get_their_own_share(redis_url, redis_client, idle_worker):
    with running_controller(redis_url, api_keys=UI_KEY, trusted_ui_keys=UI_KEY, max_jobs_per_client=1) as url:
        client = RecordingClient(url, api_key=UI_KEY)
        handlers = ChatHandlers(WebSettings(controller_url=url, api_key=UI_KEY), client)
        first = waiting(handlers, idle_worker, "s1")
        second = waiting(handlers, idle_worker, "s2")  # the page's key holds two jobs: one per person
        try:
            assert client.end_users == ["session:s1", "session:s2"]
            request = GenerateRequest(model=idle_worker, messages=[{"role": "user", "content": "again"}])
            with pytest.raises(RateLimited, match="session:s1"):
                list(client.generate(request, end_user="session:s1"))
        finally:
            first.close()
            second.close()


def test_the_page_asks_for_a_login_when_auth_is_set(redis_url, redis_client):
    settings = dict(api_keys=UI_KEY, trusted_ui_keys=UI_KEY, log_conversations=True)
    with running_controller(redis_url, **settings) as url:
        worker = start_worker(redis_url)
        try:
            with launched_ui(url, api_key=UI_KEY, auth=["alice:wonderland"]) as web:
                with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a bare ValueError on a 401
                    Client(web, verbose=False)
                with pytest.raises(Exception):  # noqa: B017
                    Client(web, auth=("alice", "wrong"), verbose=False)
                client = Client(web, auth=("alice", "wonderland"), verbose=False)
                client.predict({"text": "hello", "files": []}, "default", api_name="/add_message")
                list(client.submit("scripted-model", 0.2, 0.7, 16, api_name="/generate"))
        finally:
            worker.stop()
    (record,) = read_conversations(redis.Redis.from_url(redis_url))
    assert record.end_user == "user:alice"


def test_key_holders_log_in_with_their_key_and_keep_their_name(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# people\nkey-of-alice\nkey-of-bob\n")
    login = page_login(["admin:secret"], keys)
    assert isinstance(login, PageLogin)
    assert login("admin", "secret") and not login("admin", "key-of-alice")
    assert login("alice", "key-of-alice") and not login("alice", "key-of-bob")  # bob cannot take alice's name
    assert login("bob", "key-of-bob") and not login("carol", "not-a-key")
    assert page_login([], None) is None
    with pytest.raises(ValueError, match="pair number 2 is not USER:PASSWORD"):
        page_login(["a:b", "nocolon"], None)


def test_a_person_over_their_share_is_told_when_to_try_again():
    text = describe_error(RateLimited("too many jobs at once", retry_after=7), "m")
    assert "Try again in 7 s" in text and "too many jobs" not in text


def test_the_terms_say_that_conversations_are_recorded_when_they_are(redis_url, redis_client):
    with running_controller(redis_url, log_conversations=True, log_retention_days=30) as url:
        handlers = ChatHandlers(WebSettings(controller_url=url), ControllerClient(url))
        recorded = handlers.terms()
    assert "**Conversations are recorded**" in recorded and "kept for 30 days" in recorded
    with running_controller(redis_url) as url:
        handlers = ChatHandlers(WebSettings(controller_url=url), ControllerClient(url))
        assert "Conversations are not recorded" in handlers.terms()
    # The controller is gone: the page cannot tell, so it says they may be.
    assert "Conversations may be recorded" in handlers.terms()
