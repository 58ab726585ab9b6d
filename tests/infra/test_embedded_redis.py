from __future__ import annotations

from pathlib import Path

import redis

from infra.embedded_redis import EmbeddedRedis, redis_server_binary


def test_binary_is_found() -> None:
    assert Path(redis_server_binary()).name == "redis-server"


def test_data_survives_a_restart_with_append_only_persistence(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        redis.Redis.from_url(server.url).set("kept", "yes")
        port = server.port
    with EmbeddedRedis(tmp_path, port=port) as server:
        assert redis.Redis.from_url(server.url).get("kept") == b"yes"


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, persist=False).start()
    server.stop()
    assert server.process is not None and server.process.poll() is not None
