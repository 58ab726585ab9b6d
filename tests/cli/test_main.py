"""`llava-serve`: each command imports its own module only, so a worker never loads the web stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.main import COMMANDS, build_parser
from cli.processes import ROOT

PROBE = """
import sys
from cli.main import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("fastapi", "gradio", "torch", "broker.app", "frontend.app") if m in sys.modules)
print("loaded:", ",".join(heavy))
"""


def _modules_loaded_by(*argv: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=list(argv))], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    line = next(line for line in out.splitlines() if line.startswith("loaded:"))
    return {name for name in line.removeprefix("loaded:").strip().split(",") if name}


@pytest.mark.parametrize("argv", [("worker", "--help"), ("--log-level", "DEBUG", "worker", "--help"), ("--help",)])
def test_the_worker_command_loads_neither_the_controller_nor_the_ui(argv: tuple[str, ...]) -> None:
    assert _modules_loaded_by(*argv) == set()


def test_the_controller_command_loads_the_controller_but_not_the_ui() -> None:
    assert _modules_loaded_by("controller", "--help") == {"fastapi", "broker.app"}


def test_every_command_is_listed_and_the_full_parser_knows_every_flag() -> None:
    help_text = build_parser([]).format_help()
    assert all(name in help_text for name, *_ in COMMANDS)
    args = build_parser().parse_args(["--log-level", "DEBUG", "worker", "--model-path", "m", "--drain-timeout-s", "3"])
    assert (args.command, args.model_path, args.drain_timeout_s) == ("worker", "m", 3.0)
