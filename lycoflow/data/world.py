"""The toy world: a procedural generator of small captioned images that the toy base model and the toy evaluation
encoders are pretrained on (`lycoflow.tools.pretrain`).

A scene is one figure — a shape (circle, square, triangle, diamond, cross, hexagon), a creature (cat, fish) — or a
pattern filling the image (polka dots, grid, horizontal stripes), in one of eight colours, small or large, at one
of five positions, on one of eight backgrounds (the quickstart data set's six pale ones and two dark ones), drawn in
one of five rendering styles (flat, outlined, hatched, pixelated, watercolor). Its caption comes from a small
grammar, half the time as a sentence ("a small red star on the left on a pale blue background, hatched"), half as
the tag list the quickstart data set's captions use ("red, circle, small, on the left, pale blue background,
hatched"), with some attributes left unsaid, so the model learns each word on its own. Everything is a function of
(seed, index): the same world on every machine.

What the world leaves out is what the quickstart data set (`lycoflow.data.synthetic`) is made of — stars, rings,
checkerboards, diagonal stripes, round creatures with eyes, robots, teal and magenta, and pictures made of beads —
so fine-tuning on it teaches the base concepts it never saw.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor

WORLD_VERSION = 1  # bump when drawings or captions change: the shipped weights were trained on version 1
SIZE = 64
SUPERSAMPLE = 2  # drawn at twice the size and reduced: PIL's polygons have no anti-aliasing
Colour = tuple[int, int, int]
#: The quickstart data set's backgrounds (`lycoflow.data.synthetic`), a subset of the world's.
PALE_BACKGROUNDS: dict[str, Colour] = {
    "white": (246, 246, 246), "light grey": (200, 200, 204), "pale blue": (188, 212, 238),
    "pale green": (198, 232, 198), "beige": (236, 224, 198), "pink": (244, 208, 220),
}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "hexagon")
CREATURES = ("cat", "fish")
PATTERNS = ("polka dots", "grid", "horizontal stripes")
COLOURS: dict[str, Colour] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 180), "black": (25, 25, 25), "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, Colour] = {**PALE_BACKGROUNDS, "dark grey": (70, 70, 74), "navy": (24, 32, 80)}
SIZES = ("small", "large")
POSITIONS = ("centered", "on the left", "on the right", "at the top", "at the bottom")
#: Rendering styles; "flat" is the unmarked one (no word in the caption).
STYLES = ("flat", "outlined", "hatched", "pixelated", "watercolor")
#: Every word a caption can hold, for the toy text encoders' vocabulary.
VOCABULARY = sorted({w for phrase in (*SHAPES, *CREATURES, *PATTERNS, *COLOURS, *BACKGROUNDS, *SIZES, *POSITIONS,
                                      *STYLES, "background", "pattern", "a", "an", "on")
                     for w in phrase.split()})

#: Evaluation prompts in the world's words (`lycoflow.evaluation.ToyWorldProtocol`); ``{}`` is the concept.
ALTER_TEMPLATES = (
    "{} on a navy background", "{} on a pale green background", "a small {} on the left",
    "a large {} at the top", "{} at the bottom on a pink background", "{} on a dark grey background",
)
STYLE_TEMPLATES = ("{}, outlined", "{}, hatched", "{}, pixelated", "{}, watercolor")


@dataclass(frozen=True)
class Scene:
    """What one image shows. ``figure`` is a shape, a creature or a pattern."""

    figure: str
    colour: str
    size: str
    position: str
    background: str
    style: str

    @property
    def is_pattern(self) -> bool:
        return self.figure in PATTERNS


def distinct(a: Colour, b: Colour) -> bool:
    """Whether a figure of colour ``a`` stands out on a background of colour ``b`` (no white on white)."""
    return sum((x - y) ** 2 for x, y in zip(a, b)) > 90**2


def random_scene(rng: random.Random) -> Scene:
    kind = rng.random()
    figure = rng.choice(SHAPES if kind < 0.6 else CREATURES if kind < 0.8 else PATTERNS)
    colour = rng.choice(sorted(COLOURS))
    background = rng.choice([b for b in sorted(BACKGROUNDS) if distinct(COLOURS[colour], BACKGROUNDS[b])])
    return Scene(figure, colour, rng.choice(SIZES), rng.choice(POSITIONS), background, rng.choice(STYLES))


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption of ``scene`` from the grammar: a sentence or a tag list, some attributes left out."""
    style = "" if scene.style == "flat" else scene.style
    background = f"{scene.background} background" if rng.random() < 0.85 else ""
    if scene.is_pattern:
        colour = scene.colour if rng.random() < 0.9 else ""
        if rng.random() < 0.5:
            sentence = " ".join(filter(None, [colour, scene.figure])) + (f" on a {background}" if background else "")
            return ", ".join(filter(None, [sentence, style]))
        return ", ".join(filter(None, [colour, scene.figure, "pattern", background, style]))
    colour = scene.colour if rng.random() < 0.9 else ""
    size = scene.size if rng.random() < 0.7 else ""
    position = scene.position if rng.random() < 0.7 else ""
    if rng.random() < 0.5:
        noun = " ".join(filter(None, [size, colour, scene.figure]))
        article = "an" if noun[0] in "aeiou" else "a"
        sentence = " ".join(filter(None, [f"{article} {noun}", position, f"on a {background}" if background else ""]))
        return ", ".join(filter(None, [sentence, style]))
    return ", ".join(filter(None, [colour, scene.figure, size, position, background, style]))


