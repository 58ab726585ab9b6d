"""Questions and templated answers about shape scenes: training conversations and answer checking for the demo."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from workers.demo.shapes import COLOURS, KINDS, MAX_SHAPES, POSITIONS, Scene, multi_shape_scene, single_shape_scene

QUESTION_KINDS = ("colour", "shape", "count", "position", "describe")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the shape?",
        "What color is the shape?",
        "What colour is it?",
        "Which colour is the shape in this image?",
        "What is the colour of the shape?",
        "Tell me the color of the shape.",
        "what color is it",
    ),
    "shape": (
        "What shape is this?",
        "What kind of shape is it?",
        "Which shape is in the image?",
        "What is the shape?",
        "Is it a circle, a square or a triangle?",
        "Name the shape.",
        "what shape is it",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "Count the shapes.",
        "How many shapes do you see?",
        "What is the number of shapes?",
        "how many shapes",
    ),
    "position": (
        "Where is the shape?",
        "Where is the shape in the image?",
        "Where is it?",
        "In which part of the image is the shape?",
        "Where is the shape located?",
        "where is it",
    ),
    "describe": (
        "Describe the image.",
        "What is in this image?",
        "What do you see?",
        "Describe the picture in one sentence.",
        "What is shown here?",
        "describe this",
    ),
}

# Follow-ups in a conversation that already talked about the image.
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "colour": ("And what colour is it?", "And what color is it?", "What about its colour?", "And its colour?"),
    "shape": ("And what shape is it?", "What kind of shape is it?", "And its shape?", "And which shape is it?"),
    "count": ("And how many shapes are there?", "How many shapes are there?", "And how many shapes?"),
    "position": ("And where is it?", "Where is it?", "And where is the shape?", "And its position?"),
    "describe": ("And can you describe the image?", "Now describe the image.", "Describe it."),
}

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}


@dataclass(frozen=True)
class Turn:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    scene: Scene
    turns: tuple[Turn, ...]


def kinds_for(scene: Scene) -> tuple[str, ...]:
    """The question kinds that have one right answer for `scene` (colour, shape, position: a single shape)."""
    if scene.count == 1 and scene.position is not None:
        return QUESTION_KINDS
    return ("count", "describe")


def answer(kind: str, scene: Scene) -> str:
    """The templated answer to a `kind` question about `scene`."""
    if kind not in kinds_for(scene):
        raise ValueError(f"question kind {kind!r} has no single answer for a scene of {scene.count} shapes")
    if kind == "count" or (kind == "describe" and scene.count > 1):
        return "There is 1 shape." if scene.count == 1 else f"There are {scene.count} shapes."
    shape = scene.shapes[0]
    where = _POSITION_PHRASE[scene.position or "centre"]  # kinds_for ensured a position
    if kind == "colour":
        return f"The shape is {shape.colour}."
    if kind == "shape":
        return f"It is a {shape.kind}."
    if kind == "position":
        return f"The shape is {where}."
    return f"A {shape.colour} {shape.kind} {where}."


def question(kind: str, rng: random.Random, follow_up: bool = False) -> str:
    return rng.choice((FOLLOW_UPS if follow_up else QUESTIONS)[kind])


def random_scene(rng: random.Random) -> Scene:
    """Two thirds single shapes (in a position region), one third 2..MAX_SHAPES shapes."""
    if rng.random() < 0.66:
        return single_shape_scene(rng)
    return multi_shape_scene(rng, rng.randint(2, MAX_SHAPES))


def random_sample(rng: random.Random, scene: Scene | None = None) -> Sample:
    """A conversation of 1..3 turns about `scene` (drawn from `rng` when None), each turn a different kind."""
    scene = scene or random_scene(rng)
    kinds = list(kinds_for(scene))
    if len(kinds) == len(QUESTION_KINDS):
        weights = [0.23, 0.27, 0.12, 0.23, 0.15]
    else:
        weights = [0.75, 0.25]
    first = rng.choices(kinds, weights)[0]
    order = [first] + rng.sample([k for k in kinds if k != first], len(kinds) - 1)
    n_turns = 1 if rng.random() < 0.6 else rng.randint(2, min(3, len(order)))
    turns = tuple(
        Turn(kind, question(kind, rng, follow_up=i > 0), answer(kind, scene)) for i, kind in enumerate(order[:n_turns])
    )
    return Sample(scene, turns)


def messages(turns: tuple[Turn, ...] | list[Turn], *, with_last_answer: bool = True) -> list[dict]:
    """Chat-template messages: the image in the first user turn; the last answer left out when asked."""
    out: list[dict] = []
    for i, turn in enumerate(turns):
        content: list[dict] = [{"type": "text", "text": turn.question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        out.append({"role": "user", "content": content})
        if with_last_answer or i < len(turns) - 1:
            out.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def found(kind: str, text: str) -> set[str]:
    """The attribute words of `kind` (colour, shape, count, position) that `text` mentions."""
    words = _words(text)
    if kind == "colour":
        return {w for w in words if w in COLOURS}
    if kind == "shape":
        singular = {w[:-1] if w.endswith("s") else w for w in words}
        return {k for k in KINDS if k in singular}
    if kind == "count":
        return {str(_NUMBER_WORDS.get(w, w)) for w in words if w.isdigit() or w in _NUMBER_WORDS}
    if kind == "position":
        return {"centre" if w in ("center", "middle") else w for w in words if w in (*POSITIONS, "center", "middle")}
    raise ValueError(f"no attribute words for kind {kind!r}")


def is_correct(kind: str, scene: Scene, text: str) -> bool:
    """True when `text` names exactly the right attribute(s) for a `kind` question about `scene`."""
    if kind == "count" or (kind == "describe" and scene.count > 1):
        return found("count", text) == {str(scene.count)}
    shape = scene.shapes[0]
    if kind == "colour":
        return found("colour", text) == {shape.colour}
    if kind == "shape":
        return found("shape", text) == {shape.kind}
    if kind == "position":
        return found("position", text) == {scene.position}
    return (
        found("colour", text) == {shape.colour}
        and found("shape", text) == {shape.kind}
        and found("position", text) == {scene.position}
    )


def corpus() -> list[str]:
    """Every question and answer form, for training the demo tokenizer."""
    texts = [q for qs in (*QUESTIONS.values(), *FOLLOW_UPS.values()) for q in qs]
    for colour in COLOURS:
        for kind in KINDS:
            for where in _POSITION_PHRASE.values():
                texts.append(f"A {colour} {kind} {where}. The shape is {colour}. It is a {kind}.")
    texts += [
        f"There are {n} shapes. There is 1 shape. The shape is {w}."
        for n in range(2, 5)
        for w in _POSITION_PHRASE.values()
    ]
    return texts
