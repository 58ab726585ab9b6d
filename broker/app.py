"""The controller: a stateless FastAPI app over Redis (`create_app`), and how `llava-serve controller` runs it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import AsyncIterator

import anyio.to_thread
import redis as sync_redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from broker import images
from broker.admission import Admission
from broker.auth import ApiKeyCheck, ApiKeyMiddleware, load_api_keys, trusted_ui_check
from broker.bodies import BodyParser, invalid_fields
from broker.context import ControllerContext, StreamTimings, redis_unavailable
from broker.metrics import ControllerMetrics, StatsWriter
from broker.moderation import ReplyModeration, reply_moderators
from broker.relay import ChunkRelay
from broker.routes_llava import LLAVA_STREAM_PATH, llava_error_response
from broker.validation import BODY_ERRORS, IMAGE_ERRORS, error_responses
from contract import liveness
from contract.errors import LlavaError
from contract.feedback_messages import FeedbackRequest
from contract.messages import DoneEvent, ErrorEvent, GenerateRequest, QueuedEvent, TokenEvent
from contract.openai_messages import ChatCompletionRequest, CompletionRequest, openai_error, openai_status
from contract.replies import ErrorDetail, ErrorReply
from infra.redis import async_connect, connect
from infra.settings import ControllerSettings

log = logging.getLogger(__name__)


def error_body(error: LlavaError) -> dict:
    fields = getattr(error, "fields", None) or None
    return ErrorReply(error=ErrorDetail(code=error.code, message=error.message, fields=fields)).model_dump(
        mode="json", exclude_none=True
    )


GENERATE_PATHS = frozenset({"/api/v1/generate", "/v1/chat/completions", "/v1/completions", LLAVA_STREAM_PATH})


def error_body_for(path: str, error: LlavaError) -> dict:
    """The JSON error body for a request to `path`: OpenAI's shape under `/v1/`, the controller's own elsewhere."""
    if path.startswith("/v1/"):
        return openai_error(error).model_dump(mode="json")
    return error_body(error)


def error_response(path: str, error: LlavaError) -> Response:
    """The one rendering of an error as a response to `path`: LLaVA's chunk on LLaVA's stream, OpenAI's status and
    body under `/v1/`, the controller's own body elsewhere."""
    if path == LLAVA_STREAM_PATH:
        return llava_error_response(error)
    status = openai_status(error) if path.startswith("/v1/") else error.status_code
    return JSONResponse(error_body_for(path, error), status_code=status, headers=error.headers or None)


async def _llava_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, LlavaError):  # registered for LlavaError only
        raise exc
    path = request.url.path
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and path in GENERATE_PATHS:
        metrics.rejected.labels(exc.code).inc()
    return error_response(path, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):  # registered for RequestValidationError only
        raise exc
    return await _llava_error(request, invalid_fields(list(exc.errors())))


async def _redis_error(request: Request, exc: Exception) -> Response:
    """Every redis-py failure a route lets through (connection, timeout, loading, read-only replica...) is a 503."""
    return await _llava_error(request, redis_unavailable(exc))


def _start_sweeper(settings: ControllerSettings) -> tuple[threading.Thread, threading.Event] | None:
    """Run `contract.sweeper.run_sweeper` in a thread when that module exists (replicas share it by a lock)."""
    try:
        sweeper = importlib.import_module("contract.sweeper")
    except ImportError:
        log.info("contract.sweeper not available; dead workers' jobs are not swept by this controller")
        return None
    stop = threading.Event()
    thread = threading.Thread(
        target=sweeper.run_sweeper,
        args=(settings.redis_url, settings.sweep_interval_s, stop),
        name="llava-sweeper",
        daemon=True,
    )
    thread.start()
    return thread, stop


