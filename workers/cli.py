"""`llava-serve worker`: load the model (or the scripted engine), connect Redis, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

from contract.liveness import SWEEP_INTERVAL_S
from contract.messages import ImageMode, parse_image_modes
from infra.settings import WorkerSettings

log = logging.getLogger(__name__)

SCRIPTED_STEP_DELAY_S = 0.05

ENGINE_KINDS = ("transformers", "scripted")


def add_worker_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `llava-serve worker`; unset flags fall back to `LLAVA_WORKER_*` variables, then defaults."""
    parser.add_argument("--model-path", help="local directory (or hub id) of the model")
    parser.add_argument("--model-name", help="the name clients ask for (default: last part of the model path)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, help="jobs generated together at most")
    parser.add_argument("--token-budget", type=int, help="KV cache tokens across the batch (default: from memory)")
    parser.add_argument("--redis-url", help="redis://host:port/db (default: LLAVA_REDIS_URL, else local)")
    parser.add_argument("--drain-timeout-s", type=float, help="seconds to finish in-flight jobs on SIGTERM")
    parser.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", help="a stable id for this worker (default: host-pid-random)")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: off; 0 picks a free port)"
    )
    parser.add_argument("--metrics-host", help="address the metrics server binds (default 127.0.0.1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: one per core; on a CPU shared with other processes, fewer is faster)",
    )
    parser.add_argument("--prefill-tokens", type=int, help="prompt tokens prefilled per decode step, at most (4096)")
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="one KV slot per job, allocated at start, and a torch.compile'd decode step (CUDA graphs on a GPU), "
        "built for every batch-size bucket before the worker registers",
    )
    parser.add_argument(
        "--compile-backend",
        choices=["inductor", "cudagraphs", "aot_eager", "eager"],
        help="torch.compile backend for --compile: inductor (default; generated kernels, CUDA graphs on a GPU), "
        "cudagraphs (CUDA graphs of the eager kernels, no code generation), aot_eager or eager (no speed-up; "
        "for checking the compiled path)",
    )
    parser.add_argument(
        "--image-modes",
        type=_image_modes,
        help="comma-separated image pre-processing modes the model was trained with, the only ones the web page "
        f"offers for it: {', '.join(m.value for m in ImageMode)} (default: all)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_KINDS,
        default="transformers",
        help="'scripted' is a fake engine for load and fault tests of the broker, not a model",
    )
    parser.add_argument(
        "--scripted-step-delay-s",
        type=float,
        default=SCRIPTED_STEP_DELAY_S,
        help=f"--engine scripted: seconds per decode step (default {SCRIPTED_STEP_DELAY_S})",
    )
    parser.add_argument("--scripted-step-delay", dest="scripted_step_delay_s", type=float, help=argparse.SUPPRESS)
    return parser


def _image_modes(text: str) -> list[ImageMode]:
    try:
        return parse_image_modes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """WorkerSettings from parsed flags; flags left unset keep the environment's or the default value."""
    fields = ("model_path", "model_name", "device", "dtype", "max_batch", "token_budget", "redis_url")
    extra = ("drain_timeout_s", "worker_id", "metrics_port", "metrics_host", "compile", "compile_backend", "threads",
             "prefill_tokens", "image_modes")  # fmt: skip
    values: dict[str, Any] = {f: getattr(args, f, None) for f in (*fields, *extra)}
    return WorkerSettings(**{k: v for k, v in values.items() if v is not None})


def build_engine(
    settings: WorkerSettings, engine_kind: str, *, scripted_step_delay_s: float = SCRIPTED_STEP_DELAY_S
) -> tuple[Any, str]:
    """The engine and the device name it runs on."""
    if engine_kind == "scripted":
        from workers.scripted import ScriptedEngine

        engine = ScriptedEngine(
            max_batch=settings.max_batch, token_budget=settings.token_budget, step_delay_s=scripted_step_delay_s
        )
        return engine, "scripted"
    if engine_kind != "transformers":
        raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, not {engine_kind!r}")
    import torch

    from workers.engine import TransformersEngine
    from workers.model import load_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.model_path, device=settings.device, dtype=settings.dtype)
    engine = TransformersEngine(
        loaded,
        max_batch=settings.max_batch,
        token_budget=settings.token_budget,
        compile=settings.compile,
        compile_backend=settings.compile_backend,
        prefill_tokens=settings.prefill_tokens,
    )
    if settings.compile:
        started = time.perf_counter()
        try:
            shapes = engine.warmup()
        except Exception as exc:
            raise RuntimeError(
                f"--compile: building the compiled decode step with {settings.compile_backend} failed "
                f"({type(exc).__name__}: {exc}); start the worker without --compile, or with another "
                "--compile-backend"
            ) from exc
        log.info("compiled decode step warmed up for %d shapes in %.1f s", len(shapes), time.perf_counter() - started)
    return engine, str(loaded.device)


def run_worker(
    settings: WorkerSettings,
    *,
    engine_kind: str = "transformers",
    scripted_step_delay_s: float = SCRIPTED_STEP_DELAY_S,
    sweep_interval_s: float = SWEEP_INTERVAL_S,
) -> int:
    """Serve `settings.model_path` until SIGTERM/SIGINT (exit 0) or an unrecoverable device error (non-zero).

    Also sweeps dead peers' jobs, so a deployment without a running controller still recovers them."""
    from infra.redis import connect
    from workers.worker import Worker

    engine, device = build_engine(settings, engine_kind, scripted_step_delay_s=scripted_step_delay_s)
    client = connect(settings.redis_url)
    metrics, stop_metrics = _start_metrics(settings, engine, device)
    worker = Worker(
        settings,
        engine,
        client,
        model_name=settings.resolved_model_name(),
        device=device,
        context_length=getattr(engine, "context_length", None),
        metrics=metrics,
    )
    if metrics is not None:
        metrics.set_info(worker.worker_id, device)
    _install_signal_handlers(worker)
    from contract.sweeper import run_sweeper

    stop_sweeper = threading.Event()
    sweeper = threading.Thread(
        target=run_sweeper, args=(settings.redis_url, sweep_interval_s, stop_sweeper), name="llava-sweeper", daemon=True
    )
    sweeper.start()
    try:
        code = worker.run()
    finally:
        stop_sweeper.set()
        sweeper.join(timeout=5)
        client.close()
        stop_metrics()
    log.info("worker %s exits with code %d", worker.worker_id, code)
    return code


def _start_metrics(settings: WorkerSettings, engine: Any, device: str) -> tuple[Any, Any]:
    """The worker's metrics and a function that stops their HTTP server; (None, no-op) without --metrics-port."""
    if settings.metrics_port is None:
        return None, lambda: None
    from workers.metrics import WorkerMetrics

    metrics = WorkerMetrics(
        model=settings.resolved_model_name(), max_batch=int(getattr(engine, "max_batch", settings.max_batch))
    )
    _, stop = metrics.serve(settings.metrics_host, settings.metrics_port)
    return metrics, stop


def _install_signal_handlers(worker: Any) -> None:
    """SIGTERM/SIGINT: stop claiming and drain; a second signal settles in-flight jobs at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