def _centre(scene: Scene, rng: random.Random, side: int) -> tuple[float, float, float]:
    """Centre x, y and radius of the figure on a canvas of ``side`` pixels."""
    r = side * (rng.uniform(0.14, 0.2) if scene.size == "small" else rng.uniform(0.27, 0.36))
    margin = r + 0.04 * side
    jitter = lambda: rng.uniform(-0.04, 0.04) * side  # noqa: E731 - a nudge, so positions are regions, not points
    cx, cy = side / 2 + jitter(), side / 2 + jitter()
    if scene.position == "on the left":
        cx = margin + abs(jitter())
    elif scene.position == "on the right":
        cx = side - margin - abs(jitter())
    elif scene.position == "at the top":
        cy = margin + abs(jitter())
    elif scene.position == "at the bottom":
        cy = side - margin - abs(jitter())
    return cx, cy, r


def _polygon(n: int, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    return [(cx + r * math.sin(turn + 2 * math.pi * k / n), cy - r * math.cos(turn + 2 * math.pi * k / n))
            for k in range(n)]


def _outline(figure: str, cx: float, cy: float, r: float, rng: random.Random) -> list[list[tuple[float, float]]]:
    """The figure as polygons (circles and ellipses as many-sided ones), so every style can fill or stroke it."""
    if figure == "circle":
        return [_polygon(48, cx, cy, r, 0)]
    if figure == "square":
        return [_polygon(4, cx, cy, r * 1.2, math.pi / 4 + rng.uniform(-0.15, 0.15))]
    if figure == "triangle":
        return [_polygon(3, cx, cy + 0.15 * r, r * 1.15, rng.uniform(-0.15, 0.15))]
    if figure == "diamond":
        return [[(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]]
    if figure == "hexagon":
        return [_polygon(6, cx, cy, r, rng.uniform(0, math.pi / 3))]
    if figure == "cross":
        a, b = 0.32 * r, r
        return [[(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx - a, cy + b)],
                [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy + a), (cx - b, cy + a)]]
    if figure == "cat":  # a head with two ears
        head = _polygon(40, cx, cy + 0.12 * r, 0.78 * r, 0)
        ears = [[(cx + s * 0.72 * r, cy - 0.05 * r), (cx + s * 0.6 * r, cy - 0.95 * r), (cx + s * 0.12 * r,
                                                                                          cy - 0.5 * r)]
                for s in (-1, 1)]
        return [head, *ears]
    if figure == "fish":  # a body and a tail, facing left or right
        facing = rng.choice((-1, 1))
        body = [(cx - 0.15 * facing * r + 0.75 * r * math.cos(t), cy + 0.45 * r * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
        tail = [(cx - facing * 0.6 * r, cy), (cx - facing * r, cy - 0.45 * r), (cx - facing * r, cy + 0.45 * r)]
        return [body, tail]
    raise ValueError(f"unknown figure {figure!r}")


def _eyes(draw: ImageDraw.ImageDraw, scene: Scene, cx: float, cy: float, r: float, ink: Colour) -> None:
    spots = [(cx - 0.3 * r, cy + 0.05 * r), (cx + 0.3 * r, cy + 0.05 * r)] if scene.figure == "cat" else []
    for x, y in spots:
        draw.ellipse((x - 0.1 * r, y - 0.1 * r, x + 0.1 * r, y + 0.1 * r), fill=ink)


def _pattern(draw: ImageDraw.ImageDraw, scene: Scene, rng: random.Random, side: int, colour: Colour,
             stroked: bool, width: int) -> None:
    """A pattern over the whole canvas, filled with ``colour`` or (``stroked``) only outlined in it."""
    step = side * (rng.uniform(0.14, 0.2) if scene.size == "small" else rng.uniform(0.24, 0.32))
    offset = rng.uniform(0, step)
    fill, outline = (None, colour) if stroked else (colour, None)
    count = int(side / step) + 2
    for i in range(-1, count):
        if scene.figure == "horizontal stripes":
            y = i * step + offset
            draw.rectangle((-width, y, side + width, y + step / 2), fill=fill, outline=outline, width=width)
        elif scene.figure == "grid":  # lines are strokes in every style
            x = i * step + offset
            draw.rectangle((x, 0, x + step / 5, side), fill=colour)
            draw.rectangle((0, x, side, x + step / 5), fill=colour)
        else:  # polka dots
            for j in range(-1, count):
                x, y = j * step + offset + (step / 2 if i % 2 else 0), i * step + offset
                draw.ellipse((x - step / 4, y - step / 4, x + step / 4, y + step / 4), fill=fill, outline=outline,
                             width=width)


def render(scene: Scene, rng: random.Random, size: int = SIZE) -> Image.Image:
    """``scene`` drawn at ``size``² (RGB); ``rng`` places and turns the figure."""
    side = size * SUPERSAMPLE
    colour, background = COLOURS[scene.colour], BACKGROUNDS[scene.background]
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    width = max(2, side // 28)
    stroked = scene.style in ("outlined", "hatched")
    if scene.is_pattern:
        _pattern(draw, scene, rng, side, colour, stroked, width)
        if scene.style == "hatched":
            _hatch(canvas, colour, side, rng)
    else:
        cx, cy, r = _centre(scene, rng, side)
        polygons = _outline(scene.figure, cx, cy, r, rng)
        if stroked:
            mask = Image.new("L", (side, side), 0)
            for poly in polygons:
                ImageDraw.Draw(mask).polygon(poly, fill=255)
            if scene.style == "hatched":
                lines = Image.new("L", (side, side), 0)
                _hatch_mask(ImageDraw.Draw(lines), side, width, rng)
                canvas.paste(colour, (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(lines))))
            edge = mask.filter(ImageFilter.MaxFilter(2 * (width // 2) + 1))
            ring = Image.fromarray(((np.asarray(edge) > 0) & (np.asarray(mask.filter(ImageFilter.MinFilter(
                2 * (width // 2) + 1))) == 0)).astype(np.uint8) * 255)
            canvas.paste(colour, (0, 0), ring)
        else:
            for poly in polygons:
                draw.polygon(poly, fill=colour)
        eye = (250, 250, 250) if sum(colour) < 200 else (20, 20, 20)
        _eyes(draw, scene, cx, cy + 0.1 * r, r, eye if not stroked else colour)
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if scene.style == "pixelated":
        block = size // 12
        image = image.resize((size // block, size // block), Image.Resampling.BOX).resize((size, size),
                                                                                          Image.Resampling.NEAREST)
    elif scene.style == "watercolor":
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(size / 40)), dtype=np.float32)
        grain = _grain(rng, size)
        image = Image.fromarray(np.clip(pixels * (0.92 + 0.16 * grain[..., None]), 0, 255).astype(np.uint8))
    return image


def _grain(rng: random.Random, size: int) -> np.ndarray:
    """Smooth paper-like brightness variation in [0, 1], ``size``² (watercolor)."""
    coarse = np.array([[rng.random() for _ in range(6)] for _ in range(6)], dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)).clip(0, 1)


def _hatch_mask(draw: ImageDraw.ImageDraw, side: int, width: int, rng: random.Random) -> None:
    step = 3 * width
    offset = rng.randrange(step)
    for start in range(-side + offset, 2 * side, step):
        draw.line((start, side, start + side, 0), fill=255, width=width)


def _hatch(canvas: Image.Image, colour: Colour, side: int, rng: random.Random) -> None:
    """Hatching over the whole image (patterns: their outlines are hatched inside the stroked shapes)."""
    lines = Image.new("L", (side, side), 0)
    _hatch_mask(ImageDraw.Draw(lines), side, max(2, side // 28) // 2, rng)
    canvas.paste(colour, (0, 0), lines.point(lambda v: v // 2))


def scene_at(index: int, seed: int = 0) -> tuple[Scene, str, Image.Image]:
    """The world's image ``index`` under ``seed``: its scene, caption and picture (a private random stream)."""
    rng = random.Random(f"world/{WORLD_VERSION}/{seed}/{index}")  # str seeds hash with SHA-512: stable
    scene = random_scene(rng)
    return scene, caption(scene, rng), render(scene, rng)


def world_tensors(count: int, seed: int = 0, start: int = 0) -> tuple[Tensor, list[str], list[Scene]]:
    """Images ``start`` … ``start + count - 1``: uint8 ``[count, 3, 64, 64]``, their captions and scenes."""
    scenes, captions, pixels = [], [], np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(count):
        scene, text, image = scene_at(start + i, seed)
        scenes.append(scene)
        captions.append(text)
        pixels[i] = np.asarray(image)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, scenes
