"""`llava-serve`: one command, one subcommand per process kind."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Collection
from pathlib import Path


def _controller(args: argparse.Namespace) -> int:
    from broker.app import controller_settings_from_args, run_controller

    return run_controller(controller_settings_from_args(args))


def _worker(args: argparse.Namespace) -> int:
    from workers.cli import run_worker, worker_settings_from_args

    return run_worker(
        worker_settings_from_args(args), engine_kind=args.engine, scripted_step_delay_s=args.scripted_step_delay_s
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


def _export(args: argparse.Namespace) -> int:
    from cli.export import run_export_command

    return run_export_command(args)


def _train_demo_model(args: argparse.Namespace) -> int:
    from workers.demo.train import train_demo_model_command

    return train_demo_model_command(args)


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    from workers.cli import add_worker_arguments

    add_worker_arguments(parser)


def _controller_arguments(parser: argparse.ArgumentParser) -> None:
    from broker.app import add_controller_arguments

    add_controller_arguments(parser)


def _web_arguments(parser: argparse.ArgumentParser) -> None:
    from frontend.app import add_web_arguments

    add_web_arguments(parser)


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    from cli.up import add_up_arguments

    add_up_arguments(parser)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    from broker.status import add_status_arguments

    add_status_arguments(parser)


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    from cli.replay import add_replay_arguments

    add_replay_arguments(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from cli.export import add_export_arguments

    add_export_arguments(parser)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=15.0, help="cut a slow run short (default 15)")


def _tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0)


# name, help, flags (imports the command's module), run
COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("up", "start Redis (embedded unless configured), the controller, workers and the UI", _up_arguments, _up),
    ("controller", "the HTTP API in front of Redis (port 10000)", _controller_arguments, _controller),
    ("worker", "a model worker: loads a model and serves its queue", _worker_arguments, _worker),
    ("web", "the Gradio web UI, a client of the controller (port 7860)", _web_arguments, _web),
    ("status", "workers, queues and recent rates, read from Redis (--watch to follow)", _status_arguments, _status),
    ("replay", "re-run flagged (or voted) conversations against a model and write a side-by-side report",
     _replay_arguments, _replay),
    ("export", "write a training set (LLaVA's format, preference pairs, images) from the conversation log and "
     "feedback", _export_arguments, _export),
    ("train-demo-model", "train the shapes demo LLaVA in DIR on images it draws, offline", _train_arguments,
     _train_demo_model),
    ("tiny-model", "build a tiny random-weight LLaVA in DIR, offline, for tests", _tiny_arguments, _tiny_model),
]  # fmt: skip


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `llava-serve` parser. Only the flags of `commands` are added (None: every command's), so that a
    command imports its own module and no other (a worker never loads the web app)."""
    parser = argparse.ArgumentParser(prog="llava-serve", description="Serve LLaVA-style multimodal chat over Redis.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        command = sub.add_parser(name, help=help_text)
        if commands is None or name in commands:
            add_arguments(command)
        command.set_defaults(run=run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command word of `argv` (the first word that is neither a global option nor its value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    command = _command_in(argv)
    args = build_parser([command] if command else []).parse_args(argv)
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
