import random

import pytest

from workers.demo.shapes import (
    COLOURS,
    KINDS,
    POSITIONS,
    as_jpeg,
    draw_scene,
    example_images,
    multi_shape_scene,
    random_size,
    render,
    save_example_images,
    single_shape_scene,
)


def test_single_shape_scene_respects_requests_and_stays_inside():
    rng = random.Random(0)
    for _ in range(200):
        scene = single_shape_scene(rng)
        (shape,) = scene.shapes
        assert shape.colour in COLOURS and shape.kind in KINDS and scene.position in POSITIONS
        assert min(shape.x, 1 - shape.x, shape.y, 1 - shape.y) > shape.radius
    scene = single_shape_scene(rng, colour="purple", kind="triangle", position="bottom")
    assert (scene.shapes[0].colour, scene.shapes[0].kind, scene.position) == ("purple", "triangle", "bottom")
    assert scene.shapes[0].y > 0.7


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_multi_shape_scene_has_count_separate_shapes(count):
    rng = random.Random(count)
    for _ in range(20):
        scene = multi_shape_scene(rng, count)
        assert scene.count == count
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                assert ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 > a.radius + b.radius


def test_multi_shape_scene_rejects_bad_count():
    with pytest.raises(ValueError, match="count must be 1..4"):
        multi_shape_scene(random.Random(0), 5)


def test_drawing_puts_the_colour_where_the_shape_is():
    scene = single_shape_scene(random.Random(1), colour="red", kind="square", position="left")
    for width, height in [(32, 32), (300, 200), (1024, 1024)]:
        image = draw_scene(scene, width, height)
        assert image.size == (width, height) and image.mode == "RGB"
        shape = scene.shapes[0]
        r, g, b = image.getpixel((int(shape.x * width), int(shape.y * height)))
        assert r > 150 and g < 90 and b < 90
        assert image.getpixel((width - 1, height // 2)) == scene.background


def test_drawing_is_deterministic_and_jpeg_keeps_size():
    scene = multi_shape_scene(random.Random(2), 3)
    assert draw_scene(scene, 128).tobytes() == draw_scene(scene, 128).tobytes()
    assert as_jpeg(draw_scene(scene, 100, 60), 50).size == (100, 60)


def test_random_sizes_cover_the_range_and_render_uses_them():
    rng = random.Random(3)
    sides = [s for _ in range(500) for s in random_size(rng)]
    assert min(sides) >= 32 and max(sides) <= 1024 and min(sides) < 48 and max(sides) > 700
    image = render(single_shape_scene(rng), rng)
    assert 32 <= min(image.size) and max(image.size) <= 1024


def test_example_images_are_fixed():
    first, again = example_images(), example_images()
    assert len(first) == 7
    assert [s for s, _ in first] == [s for s, _ in again]
    assert first[0][0].shapes[0].colour == "red" and first[0][0].position == "left"


def test_save_example_images_writes_pngs_with_questions(tmp_path):
    from PIL import Image

    pairs = save_example_images(tmp_path)
    assert len(pairs) == 7 and pairs[0] == ("demo_0_red_circle.png", "What colour is the shape?")
    for name, question in pairs:
        assert Image.open(tmp_path / name).size == (256, 256)
        assert question[-1] in "?."
