import random

import pytest

from workers.demo.data import (
    FOLLOW_UPS,
    QUESTION_KINDS,
    QUESTIONS,
    answer,
    corpus,
    found,
    is_correct,
    kinds_for,
    messages,
    random_sample,
)
from workers.demo.shapes import multi_shape_scene, single_shape_scene


@pytest.fixture
def red_circle_left():
    return single_shape_scene(random.Random(0), colour="red", kind="circle", position="left")


def test_answers_are_templated(red_circle_left):
    assert answer("colour", red_circle_left) == "The shape is red."
    assert answer("shape", red_circle_left) == "It is a circle."
    assert answer("count", red_circle_left) == "There is 1 shape."
    assert answer("position", red_circle_left) == "The shape is on the left."
    assert answer("describe", red_circle_left) == "A red circle on the left."
    three = multi_shape_scene(random.Random(0), 3)
    assert answer("count", three) == answer("describe", three) == "There are 3 shapes."


def test_multi_shape_scenes_have_no_single_colour(red_circle_left):
    three = multi_shape_scene(random.Random(0), 3)
    assert kinds_for(three) == ("count", "describe") and kinds_for(red_circle_left) == QUESTION_KINDS
    with pytest.raises(ValueError, match="no single answer"):
        answer("colour", three)


def test_every_kind_has_several_phrasings_and_follow_ups():
    for kind in QUESTION_KINDS:
        assert len(QUESTIONS[kind]) >= 5 and len(FOLLOW_UPS[kind]) >= 3


def test_samples_are_deterministic_and_multi_turn():
    first = [random_sample(random.Random(7)) for _ in range(3)]
    assert first == [random_sample(random.Random(7)) for _ in range(3)]
    rng = random.Random(1)
    samples = [random_sample(rng) for _ in range(400)]
    lengths = {len(s.turns) for s in samples}
    assert lengths == {1, 2, 3}
    for sample in samples:
        kinds = [t.kind for t in sample.turns]
        assert len(set(kinds)) == len(kinds)
        assert all(t.answer == answer(t.kind, sample.scene) for t in sample.turns)
        assert all(t.question in FOLLOW_UPS[t.kind] for t in sample.turns[1:])
    counts = {s.scene.count for s in samples}
    assert counts == {1, 2, 3, 4}


def test_messages_put_the_image_first_and_can_leave_the_last_answer_out(red_circle_left):
    sample = random_sample(random.Random(3), red_circle_left)
    chat = messages(sample.turns)
    assert chat[0]["content"][0] == {"type": "image"}
    assert [m["role"] for m in chat] == ["user", "assistant"] * len(sample.turns)
    assert messages(sample.turns, with_last_answer=False)[-1]["role"] == "user"


def test_is_correct_checks_content_words(red_circle_left):
    assert is_correct("colour", red_circle_left, "It is red.")
    assert not is_correct("colour", red_circle_left, "It is red or blue.")
    assert is_correct("shape", red_circle_left, "Circles!")
    assert is_correct("position", red_circle_left, "left")
    assert not is_correct("position", red_circle_left, "top left")
    assert is_correct("describe", red_circle_left, "A red circle on the left.")
    assert not is_correct("describe", red_circle_left, "A red square on the left.")
    three = multi_shape_scene(random.Random(0), 3)
    assert is_correct("count", three, "three shapes") and not is_correct("count", three, "There are 4 shapes.")
    assert found("position", "in the center") == {"centre"}


def test_corpus_covers_every_answer_word():
    text = " ".join(corpus())
    for word in ("red", "purple", "triangle", "centre", "bottom", "4"):
        assert word in text
