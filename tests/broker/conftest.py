"""Fixtures for controller tests: the app in-process on real Redis, and a scripted stand-in worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.broker.scripted_worker import FAST, ScriptedWorker, settings_for


@pytest.fixture
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    """The controller app on an emptied database (its sweeper off: tests drive the worker side themselves)."""
    with TestClient(create_app(settings_for(redis_url), timings=FAST, run_sweeper=False)) as test_client:
        yield test_client


@pytest.fixture
def worker(redis_client: redis.Redis) -> ScriptedWorker:
    """A registered live worker of the scripted model that the test drives step by step."""
    return ScriptedWorker(redis_client).register()
