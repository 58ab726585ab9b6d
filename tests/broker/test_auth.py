"""Optional API keys: with keys configured every endpoint but health and metrics needs a valid bearer key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.auth import ApiKeyCheck, load_api_keys
from infra.settings import ControllerSettings
from tests.broker.scripted_worker import FAST, ScriptedWorker, settings_for

KEYS = "key-one,key-two"


@pytest.fixture
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    ScriptedWorker(redis_client).register()
    with TestClient(create_app(settings_for(redis_url, api_keys=KEYS), timings=FAST, run_sweeper=False)) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/models"),
        ("POST", "/api/v1/generate"),
        ("GET", "/api/v1/jobs/abc"),
        ("POST", "/api/v1/feedback"),
        ("POST", "/list_models"),
        ("POST", "/worker_generate_stream"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_every_other_endpoint_needs_a_key(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"] == {
        "code": "unauthorized",
        "message": "missing API key: send the header `Authorization: Bearer <key>`",
    }


def test_wrong_and_malformed_keys_are_told_apart(client: TestClient) -> None:
    wrong = client.get("/api/v1/models", headers=bearer("key-three"))
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    basic = client.get("/api/v1/models", headers={"Authorization": "Basic a2V5LW9uZQ=="})
    assert basic.status_code == 401 and "malformed" in basic.json()["error"]["message"]


@pytest.mark.parametrize("key", ["key-one", "key-two"])
def test_each_configured_key_is_accepted(client: TestClient, key: str) -> None:
    assert client.get("/api/v1/models", headers=bearer(key)).status_code == 200
    assert client.post("/list_models", headers=bearer(key)).json() == {"models": ["tiny-llava"]}


def test_openai_client_gets_openai_shaped_401(client: TestClient) -> None:
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key") as raised:
        bad.models.list()
    assert raised.value.body == {
        "message": "invalid API key",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="key-two", http_client=client, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny-llava"]


def test_keys_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text("# team A\nalpha\n\n beta  # rotated 2026-11\n")
    monkeypatch.setenv("LLAVA_API_KEYS", "gamma, delta,")
    settings = ControllerSettings(api_keys_file=path)
    assert load_api_keys(settings.api_keys, settings.api_keys_file) == ["gamma", "delta", "alpha", "beta"]


def test_a_keys_file_without_keys_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app(settings_for(redis_url, api_keys_file=path), run_sweeper=False)


def test_key_check_compares_whole_keys() -> None:
    check = ApiKeyCheck(["secret-key"])
    assert check.accepts("secret-key")
    assert not check.accepts("secret-ke") and not check.accepts("secret-key2") and not check.accepts("")
