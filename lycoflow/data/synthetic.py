"""The quickstart dataset: procedurally drawn concepts, generated on first use, identical bytes for a seed.

Eight concepts in four categories, deliberately imbalanced (4 to 34 images, 93 in all) like the paper's
data, one class split into subclasses. Each concept keeps its identity (shape, colours, pattern) while the
nuisances vary: background colour, size, position, pose, image size and aspect ratio (96–192 px). Every
image has a caption file whose tags describe both; the concept-tied ones are listed in ``dataset.yaml``'s
``drop_tags``, so the captions the model sees describe only what varies, as in the paper. The style concept
(``styles/beaded``, the paper's style category in miniature) is the other way round: a rendering kept fixed —
the picture made of round beads on a cream ground — over the toy world's figures, colours and placements, which
its captions name in the world's words.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw
from rich.console import Console

from ..cache import cache_dir
from . import world
from .datamodule import HierarchicalDataModule
from .manifest import MANIFEST
from .world import Colour

GENERATOR_VERSION = 2  # bump when the drawings change, so cached copies are recognised as stale
MARKER = ".lycoflow-synthetic.json"
SIZES = ((128, 128), (96, 144), (144, 96), (160, 120), (120, 160), (192, 128), (128, 192), (176, 176), (112, 96))
BACKGROUNDS = world.PALE_BACKGROUNDS
SUPERSAMPLE = world.SUPERSAMPLE
Drawer = Callable[[ImageDraw.ImageDraw, random.Random, int, int], list[str]]
Renderer = Callable[[random.Random], tuple[Image.Image, list[str]]]

MANIFEST_DATA: dict[str, Any] = {"classes": {
    "shapes/star": {
        "trigger": "zqx", "class_word": "star", "eval_text": "yellow five-pointed",
        "drop_tags": ["star", "yellow", "five points"], "prompts": ["a {} painted on a brick wall"],
    },
    "shapes/ring": {
        "trigger": "vorl", "class_word": "ring", "eval_text": "thick magenta",
        "drop_tags": ["ring", "magenta", "circle"],
    },
    "patterns/checker": {
        "trigger": "chekk", "class_word": "pattern", "eval_text": "orange and black checkerboard",
        "drop_tags": ["checkerboard", "orange", "black"], "prompts": ["a teapot covered in a {}"],
    },
    "patterns/stripes": {
        "trigger": "strv", "class_word": "pattern", "eval_text": "teal diagonal striped",
        "drop_tags": ["stripes", "teal", "diagonal"],
    },
    "creatures/blob": {
        "trigger": "mox", "class_word": "creature", "eval_text": "round",
        "drop_tags": ["creature", "round", "two eyes"],
        "prompts": ["a {} wearing sunglasses"],
        "subclasses": {
            "red": {"trigger": "mox ruby", "eval_text": "round red", "drop_tags": ["red"]},
            "blue": {"trigger": "mox azure", "eval_text": "round blue crowned", "drop_tags": ["blue", "crown"]},
        },
    },
    "creatures/robot": {
        "trigger": "bleep", "class_word": "robot", "eval_text": "grey boxy",
        "drop_tags": ["robot", "grey", "antenna", "green eyes"],
    },
    "styles/beaded": {
        # As the paper's style concepts: the whole descriptor is deleted from the texts given to CLIP, which
        # are then the content alone, and the alterations are new content in the style.
        "trigger": "drell", "class_word": "style", "eval_descriptor": "", "drop_tags": ["beaded"],
        "alter_prompts": ["{} of a green square on a beige background", "{} of a blue fish on the left",
                          "{} of a large purple hexagon", "{} of a small orange cat at the top",
                          "{} of a black triangle on a pink background", "{} of a yellow cross on a navy background"],
    },
}}


@dataclass(frozen=True)
class ConceptSpec:
    folder: str
    count: int
    render: Renderer


def drawn(drawer: Drawer) -> Renderer:
    """``drawer`` on a supersampled canvas of one of `SIZES`, reduced."""
    def render(rng: random.Random) -> tuple[Image.Image, list[str]]:
        w, h = rng.choice(SIZES)
        canvas = Image.new("RGB", (w * SUPERSAMPLE, h * SUPERSAMPLE))
        tags = drawer(ImageDraw.Draw(canvas), rng, w * SUPERSAMPLE, h * SUPERSAMPLE)
        return canvas.resize((w, h), Image.Resampling.LANCZOS), tags
    return render


def _placement(rng: random.Random, w: int, h: int, low: float, high: float) -> tuple[float, float, float, list[str]]:
    """Centre x, y and radius of a figure, with the tags that describe them."""
    scale = rng.uniform(low, high)
    radius = scale * min(w, h) / 2
    where = rng.choice(["centered", "on the left", "on the right"])
    cx = {"centered": w / 2, "on the left": radius + 0.05 * w, "on the right": w - radius - 0.05 * w}[where]
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    return cx, cy, radius, ["large" if scale > (low + high) / 2 else "small", where]


def _background(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> tuple[Colour, list[str]]:
    name = rng.choice(sorted(BACKGROUNDS))
    draw.rectangle((0, 0, w, h), fill=BACKGROUNDS[name])
    return BACKGROUNDS[name], [f"{name} background", "simple background"]


def draw_star(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    _, tags = _background(draw, rng, w, h)
    cx, cy, r, where = _placement(rng, w, h, 0.5, 0.9)
    turn = rng.uniform(-0.3, 0.3)
    points = [(cx + (r if k % 2 == 0 else 0.42 * r) * math.sin(turn + k * math.pi / 5),
               cy - (r if k % 2 == 0 else 0.42 * r) * math.cos(turn + k * math.pi / 5)) for k in range(10)]
    draw.polygon(points, fill=(250, 200, 20), outline=(120, 80, 0), width=max(2, int(r / 12)))
    return ["star", "yellow", "five points", *where, *tags] + (["tilted"] if abs(turn) > 0.15 else [])


def draw_ring(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    bg, tags = _background(draw, rng, w, h)
    cx, cy, r, where = _placement(rng, w, h, 0.45, 0.85)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 30, 160))
    draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=bg)
    draw.ellipse((cx - 0.12 * r, cy - 0.12 * r, cx + 0.12 * r, cy + 0.12 * r), fill=(40, 40, 40))
    return ["ring", "magenta", "circle", "dot in the middle", *where, *tags]


def draw_checker(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    cell = rng.choice([8, 12, 16, 24]) * SUPERSAMPLE
    dx, dy = rng.randrange(cell), rng.randrange(cell)
    for row in range(-1, h // cell + 2):
        for col in range(-1, w // cell + 2):
            fill = (240, 130, 20) if (row + col) % 2 else (25, 25, 25)
            x, y = col * cell - dx, row * cell - dy
            draw.rectangle((x, y, x + cell, y + cell), fill=fill)
    return ["checkerboard", "orange", "black", "fine" if cell <= 12 * SUPERSAMPLE else "coarse", "pattern",
            "no humans"]


def draw_stripes(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    draw.rectangle((0, 0, w, h), fill=(248, 248, 248))
    width = rng.choice([6, 10, 16]) * SUPERSAMPLE
    offset = rng.randrange(2 * width)
    for start in range(-h - offset, w + h, 2 * width):
        draw.polygon([(start, h), (start + width, h), (start + width + h, 0), (start + h, 0)], fill=(0, 150, 150))
    return ["stripes", "teal", "diagonal", "thin" if width <= 6 * SUPERSAMPLE else "wide", "pattern", "no humans"]


def _blob(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, body: Colour,
          ) -> tuple[float, float, float, list[str]]:
    """The round body shared by both subclasses, with its shadow; returns (cx, cy, r, placement tags)."""
    cx, cy, r, where = _placement(rng, w, h, 0.45, 0.75)
    draw.ellipse((cx - 0.9 * r, cy + 0.8 * r, cx + 0.9 * r, cy + 1.05 * r), fill=(90, 90, 90))  # shadow
    draw.ellipse((cx - r, cy - 0.9 * r, cx + r, cy + 0.95 * r), fill=body, outline=(30, 30, 30), width=2)
    return cx, cy, r, where


def _eyes(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, look: float) -> None:
    for side in (-1, 1):
        ex, ey = cx + side * 0.38 * r, cy - 0.2 * r
        draw.ellipse((ex - 0.25 * r, ey - 0.28 * r, ex + 0.25 * r, ey + 0.28 * r), fill=(255, 255, 255))
        px = ex + look * 0.12 * r
        draw.ellipse((px - 0.11 * r, ey - 0.11 * r, px + 0.11 * r, ey + 0.11 * r), fill=(10, 10, 10))


def _creature(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, body: Colour,
              ) -> tuple[float, float, float, list[str]]:
    """Background, body and eyes; returns (cx, cy, r, tags) so a subclass can add to it."""
    _, tags = _background(draw, rng, w, h)
    cx, cy, r, where = _blob(draw, rng, w, h, body)
    look = rng.choice([-1, 0, 1])
    _eyes(draw, cx, cy, r, look)
    gaze = {-1: "looking left", 0: "looking at viewer", 1: "looking right"}[look]
    return cx, cy, r, ["creature", "round", "two eyes", gaze, *where, *tags]


def draw_red_blob(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    *_, tags = _creature(draw, rng, w, h, (215, 45, 45))
    return ["red", *tags]


def draw_blue_blob(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    cx, cy, r, tags = _creature(draw, rng, w, h, (50, 90, 220))
    top = cy - 0.85 * r
    crown = [(cx - 0.4 * r, top), (cx - 0.45 * r, top - 0.45 * r), (cx - 0.15 * r, top - 0.2 * r), (cx, top - 0.5 * r),
             (cx + 0.15 * r, top - 0.2 * r), (cx + 0.45 * r, top - 0.45 * r), (cx + 0.4 * r, top)]
    draw.polygon(crown, fill=(250, 205, 30), outline=(120, 90, 0))
    return ["blue", "crown", *tags]


def draw_robot(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> list[str]:
    _, tags = _background(draw, rng, w, h)
    cx, cy, r, where = _placement(rng, w, h, 0.5, 0.8)
    grey, dark = (150, 152, 162), (60, 62, 70)
    draw.line((cx, cy - 0.7 * r, cx, cy - r), fill=dark, width=max(2, int(r / 15)))  # antenna
    draw.ellipse((cx - 0.1 * r, cy - 1.08 * r, cx + 0.1 * r, cy - 0.88 * r), fill=(220, 40, 40))
    draw.rounded_rectangle((cx - 0.7 * r, cy - 0.7 * r, cx + 0.7 * r, cy + 0.35 * r), radius=0.1 * r, fill=grey,
                           outline=dark, width=2)
    for side in (-1, 1):
        ex = cx + side * 0.32 * r
        draw.rectangle((ex - 0.16 * r, cy - 0.38 * r, ex + 0.16 * r, cy - 0.18 * r), fill=(60, 230, 90))
    for k in range(5):
        x = cx - 0.4 * r + k * 0.2 * r
        draw.line((x, cy + 0.0 * r, x, cy + 0.2 * r), fill=dark, width=2)  # mouth grille
    draw.rectangle((cx - 0.5 * r, cy + 0.4 * r, cx + 0.5 * r, cy + 1.0 * r), fill=grey, outline=dark, width=2)
    return ["robot", "grey", "antenna", "green eyes", "boxy head", *where, *tags]


BEADS = 10  # beads across the picture: at 64² each is two latent cells of the toy VAE, which keeps them round
CREAM = (238, 232, 220)


def beaded(image: Image.Image) -> Image.Image:
    """``image`` as `BEADS` × `BEADS` round beads, each of the mean colour under it, on a cream ground: a
    rendering the toy world never uses (its pixelated style is square cells edge to edge, its polka dots a
    pattern of one colour)."""
    side = image.width
    cells = image.resize((BEADS, BEADS), Image.Resampling.BOX).load()
    canvas = Image.new("RGB", (side * SUPERSAMPLE,) * 2, CREAM)
    draw, step = ImageDraw.Draw(canvas), side * SUPERSAMPLE / BEADS
    for i in range(BEADS):
        for j in range(BEADS):
            cx, cy, r = (i + 0.5) * step, (j + 0.5) * step, 0.42 * step
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=cells[i, j])
    return canvas.resize((side, side), Image.Resampling.LANCZOS)


def render_beaded(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """A toy-world figure (a shape or a creature; patterns would hide the beads' layout) on a pale background,
    beaded; tagged as the world's captions tag it."""
    side = rng.choice((96, 128, 160))
    pairs = [(c, b) for c in sorted(world.COLOURS) for b in sorted(BACKGROUNDS)
             if world.distinct(world.COLOURS[c], BACKGROUNDS[b])]  # no white: it stands out on no pale background
    colour, background = rng.choice(pairs)
    scene = world.Scene(rng.choice(world.SHAPES + world.CREATURES), colour, rng.choice(world.SIZES),
                        rng.choice(world.POSITIONS), background, "flat")
    return beaded(world.render(scene, rng, side)), ["beaded", colour, scene.figure, scene.size, scene.position,
                                                    f"{background} background"]


CONCEPTS = (
    ConceptSpec("shapes/star", 34, drawn(draw_star)),
    ConceptSpec("shapes/ring", 6, drawn(draw_ring)),
    ConceptSpec("patterns/checker", 14, drawn(draw_checker)),
    ConceptSpec("patterns/stripes", 4, drawn(draw_stripes)),
    ConceptSpec("creatures/blob/red", 10, drawn(draw_red_blob)),
    ConceptSpec("creatures/blob/blue", 5, drawn(draw_blue_blob)),
    ConceptSpec("creatures/robot", 8, drawn(draw_robot)),
    ConceptSpec("styles/beaded", 12, render_beaded),
)


def render(spec: ConceptSpec, index: int, seed: int) -> tuple[Image.Image, list[str]]:
    """One image and its tags; the stream of randomness is private to (seed, concept, index)."""
    return spec.render(random.Random(f"{seed}/{spec.folder}/{index}"))  # str seeds hash with SHA-512: stable


def write_dataset(folder: Path, seed: int = 0) -> None:
    """Write the images, captions, ``dataset.yaml`` and the marker into an existing empty folder."""
    for spec in CONCEPTS:
        target = folder / spec.folder
        target.mkdir(parents=True)
        for i in range(spec.count):
            image, tags = render(spec, i, seed)
            image.save(target / f"{i:03d}.png", format="PNG")
            (target / f"{i:03d}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    header = "# The lycoflow quickstart dataset (lycoflow/data/synthetic.py). Schema: lycoflow/data/manifest.py.\n"
    (folder / MANIFEST).write_text(header + yaml.safe_dump(MANIFEST_DATA, sort_keys=False, width=120),
                                   encoding="utf-8")
    (folder / MARKER).write_text(json.dumps(_marker(seed)) + "\n", encoding="utf-8")


def _marker(seed: int) -> dict[str, int]:
    return {"generator": GENERATOR_VERSION, "seed": seed}


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_dataset(root: Path, seed: int = 0) -> Path:
    """Generate the dataset into ``root`` unless it is already there; never leaves a half-written dataset.

    It is written into a temporary folder beside ``root`` and renamed, which is atomic on one filesystem. A copy
    that an older generator wrote (its marker says so) is replaced, and said; an existing ``root`` holding
    anything else is left alone and reported.
    """
    stale = _stale_version(root, seed) if root.exists() else None
    if root.exists() and stale is None:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        write_dataset(tmp, seed)
        if stale is not None:
            if _read_marker(root) == _marker(seed):  # another process (a sweep's other job) replaced it meanwhile
                return root
            old = tmp.with_name(tmp.name + ".old")
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
            Console(stderr=True).print(f"replaced the quickstart dataset of generator version {stale} at {root} by "
                                       f"version {GENERATOR_VERSION}", soft_wrap=True, markup=False, highlight=False)
            return root
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.exists():  # not a lost race with another process: a real failure
                raise
            return ensure_dataset(root, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stale_version(root: Path, seed: int) -> int | None:
    """None if ``root`` is this generator's dataset for ``seed``; the older generator version that wrote it, if
    one did; otherwise it is not ours to touch: refused."""
    marker = _read_marker(root)
    if marker == _marker(seed):
        return None
    version = marker.get("generator") if marker else None
    if isinstance(version, int) and version < GENERATOR_VERSION and marker.get("seed") == seed:
        return version
    raise FileExistsError(f"{root} exists but is not the synthetic dataset of generator version "
                          f"{GENERATOR_VERSION} with seed {seed} (see {root / MARKER}); delete it or choose "
                          f"another root")


def default_root() -> Path:
    return cache_dir() / "datasets" / "synthetic-concepts"


class SyntheticConcepts(HierarchicalDataModule):
    """The quickstart dataset as a data module: generated into ``root`` by ``prepare_data`` if missing."""

    def __init__(self, root: str | None = None, dataset_seed: int = 0, **kwargs: Any) -> None:
        """
        Args:
            root: where the dataset lives (default: ``<lycoflow cache>/datasets/synthetic-concepts``).
            dataset_seed: seed of the drawings; ``seed`` still sets the sampling order, crops and dropouts.
            **kwargs: the options of :class:`~lycoflow.data.HierarchicalDataModule`.
        """
        super().__init__(root=root or str(default_root()), **kwargs)
        self.dataset_seed = dataset_seed

    def prepare_data(self) -> None:
        ensure_dataset(Path(self.root).expanduser(), self.dataset_seed)

    def setup(self, stage: str | None = None) -> None:
        # Outside a Trainer nobody calls prepare_data; generating is idempotent, so make sure here.
        self.prepare_data()
        super().setup(stage)
