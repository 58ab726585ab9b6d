"""Scenes of simple coloured shapes and their drawing with Pillow: the demo model's world, its data and UI examples.

A scene is described in normalised coordinates (0..1 across width and height, sizes as a fraction of the shorter
side), so the same scene draws at any pixel size and aspect ratio.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 85, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 180),
}
KINDS = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
MAX_SHAPES = 4
MIN_SIDE, MAX_SIDE = 32, 1024

# Where a single shape's centre may fall for each position word: (x range, y range), normalised.
_REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.14, 0.28), (0.36, 0.64)),
    "right": ((0.72, 0.86), (0.36, 0.64)),
    "top": ((0.36, 0.64), (0.14, 0.28)),
    "bottom": ((0.36, 0.64), (0.72, 0.86)),
    "centre": ((0.42, 0.58), (0.42, 0.58)),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    x: float  # centre, 0..1 of the width
    y: float  # centre, 0..1 of the height
    radius: float  # circumradius, fraction of the shorter image side
    angle: float = 0.0  # rotation in degrees (squares and triangles)
    rgb: tuple[int, int, int] | None = None  # the exact fill; None draws COLOURS[colour]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int] = (255, 255, 255)
    outline: bool = False  # a dark outline around each shape, as a person might draw
    position: str | None = None  # the position word of a single shape, when it lies in one region

    @property
    def count(self) -> int:
        return len(self.shapes)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return (255, 255, 255)
    base = rng.randint(228, 255)
    return tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))  # type: ignore[return-value]


def _angle(kind: str, rng: random.Random) -> float:
    return 0.0 if kind == "circle" or rng.random() < 0.5 else rng.uniform(-20.0, 20.0)


def single_shape_scene(
    rng: random.Random, *, colour: str | None = None, kind: str | None = None, position: str | None = None
) -> Scene:
    """One shape in one of the five position regions; unspecified attributes are drawn from `rng`."""
    colour = colour or rng.choice(list(COLOURS))
    kind = kind or rng.choice(KINDS)
    position = position or rng.choice(POSITIONS)
    (x0, x1), (y0, y1) = _REGIONS[position]
    x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
    # Stay inside the image (edge distance in units of the shorter side is at least the normalised distance).
    room = min(x, 1 - x, y, 1 - y) - 0.02
    radius = min(rng.uniform(0.09, 0.24), room)
    shape = Shape(kind, colour, x, y, radius, _angle(kind, rng), _jitter(COLOURS[colour], rng, 18))
    return Scene((shape,), _background(rng), rng.random() < 0.2, position)


def multi_shape_scene(rng: random.Random, count: int | None = None) -> Scene:
    """`count` (1..MAX_SHAPES) non-overlapping shapes of any colours and kinds at random places."""
    count = count or rng.randint(1, MAX_SHAPES)
    if not 1 <= count <= MAX_SHAPES:
        raise ValueError(f"count must be 1..{MAX_SHAPES}, not {count}")
    while True:
        shapes: list[Shape] = []
        for _ in range(200):
            if len(shapes) == count:
                break
            radius = rng.uniform(0.07, 0.15)
            x, y = rng.uniform(radius + 0.02, 0.98 - radius), rng.uniform(radius + 0.02, 0.98 - radius)
            # Normalised distances understate pixel distances on the longer side, so this keeps shapes apart.
            if all(math.hypot(x - s.x, y - s.y) > radius + s.radius + 0.04 for s in shapes):
                colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
                shapes.append(Shape(kind, colour, x, y, radius, _angle(kind, rng), _jitter(COLOURS[colour], rng, 18)))
        if len(shapes) == count:
            return Scene(tuple(shapes), _background(rng), rng.random() < 0.2, None)


def _polygon(shape: Shape, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape.kind == "square":
        corners = [45.0, 135.0, 225.0, 315.0]
    else:  # triangle, pointing up
        corners = [-90.0, 30.0, 150.0]
    return [
        (cx + r * math.cos(math.radians(a + shape.angle)), cy + r * math.sin(math.radians(a + shape.angle)))
        for a in corners
    ]


def draw_scene(scene: Scene, width: int, height: int | None = None) -> Image.Image:
    """Draw `scene` as an RGB image of `width` x `height` pixels (square when height is None)."""
    height = height or width
    for name, side in (("width", width), ("height", height)):
        if not 8 <= side <= 4096:
            raise ValueError(f"{name} must be 8..4096 pixels, not {side}")
    image = Image.new("RGB", (width, height), scene.background)
    draw = ImageDraw.Draw(image)
    unit = min(width, height)
    for shape in scene.shapes:
        cx, cy, r = shape.x * width, shape.y * height, shape.radius * unit
        fill = shape.rgb or COLOURS[shape.colour]
        outline = (30, 30, 30) if scene.outline else None
        line = max(1, round(unit / 100)) if scene.outline else 0
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=line)
        else:
            # A square of circumradius r looks bigger than a circle of radius r; scale so areas are similar.
            scale = 0.95 if shape.kind == "square" else 1.15
            draw.polygon(_polygon(shape, cx, cy, r * scale), fill=fill, outline=outline, width=line)
    return image


def as_jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Round-trip `image` through JPEG at `quality` (1..95), as an upload from a phone or browser might be."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def random_size(rng: random.Random, low: int = MIN_SIDE, high: int = MAX_SIDE) -> tuple[int, int]:
    """A width and height log-uniform in [low, high], half square, half up to 3:2 either way."""
    side = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    if rng.random() < 0.5:
        return side, side
    other = min(high, max(low, round(side * rng.uniform(0.67, 1.5))))
    return (side, other) if rng.random() < 0.5 else (other, side)


def render(scene: Scene, rng: random.Random, low: int = MIN_SIDE, high: int = MAX_SIDE) -> Image.Image:
    """Draw `scene` at a random size, a third of the time round-tripped through JPEG."""
    width, height = random_size(rng, low, high)
    image = draw_scene(scene, width, height)
    return as_jpeg(image, rng.randint(35, 95)) if rng.random() < 0.33 else image


def example_images(seed: int = 0, size: int = 256) -> list[tuple[Scene, Image.Image]]:
    """A few fixed scenes (one per position, then two counts) for the UI's examples and for tests."""
    rng = random.Random(seed)
    picks = [
        ("red", "circle", "left"),
        ("blue", "square", "centre"),
        ("green", "triangle", "top"),
        ("yellow", "circle", "bottom"),
        ("purple", "square", "right"),
    ]
    scenes = [single_shape_scene(rng, colour=c, kind=k, position=p) for c, k, p in picks]
    scenes += [multi_shape_scene(rng, 3), multi_shape_scene(rng, 2)]
    return [(scene, draw_scene(scene, size)) for scene in scenes]


# A question the demo model answers well for each of `example_images()`, in order (for the UI's examples).
EXAMPLE_QUESTIONS = (
    "What colour is the shape?",
    "Describe the image.",
    "What shape is this?",
    "Where is the shape?",
    "What colour is it?",
    "How many shapes are there?",
    "How many shapes are in the image?",
)


def save_example_images(directory: Path | str, seed: int = 0, size: int = 256) -> list[tuple[str, str]]:
    """Write `example_images()` as PNGs in `directory`; return (file name, question) pairs for the UI."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, ((scene, image), question) in enumerate(zip(example_images(seed, size), EXAMPLE_QUESTIONS, strict=True)):
        if scene.count == 1:
            name = f"demo_{i}_{scene.shapes[0].colour}_{scene.shapes[0].kind}.png"
        else:
            name = f"demo_{i}_{scene.count}_shapes.png"
        image.save(directory / name, optimize=True)
        pairs.append((name, question))
    return pairs
