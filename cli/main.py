"""`llava-serve`: one command, one subcommand per process kind."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _controller(args: argparse.Namespace) -> int:
    from broker.app import controller_settings_from_args, run_controller

    return run_controller(controller_settings_from_args(args))


def _worker(args: argparse.Namespace) -> int:
    from workers.cli import run_worker, worker_settings_from_args

    return run_worker(
        worker_settings_from_args(args), engine_kind=args.engine, scripted_step_delay=args.scripted_step_delay
    )


def _web(args: argparse.Namespace) -> int:
    from frontend.app import run_web, web_settings_from_args

    return run_web(web_settings_from_args(args))


def _up(args: argparse.Namespace) -> int:
    from cli.up import run_up

    return run_up(args)


def _tiny_model(args: argparse.Namespace) -> int:
    from workers.tiny_model import build_tiny_model

    path = build_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny LLaVA (random weights) saved in {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from broker.status import run_status

    return run_status(args)


def _replay(args: argparse.Namespace) -> int:
    from cli.replay import run_replay_command

    return run_replay_command(args)


def _train_demo_model(args: argparse.Namespace) -> int:
    from workers.demo.train import train_demo_model_command

    return train_demo_model_command(args)


def build_parser() -> argparse.ArgumentParser:
    from broker.app import add_controller_arguments
    from cli.up import add_up_arguments
    from frontend.app import add_web_arguments
    from workers.cli import add_worker_arguments

    parser = argparse.ArgumentParser(prog="llava-serve", description="Serve LLaVA-style multimodal chat over Redis.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Redis (embedded unless configured), the controller, workers and the UI")
    add_up_arguments(up)
    up.set_defaults(run=_up)

    controller = sub.add_parser("controller", help="the HTTP API in front of Redis (port 10000)")
    add_controller_arguments(controller)
    controller.set_defaults(run=_controller)

    worker = sub.add_parser("worker", help="a model worker: loads a model and serves its queue")
    add_worker_arguments(worker)
    worker.set_defaults(run=_worker)

    web = sub.add_parser("web", help="the Gradio web UI, a client of the controller (port 7860)")
    add_web_arguments(web)
    web.set_defaults(run=_web)

    from broker.status import add_status_arguments
    from cli.replay import add_replay_arguments

    status = sub.add_parser("status", help="workers, queues and recent rates, read from Redis (--watch to follow)")
    add_status_arguments(status)
    status.set_defaults(run=_status)

    replay = sub.add_parser(
        "replay", help="re-run flagged (or voted) conversations against a model and write a side-by-side report"
    )
    add_replay_arguments(replay)
    replay.set_defaults(run=_replay)

    train = sub.add_parser("train-demo-model", help="train the shapes demo LLaVA in DIR on images it draws, offline")
    train.add_argument("dir", help="directory to write the model to")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-minutes", type=float, default=15.0, help="cut a slow run short (default 15)")
    train.set_defaults(run=_train_demo_model)

    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight LLaVA in DIR, offline, for tests")
    tiny.add_argument("dir", help="directory to write the model to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
