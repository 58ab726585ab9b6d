"""Held-out questions about drawn shapes, answered greedily through the engine and scored by their content words."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from workers.demo.data import QUESTION_KINDS, Turn, answer, is_correct, question
from workers.demo.shapes import MAX_SHAPES, Scene, as_jpeg, draw_scene, multi_shape_scene, single_shape_scene
from workers.model import LoadedModel

EVAL_KINDS = (*QUESTION_KINDS, "follow-up")
# Sizes the training draw never favours: odd, tiny, huge and non-square, unlike its log-uniform sides.
EVAL_SIZES = ((32, 32), (37, 53), (48, 48), (90, 60), (128, 128), (211, 211), (300, 450), (512, 512), (777, 640),
              (1024, 1024), (1024, 700))  # fmt: skip


@dataclass(frozen=True)
class Case:
    kind: str  # one of EVAL_KINDS; a follow-up is scored on its last turn's kind
    scene: Scene
    image: Image.Image
    turns: tuple[Turn, ...]  # the last turn's answer is what the model should say

    @property
    def scored_kind(self) -> str:
        return self.turns[-1].kind


def _scene_for(kind: str, rng: random.Random, i: int) -> Scene:
    if kind == "count":
        count = i % MAX_SHAPES + 1
        return single_shape_scene(rng) if count == 1 else multi_shape_scene(rng, count)
    return single_shape_scene(rng)


def held_out_cases(per_kind: int, seed: int = 10_000) -> list[Case]:
    """`per_kind` cases of every kind, drawn with `seed` at EVAL_SIZES in turn, every third one as JPEG."""
    rng = random.Random(seed)
    cases = []
    for kind in EVAL_KINDS:
        for i in range(per_kind):
            scene = _scene_for(kind, rng, i)
            width, height = EVAL_SIZES[i % len(EVAL_SIZES)]
            image = draw_scene(scene, width, height)
            if i % 3 == 2:
                image = as_jpeg(image, rng.choice((40, 60, 85)))
            if kind == "follow-up":
                first = rng.choice([k for k in QUESTION_KINDS if k != "shape"])
                last = "shape" if first != "colour" or rng.random() < 0.5 else "colour"
                last = "colour" if first == "shape" else last
                turns = (Turn(first, question(first, rng), answer(first, scene)),
                         Turn(last, question(last, rng, follow_up=True), answer(last, scene)))  # fmt: skip
            else:
                turns = (Turn(kind, question(kind, rng), answer(kind, scene)),)
            cases.append(Case(kind, scene, image, turns))
    return cases


def ask(loaded: LoadedModel, cases: list[Case], max_batch: int = 32, max_new_tokens: int = 16) -> list[str]:
    """The model's greedy answer to each case's last question (earlier turns given with their true answers)."""
    from contract.messages import JobImage, JobMessage, JobText, SamplingParams
    from workers.completion import run_to_completion
    from workers.engine import EngineImage, EngineJob, TransformersEngine

    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    jobs = []
    for i, case in enumerate(cases):
        digest = f"demo-case-{i}"
        chat = []
        for t, turn in enumerate(case.turns):
            parts = [JobImage(digest=digest), JobText(text=turn.question)] if t == 0 else [JobText(text=turn.question)]
            chat.append(JobMessage(role="user", content=parts))
            if t < len(case.turns) - 1:
                chat.append(JobMessage(role="assistant", content=[JobText(text=turn.answer)]))
        jobs.append(EngineJob(f"case-{i}", params, messages=chat, images=[EngineImage(digest, case.image)]))
    done = run_to_completion(TransformersEngine(loaded, max_batch=max_batch), jobs)
    return [done[job.job_id].text.strip() for job in jobs]


def is_right(case: Case, text: str) -> bool:
    """True when `text` answers the case's last question (a follow-up is scored on its own kind)."""
    return is_correct(case.scored_kind, case.scene, text)


def score(cases: list[Case], answers: list[str]) -> dict[str, dict[str, float]]:
    """Per kind: n, correct and accuracy."""
    totals, right = Counter[str](), Counter[str]()
    for case, text in zip(cases, answers, strict=True):
        totals[case.kind] += 1
        right[case.kind] += is_right(case, text)
    return {k: {"n": totals[k], "correct": right[k], "accuracy": right[k] / totals[k]} for k in totals}


__all__ = ["EVAL_KINDS", "EVAL_SIZES", "Case", "ask", "held_out_cases", "is_right", "score"]