def create_app(
    settings: ControllerSettings, *, timings: StreamTimings | None = None, run_sweeper: bool = True
) -> FastAPI:
    """The controller app; its lifespan opens the Redis clients, the chunk relay and the sweeper thread."""
    from broker.metrics import router as metrics_router
    from broker.routes_api import router as api_router
    from broker.routes_llava import LlavaGenerateBody, ModelName
    from broker.routes_llava import router as llava_router
    from broker.routes_openai import router as openai_router

    stream_timings = timings or StreamTimings.from_settings(settings)
    images.install_pil_guard(settings.max_image_pixels)
    api_keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    checkers = reply_moderators(settings)
    trusted = trusted_ui_check(settings.trusted_ui_keys, settings.trusted_ui_keys_file, api_keys)
    metrics = ControllerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = async_connect(settings.redis_url)
        redis_sync = connect(settings.redis_url)
        relay = ChunkRelay(lambda: async_connect(settings.redis_url), backoff_max_s=stream_timings.relay_backoff_max_s)
        relay.start()
        stats = StatsWriter(redis)
        bodies = BodyParser.from_settings(settings)
        app.state.ctx = ControllerContext(
            settings=settings,
            redis=redis,
            redis_sync=redis_sync,
            relay=relay,
            timings=stream_timings,
            bodies=bodies,
            observe=lambda model: metrics.observe(model, stats.record),
        )
        app.state.admission = Admission(redis, settings, keys_checked=bool(api_keys), trusted=trusted)
        app.state.ctx.on_job_end = app.state.admission.job_ended
        if checkers:
            moderation = ReplyModeration(app.state.ctx, checkers, settings.moderation_reply_interval_chars)
            app.state.ctx.screen_reply = moderation.screen
        # A client of its own: a pool busy with a thousand streams must never delay the lease past its TTL.
        lease_redis = async_connect(settings.redis_url)
        lease = asyncio.create_task(liveness.hold_controller_lease(lease_redis, app.state.ctx.controller_id))
        sweeper = _start_sweeper(settings) if run_sweeper else None
        try:
            yield
        finally:
            lease.cancel()  # and the lease is deleted: workers cancel what this process still streams
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            await lease_redis.aclose()
            if sweeper is not None:
                thread, stop = sweeper
                stop.set()
                thread.join(timeout=max(5.0, settings.sweep_interval_s * 2))
            await relay.stop()
            await stats.drain()
            await redis.aclose()
            redis_sync.close()
            await anyio.to_thread.run_sync(bodies.close)

    app = FastAPI(
        title="llava-serve controller",
        summary="Streams LLaVA-style multimodal chat through Redis-queued model workers",
        version="1",
        lifespan=lifespan,
    )
    app.add_exception_handler(LlavaError, _llava_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # redis-py wraps socket errors in its own ConnectionError, so RedisError is every failure of a Redis call.
    app.add_exception_handler(sync_redis.RedisError, _redis_error)
    app.include_router(api_router)
    app.include_router(llava_router)
    app.include_router(
        importlib.import_module("broker.feedback").router, responses=error_responses(*BODY_ERRORS, *IMAGE_ERRORS)
    )
    app.include_router(openai_router)
    app.include_router(metrics_router)
    app.state.metrics = metrics
    metrics.watch_redis(lambda: app.state.ctx.redis_sync)
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, check=ApiKeyCheck(api_keys), render_error=error_body_for)
    _document_bodies(
        app, [GenerateRequest, LlavaGenerateBody, ChatCompletionRequest, CompletionRequest, FeedbackRequest]
    )
    _document_bodies(app, [ModelName, QueuedEvent, TokenEvent, DoneEvent, ErrorEvent])  # the events of /api/v1/generate
    return app


