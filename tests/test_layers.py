"""The import contract that keeps the layers: every `import` in the source tree (function-level ones included) is
read with `ast` and checked against the rules below; the failure lists every violation."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "broker", "workers", "frontend", "infra", "cli", "bench")
ENGINE_MODULES = ("engine*.py", "batch.py", "slots.py", "running.py", "sampling.py", "text.py", "model.py",
                  "preprocess.py", "kv_budget.py", "completion.py", "decode_parts.py", "faults.py", "positions.py",
                  "processors.py", "families.py", "preparing.py")  # fmt: skip

# (files, forbidden top-level modules, why)
RULES: list[tuple[list[str], set[str], str]] = [
    (["contract/**/*.py"], {"broker", "workers", "frontend", "cli", "bench", "fastapi", "torch", "gradio"},
     "the contract is shared by every side and imports none of them"),
    (["infra/**/*.py"], {"broker", "workers", "frontend", "cli", "bench"}, "infra is the base layer"),
    (["workers/**/*.py", "frontend/**/*.py"], {"broker"}, "workers and the UI never import the controller"),
    ([f"{package}/**/*.py" for package in PACKAGES if package != "bench"], {"bench"}, "nothing imports bench"),
    ([f"workers/{pattern}" for pattern in ENGINE_MODULES], {"redis", "rq"}, "the engine knows nothing of Redis"),
    ([f"{package}/**/*.py" for package in PACKAGES], {"tests"}, "nothing outside the tests imports them"),
]  # fmt: skip


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, absolute, relative imports resolved against its package under `root`."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module:
                names.add(module)
            if not node.module:  # `from . import x` imports the module x
                names.update(f"{module}.{alias.name}".lstrip(".") for alias in node.names)
    return names


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for patterns, forbidden, why in RULES:
        files = sorted({path for pattern in patterns for path in root.glob(pattern)})
        for path in files:
            relative = str(path.relative_to(root))
            for module in sorted(imported_modules(path, root)):
                if module.split(".")[0] in forbidden:
                    found.append(f"{relative} imports {module}: {why}")
    return found


def test_layers_are_kept() -> None:
    found = violations()
    assert not found, "\n".join(found)


def test_the_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "workers" / "engine.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    import redis\n    from .. import broker\n    from rq.job import Job\n")
    assert imported_modules(probe, tmp_path) == {"redis", "broker", "rq.job"}


def test_code_outside_the_tests_may_not_import_them(tmp_path: Path) -> None:
    probe = tmp_path / "bench" / "chaos.py"
    probe.parent.mkdir()
    probe.write_text("from tests.netns import Network\n")
    assert violations(tmp_path) == ["bench/chaos.py imports tests.netns: nothing outside the tests imports them"]
