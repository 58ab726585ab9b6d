"""Settings, one object per process, from flags and `LLAVA_*` environment variables; unknown keys rejected.

Redis is one URL for every process: `LLAVA_REDIS_URL` (or `--redis-url`): `redis://[[user]:password@]host:port/db`,
`rediss://...` (TLS), `unix:///path.sock`, or `redis+sentinel://[[user]:password@]host1[:26379],host2.../<service>[/db]`
for a master found through Sentinel (see `infra.redis`). Everything else has its own prefix,
`LLAVA_CONTROLLER_`, `LLAVA_WORKER_`, `LLAVA_WEB_`, so one environment can hold settings for all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.messages import ImageMode

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONTROLLER_PORT = 10000
WEB_PORT = 7860


def _redis_url_field() -> str | None:
    return Field(default=None, validation_alias=AliasChoices("redis_url", "LLAVA_REDIS_URL"))  # type: ignore[return-value]


def default_cache_dir() -> Path:
    """Where built models and the embedded Redis' data live: `LLAVA_CACHE_DIR`, else the XDG cache dir."""
    import os

    if os.environ.get("LLAVA_CACHE_DIR"):
        return Path(os.environ["LLAVA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llava-serve"


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAVA_CONTROLLER_", extra="forbid", populate_by_name=True)

    redis_url: str | None = _redis_url_field()
    host: str = "127.0.0.1"
    port: int = CONTROLLER_PORT
    public_url: str | None = Field(default=None, description="base URL clients reach this controller at")
    max_queue: int = Field(default=256, ge=1, description="queued jobs per model before 429")
    max_images: int = Field(default=8, ge=0, description="images per request")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="width x height; larger is refused")
    max_image_aspect_ratio: float = Field(
        default=20.0, ge=1, description="longest over shortest side; bounds an image's size after the model's resize"
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_body_values: int = Field(
        default=20_000, ge=1, description="JSON values (arrays, objects, strings, numbers, literals) a body may hold"
    )
    body_inline_max_bytes: int = Field(
        default=64 * 1024, ge=0, description="bodies up to this size are parsed on the event loop, larger ones not"
    )
    body_parse_processes: int = Field(default=2, ge=1, description="processes that parse large request bodies")
    job_result_ttl_s: int = Field(default=600, ge=1, description="seconds a finished job's record is kept")
    queued_update_interval_s: float = Field(default=1.0, gt=0)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    ping_interval_s: int = Field(default=15, ge=1)
    stall_check_interval_s: float = Field(default=3.0, gt=0, description="silent stream: read the job record after")
    no_worker_timeout_s: float = Field(default=30.0, gt=0, description="queued with no live worker: fail after")
    redis_outage_s: float = Field(
        default=30.0, gt=0, description="Redis unreachable: requests and streams wait this long for it, then fail 503"
    )
    api_keys: str | None = Field(
        default=None,
        validation_alias=AliasChoices("api_keys", "LLAVA_API_KEYS"),
        description="comma-separated bearer keys; when set, every endpoint but health and metrics needs one",
    )
    api_keys_file: Path | None = Field(default=None, description="file of bearer keys, one per line, # comments")
    trusted_ui_keys: str | None = Field(
        default=None,
        description="comma-separated API keys of front ends (the web page) trusted to name their end user in the "
        "X-LLaVA-End-User header; limits then count by that user. Each must be one of the API keys",
    )
    trusted_ui_keys_file: Path | None = Field(default=None, description="file of trusted UI keys, one per line")
    allow_remote_images: bool = Field(default=False, description="fetch http(s) image_url (public addresses only)")
    remote_image_timeout_s: float = Field(default=5.0, gt=0, description="seconds to fetch one remote image, in all")
    remote_image_max_redirects: int = Field(default=3, ge=0)
    max_jobs_per_client: int | None = Field(
        default=None, ge=1, description="jobs one client (API key, else address) holds queued or running; None: no cap"
    )
    client_job_hold_s: float = Field(
        default=3600.0, gt=0, description="longest a job counts against its client's cap (covers a controller crash)"
    )
    rate_limit_requests_per_minute: int | None = Field(
        default=None, ge=1, description="generate requests per client per minute (token bucket); None: no limit"
    )
    rate_limit_tokens_per_minute: int | None = Field(
        default=None, ge=1, description="generated tokens per client per minute (token bucket); None: no limit"
    )
    feedback_retention_days: float | None = Field(
        default=365.0, gt=0, description="feedback entries and their images are kept this long; None: for ever"
    )
    feedback_retention_entries: int | None = Field(
        default=100_000, ge=1, description="the feedback stream keeps at most this many entries, the newest"
    )
    moderation_words_file: Path | None = Field(
        default=None,
        description="regular expressions (a word is one), one a line: user text matching one is refused",
    )
    moderation_url: str | None = Field(
        default=None,
        description="an OpenAI-shaped moderation endpoint (POST {input}), e.g. https://host/v1/moderations",
    )
    moderation_api_key: str | None = Field(default=None, description="bearer key for moderation_url")
    moderation_timeout_s: float = Field(default=5.0, gt=0, description="a moderation call that takes longer fails")
    moderate_replies: bool = Field(
        default=False, description="check replies too as they stream, with the same moderators; a flagged one stops"
    )
    moderation_reply_interval_chars: int = Field(
        default=400, ge=1, description="a streaming reply is checked each time it grows by this many characters"
    )
    log_conversations: bool = Field(default=False, description="write every exchange to the conversation log")
    log_retention_days: float | None = Field(
        default=30.0, gt=0, description="conversation log entries and their images are kept this long"
    )
    log_retention_entries: int | None = Field(default=None, ge=1, description="conversation log keeps about this many")


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAVA_WORKER_", extra="forbid", populate_by_name=True)

    redis_url: str | None = _redis_url_field()
    model_path: str
    model_name: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch: int = Field(default=8, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: seconds to finish in-flight jobs")
    worker_id: str | None = None
    compile: bool = Field(default=False, description="a KV slot per job and a compiled decode step, warmed up at start")
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"] = Field(
        default="inductor", description="torch.compile backend of --compile (cudagraphs: CUDA graphs, no codegen)"
    )
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch (default: torch's own)")
    prefill_tokens: int = Field(default=4096, ge=1, description="prompt tokens prefilled per step, at most")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics here (default off)")
    metrics_host: str = Field(default="127.0.0.1", description="address the /metrics server binds")
    image_modes: list[ImageMode] = Field(
        default_factory=lambda: list(ImageMode),
        description="the image pre-processing modes the model was trained with, offered by the web page",
    )

    def resolved_model_name(self) -> str:
        """`--model-name`, else the last component of the model path."""
        if self.model_name:
            return self.model_name
        return self.model_path.rstrip("/").split("/")[-1]


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAVA_WEB_", extra="forbid", populate_by_name=True)

    controller_url: str = f"http://127.0.0.1:{CONTROLLER_PORT}"
    host: str = "127.0.0.1"
    port: int = WEB_PORT
    model_list_mode: Literal["once", "reload"] = "reload"
    concurrency_limit: int = Field(default=16, ge=1)
    max_queue: int = Field(default=64, ge=1)
    share: bool = False
    embed: bool = False
    image_max_side: int = Field(default=1344, ge=64)
    api_key: str | None = None
    auth: list[str] = Field(default_factory=list, description="USER:PASSWORD logins for the page (JSON list in env)")
    auth_keys_file: Path | None = Field(
        default=None, description="API keys file whose keys log in to the page as passwords, with any user name"
    )
