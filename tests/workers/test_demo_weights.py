"""The shipped demo model, loaded through the real code path, answers questions about drawn images correctly."""

import functools

import pytest
import torch

from workers.demo.data import Turn, answer, is_correct
from workers.demo.evaluate import Case, ask, held_out_cases, score
from workers.demo.shapes import example_images
from workers.demo.train import demo_model_path
from workers.model import load_model


@functools.cache
def demo_loaded():
    torch.set_num_threads(2)
    return load_model(str(demo_model_path()), device="cpu", dtype="float32")


def case(kind, scene, image, question, follow_up=None):
    turns = [Turn(kind, question, answer(kind, scene))]
    if follow_up is not None:
        turns.append(Turn(follow_up[0], follow_up[1], answer(follow_up[0], scene)))
    return Case(follow_up[0] if follow_up else kind, scene, image, tuple(turns))


def test_the_weights_ship_in_the_package_and_are_small():
    path = demo_model_path()
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in path.iterdir()) < 8_000_000


def test_example_images_get_the_right_colour_shape_position_and_count():
    examples = example_images()
    cases = []
    for scene, image in examples:
        if scene.count == 1:
            cases += [
                case("colour", scene, image, "What colour is the shape?"),
                case("shape", scene, image, "What shape is this?"),
                case("position", scene, image, "Where is the shape?"),
                case("describe", scene, image, "Describe the image."),
                case("colour", scene, image, "What colour is it?", ("shape", "And what shape is it?")),
            ]
        cases.append(case("count", scene, image, "How many shapes are there?"))
    answers = ask(demo_loaded(), cases)
    pairs = zip(cases, answers, strict=True)
    wrong = [
        (c.turns[-1].question, c.turns[-1].answer, a) for c, a in pairs if not is_correct(c.scored_kind, c.scene, a)
    ]
    assert not wrong
    red_circle = answers[0]
    assert red_circle == "The shape is red."


@pytest.mark.parametrize("size", [(32, 32), (1024, 768)])
def test_sizes_at_both_ends_of_the_range(size):
    from workers.demo.shapes import draw_scene

    scene, _ = example_images()[1]  # a blue square in the centre
    image = draw_scene(scene, *size)
    (reply,) = ask(demo_loaded(), [case("describe", scene, image, "What do you see?")])
    assert is_correct("describe", scene, reply), reply


def test_held_out_accuracy_is_high():
    cases = held_out_cases(30, seed=4242)
    results = score(cases, ask(demo_loaded(), cases))
    assert results["colour"]["accuracy"] >= 0.9 and results["shape"]["accuracy"] >= 0.9, results
    assert results["count"]["accuracy"] >= 0.8 and results["position"]["accuracy"] >= 0.8, results