def _document_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the bodies that routes read themselves (to enforce the size limit) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `llava-serve controller`; unset flags fall back to `LLAVA_CONTROLLER_*` / `LLAVA_REDIS_URL`."""
    parser.add_argument("--redis-url", default=None, help="Redis URL (env LLAVA_REDIS_URL)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 10000)")
    parser.add_argument("--public-url", default=None, help="base URL clients reach this controller at")
    parser.add_argument("--max-queue", type=int, default=None, help="queued jobs per model before 429")
    parser.add_argument("--max-images", type=int, default=None, help="images per request")
    parser.add_argument("--max-image-bytes", type=int, default=None)
    parser.add_argument("--max-image-pixels", type=int, default=None, help="width x height limit per image")
    parser.add_argument("--max-body-bytes", type=int, default=None)
    parser.add_argument(
        "--max-body-values",
        type=int,
        default=None,
        help="JSON values (arrays, objects, scalars) a body may hold (20000)",
    )
    parser.add_argument("--job-result-ttl-s", type=int, default=None, help="seconds a finished job record is kept")
    parser.add_argument("--sweep-interval-s", type=float, default=None)
    parser.add_argument("--ping-interval-s", type=int, default=None, help="SSE keep-alive ping, seconds")
    parser.add_argument(
        "--redis-outage-s",
        type=float,
        default=None,
        help="seconds a request or stream waits out a Redis outage before it fails with redis_unavailable (30)",
    )
    for old_flag, kind in (("--job-result-ttl", int), ("--sweep-interval", float), ("--ping-interval", int)):
        parser.add_argument(old_flag, dest=f"{old_flag[2:].replace('-', '_')}_s", type=kind, help=argparse.SUPPRESS)
    parser.add_argument(
        "--api-keys",
        dest="api_keys_file",
        default=None,
        metavar="FILE",
        help="file of API keys, one per line; then every endpoint but /healthz, /readyz, /metrics needs "
        "`Authorization: Bearer <key>` (also: LLAVA_API_KEYS=k1,k2)",
    )
    parser.add_argument(
        "--trusted-ui-keys",
        dest="trusted_ui_keys_file",
        default=None,
        metavar="FILE",
        help="file of API keys (one per line) of front ends trusted to name their end user in the X-LLaVA-End-User "
        "header, so that per-client limits count each user of the web page (also: LLAVA_CONTROLLER_TRUSTED_UI_KEYS)",
    )
    parser.add_argument(
        "--allow-remote-images",
        action="store_true",
        default=None,
        help="fetch http(s) image_url images (public addresses only; size and time limited). Default: off",
    )
    parser.add_argument("--remote-image-timeout-s", type=float, default=None, help="seconds per remote image (5)")
    parser.add_argument("--remote-image-timeout", dest="remote_image_timeout_s", type=float, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-jobs-per-client",
        type=int,
        default=None,
        help="jobs one client (API key, else address) may hold queued or running at once, across replicas; "
        "more get 429 with Retry-After. Default: no cap",
    )
    parser.add_argument("--client-job-hold-s", type=float, default=None, help="longest a job counts (3600)")
    parser.add_argument(
        "--rate-limit-requests-per-minute", type=int, default=None, help="per client (API key, else address)"
    )
    parser.add_argument(
        "--rate-limit-tokens-per-minute", type=int, default=None, help="generated tokens per client per minute"
    )
    parser.add_argument(
        "--log-conversations",
        action="store_true",
        default=None,
        help="write every finished, failed or cancelled exchange to the conversation log in Redis. Default: off",
    )
    parser.add_argument("--log-retention-days", type=float, default=None, help="days the log keeps entries (30)")
    parser.add_argument("--log-retention-entries", type=int, default=None, help="entries the log keeps")
    parser.add_argument(
        "--moderation-words", dest="moderation_words_file", default=None, metavar="FILE",
        help="refuse user text matching any regular expression (or word) in FILE, one a line",
    )  # fmt: skip
    parser.add_argument(
        "--moderation-url", default=None, help="check user text with an OpenAI-shaped moderation API at this URL"
    )
    parser.add_argument(
        "--moderate-replies",
        action="store_true",
        default=None,
        help="check replies as they stream with the same moderators (every --moderation-reply-interval-chars "
        "characters and at the end); a flagged reply stops with error reply_flagged. Default: off",
    )
    parser.add_argument("--moderation-reply-interval-chars", type=int, default=None, help="(400)")
    parser.add_argument("--feedback-retention-days", type=float, default=None, help="days feedback is kept (365)")
    parser.add_argument("--feedback-retention-entries", type=int, default=None, help="feedback entries kept (100000)")


_CONTROLLER_FLAGS = (
    "redis_url",
    "host",
    "port",
    "public_url",
    "max_queue",
    "max_images",
    "max_image_bytes",
    "max_image_pixels",
    "max_body_bytes",
    "max_body_values",
    "job_result_ttl_s",
    "sweep_interval_s",
    "ping_interval_s",
    "redis_outage_s",
    "api_keys_file",
    "trusted_ui_keys_file",
    "allow_remote_images",
    "remote_image_timeout_s",
    "max_jobs_per_client",
    "client_job_hold_s",
    "rate_limit_requests_per_minute",
    "rate_limit_tokens_per_minute",
    "log_conversations",
    "log_retention_days",
    "log_retention_entries",
    "feedback_retention_days",
    "moderation_words_file",
    "moderation_url",
    "moderate_replies",
    "moderation_reply_interval_chars",
    "feedback_retention_entries",
)


def controller_settings_from_args(args: argparse.Namespace) -> ControllerSettings:
    """Settings from the flags that were given, the environment for the rest."""
    given = {name: getattr(args, name) for name in _CONTROLLER_FLAGS if getattr(args, name, None) is not None}
    return ControllerSettings(**given)


# How long an idle keep-alive connection stays open. It must outlast the idle expiry of clients' connection pools
# (httpx 5 s, aiohttp 15 s; requests and urllib3 keep them forever) and of load balancers in front (60 s is common):
# when the server closes first, a request sent on the connection in that instant is reset before any response, and
# its client cannot tell whether the job started. uvicorn's own default is 5 s, the same as httpx's.
KEEP_ALIVE_S = 75


def run_controller(settings: ControllerSettings) -> int:
    """Serve the controller with uvicorn until SIGINT/SIGTERM; returns the exit status."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=10,
    )
    return 0
