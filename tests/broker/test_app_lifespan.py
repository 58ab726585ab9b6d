"""The controller's lifespan (relay, sweeper thread) and its command-line settings."""

from __future__ import annotations

import argparse
import threading

from fastapi.testclient import TestClient

from broker.app import add_controller_arguments, controller_settings_from_args, create_app
from tests.broker.scripted_worker import FAST, settings_for


def sweeper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llava-sweeper" and t.is_alive()]


def test_lifespan_runs_the_sweeper_and_stops_it(redis_url: str, redis_client) -> None:
    before = len(sweeper_threads())
    with TestClient(create_app(settings_for(redis_url, sweep_interval_s=0.1), timings=FAST)) as client:
        assert client.get("/readyz").status_code == 200
        assert len(sweeper_threads()) == before + 1
    assert len(sweeper_threads()) == before


def test_flags_override_settings_and_unset_flags_keep_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_controller_arguments(parser)
    settings = controller_settings_from_args(
        parser.parse_args(["--redis-url", "redis://h:1/0", "--port", "10001", "--max-queue", "3"])
    )
    assert (settings.redis_url, settings.port, settings.max_queue) == ("redis://h:1/0", 10001, 3)
    assert settings.host == "127.0.0.1" and settings.max_images == 8


def test_the_redis_outage_allowance_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_controller_arguments(parser)
    assert controller_settings_from_args(parser.parse_args(["--redis-outage-s", "4.5"])).redis_outage_s == 4.5
    assert controller_settings_from_args(parser.parse_args([])).redis_outage_s == 30.0


def test_openapi_documents_the_generate_body(redis_url: str) -> None:
    schema = create_app(settings_for(redis_url)).openapi()
    for path, model in (
        ("/api/v1/generate", "GenerateRequest"),
        ("/worker_generate_stream", "LlavaGenerateBody"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert "properties" in schema["components"]["schemas"][model]
    assert "ChatMessage" in schema["components"]["schemas"]
