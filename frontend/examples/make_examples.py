"""Draw the UI's example images with the demo model's own drawing code, and list them with their questions.

Run from the repository root: `python -m frontend.examples.make_examples`. Writes the PNGs and examples.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.demo.shapes import save_example_images

HERE = Path(__file__).parent
# the examples shown in the UI, by their index in `workers.demo.shapes.example_images()`
SHOWN = (0, 2, 5)


def main() -> None:
    for old in HERE.glob("*.png"):
        old.unlink()
    pairs = save_example_images(HERE)
    for i, (name, _) in enumerate(pairs):
        if i not in SHOWN:
            (HERE / name).unlink()
    shown = [{"file": name, "question": question} for i, (name, question) in enumerate(pairs) if i in SHOWN]
    (HERE / "examples.json").write_text(json.dumps(shown, indent=2) + "\n")


if __name__ == "__main__":
    main()
