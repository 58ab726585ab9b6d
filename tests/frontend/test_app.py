"""The Gradio app end to end through `gradio_client`, and its command-line flags."""

from __future__ import annotations

import argparse

import httpx
import redis
from gradio_client import Client, handle_file

from broker.feedback import read_feedback
from contract import keys
from frontend.app import EXAMPLES, EXAMPLES_DIR, add_web_arguments, build_demo, launch, web_settings_from_args
from infra.embedded_redis import free_port
from infra.settings import WebSettings
from tests.frontend.conftest import MODEL


def parse(*argv: str) -> WebSettings:
    parser = argparse.ArgumentParser()
    add_web_arguments(parser)
    return web_settings_from_args(parser.parse_args(argv))


def test_flags_and_their_defaults(monkeypatch):
    defaults = parse()
    assert (defaults.host, defaults.port, defaults.share, defaults.embed) == ("127.0.0.1", 7860, False, False)
    monkeypatch.setenv("LLAVA_WEB_PORT", "8000")
    settings = parse(
        "--controller-url", "http://c:1", "--host", "0.0.0.0", "--concurrency-limit", "3", "--max-queue", "9",
        "--share", "--embed", "--model-list-mode", "once", "--image-max-side", "672",
    )  # fmt: skip
    assert settings.port == 8000 and settings.controller_url == "http://c:1" and settings.host == "0.0.0.0"
    assert (settings.concurrency_limit, settings.max_queue, settings.share, settings.embed) == (3, 9, True, True)
    assert (settings.model_list_mode, settings.image_max_side) == ("once", 672)
    assert parse("--port", "7000").port == 7000
    login = parse("--auth", "alice:pw", "--auth", "bob:pw2", "--auth-keys-file", "/etc/keys")
    assert login.auth == ["alice:pw", "bob:pw2"] and str(login.auth_keys_file) == "/etc/keys"
    assert defaults.auth == [] and defaults.auth_keys_file is None


def test_examples_ship_with_the_package():
    assert len(EXAMPLES) >= 2
    for name, question in EXAMPLES:
        assert (EXAMPLES_DIR / name).is_file() and question.endswith("?")


def test_the_ui_starts_without_a_controller():
    settings = WebSettings(controller_url=f"http://127.0.0.1:{free_port()}", port=free_port(), embed=True)
    demo = build_demo(settings)
    launch(demo, settings, block=False)
    try:
        assert httpx.get(f"http://127.0.0.1:{settings.port}/", timeout=10).status_code == 200
    finally:
        demo.close()


def test_chat_vote_and_flag_through_gradio_client(web_url, redis_url):
    client = Client(web_url, verbose=False)
    chatbot, _ = client.predict(
        {"text": "what colour are the shapes", "files": [handle_file(str(EXAMPLES_DIR / "demo_5_3_shapes.png"))]},
        "pad",
        api_name="/add_message",
    )
    assert (
        chatbot[0]["content"][0]["type"] == "file" and chatbot[1]["content"][0]["text"] == "what colour are the shapes"
    )
    job = client.submit(MODEL, 0.2, 0.7, 16, api_name="/generate")
    outputs = list(job)
    final = outputs[-1][-1]["content"][0]["text"]
    assert final.startswith("what colour are the shapes what colour")
    assert len(outputs) > 2  # the reply streamed in
    client.predict("", api_name="/upvote")
    client.predict("the colours are wrong", api_name="/flag")
    upvote, flag = read_feedback(redis.Redis.from_url(redis_url))
    assert (upvote.type.value, flag.type.value, flag.reason) == ("upvote", "flag", "the colours are wrong")
    assert flag.messages[-1].content[0].text == final.split("\n\n")[0]
    # kept as long as the feedback stream keeps its entries (a year by default), not the upload's hour
    assert redis.Redis.from_url(redis_url).ttl(keys.image(flag.images[0])) > 300 * 24 * 3600
