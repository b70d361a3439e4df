"""The hierarchical, class-balanced, captioned training data of DESIGN §5 (paper §5.1).

A dataset is a folder tree ``category/class[/subclass]/`` of images, each with an optional caption file
beside it (``x.png`` + ``x.txt``: comma-separated tags). Every folder that holds images is one leaf
concept; its depth says what it is (1: class, 2: category/class, 3: category/class/subclass). kohya's
``N_name`` image folders mean "repeat each image N times" and name the concept ``name``.

An optional ``dataset.yaml`` at the root describes the concepts (see :func:`load_manifest`)::

    classes:
      shapes/star:                     # a folder, relative to the root
        trigger: zqx                   # the concept descriptor that starts every caption ...
        class_word: star               # ... followed by the class word: "zqx star, tag1, ..., tagk"
        eval_text: yellow              # replaces the trigger in the text given to CLIP for evaluation
        drop_tags: [star, yellow]      # tags tied to the concept, removed from its captions
        prompts: ["{} on a beach"]     # extra evaluation prompts; {} stands for "trigger class_word"
        repeats: 3                     # fixed repeats per epoch, instead of balancing
        subclasses:
          red: {trigger: zqx ruby, drop_tags: [red]}   # shapes/star/red; unset fields inherit

Without a manifest each image folder is a class whose name is its trigger.

Balance: each epoch gives every group (leaf concept, class or category, per ``balance``) exactly as many
exposures as the largest group has images; within a group every image is seen ``⌊T/n⌋`` times and
``T mod n`` images chosen afresh each epoch once more. Concepts with explicit repeats are left out of the
balancing and get exactly ``repeats`` exposures per image.

Determinism: the sampler draws the epoch's order and one 63-bit seed per position from (seed, epoch)
alone, and yields ``(image index, sample seed)``; the dataset derives the crop, flip, tag shuffle and
dropouts from that sample seed. Nothing reads the global RNG, so batches do not depend on worker count,
on earlier epochs, or on what else the process drew (which is what resuming from a checkpoint needs).

Aspect-ratio buckets (``bucketing``, kohya's scheme): every (w, h) in multiples of ``bucket_step`` within
[min, max] on each side with w·h ≤ resolution²; each image goes to the bucket nearest its aspect ratio (with
``bucket_no_upscale``, an image under resolution² in area gets its own size rounded down to the step), is
resized to cover it and cropped. :class:`BucketBatchSampler` cuts the epoch plan into batches of one bucket
and shuffles their order from (seed, epoch); the loader takes it as its *sampler* with ``batch_size=None``,
so under DDP Lightning wraps it like the plain sampler and rank r gets whole batches r, r+W, ... (disjoint;
the last few repeated so that every rank takes as many steps).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .cache import cache_dir as default_cache_dir
from .encodings import TEXT_BATCH, Encoders, EncodingCache, file_digests, fill, latent_key, text_key

MANIFEST = "dataset.yaml"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Manifest fields of one class/subclass entry and the Python type each must have.
ENTRY_FIELDS: dict[str, type] = {
    "trigger": str, "class_word": str, "eval_text": str, "drop_tags": list, "prompts": list, "repeats": int,
}
_KOHYA = re.compile(r"^([1-9][0-9]*)_(.+)$")
_EXIF_ORIENTATION = 0x0112
_LAYOUT = "category/class[/subclass]"

Bucket = tuple[int, int]  # (width, height) of the training image
Balance = Literal["none", "category", "class", "subclass"]
OnBadFile = Literal["error", "skip"]


@dataclass(frozen=True)
class Concept:
    """One leaf class: the images of one folder and how to caption and evaluate them.

    ``eval_text`` defaults to the trigger (no replacement); ``prompts`` hold ``{}`` for :attr:`descriptor`.
    ``repeats`` is None when the concept is balanced, else its fixed repeats per epoch.
    """

    category: str
    class_name: str
    subclass: str
    folder: Path
    trigger: str
    class_word: str = ""
    eval_text: str = ""
    drop_tags: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    repeats: int | None = None
    images: tuple[Path, ...] = ()

    @property
    def key(self) -> str:
        """``category/class/subclass`` without the empty levels, e.g. ``shapes/star``."""
        return "/".join(p for p in (self.category, self.class_name, self.subclass) if p)

    @property
    def descriptor(self) -> str:
        """What every caption starts with: ``"{trigger} {class word}"``."""
        return f"{self.trigger} {self.class_word}".strip()


@dataclass(frozen=True)
class Sample:
    """One usable image: its concept (index into the concept list), its cleaned tags and upright size (w, h)."""

    path: Path
    concept: int
    tags: tuple[str, ...]
    size: tuple[int, int]


@dataclass(frozen=True)
class _Folder:
    path: Path
    raw: tuple[str, ...]  # folder names as on disk
    parts: tuple[str, ...]  # logical names: a kohya ``N_`` prefix stripped from image folders
    images: tuple[Path, ...]
    repeats: int | None  # kohya's N
    is_leaf: bool


# ---------------------------------------------------------------- manifest


def load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and strictly validate a ``dataset.yaml``.

    Returns ``{folder key: fields}``; subclass entries are flattened to ``"class key/subclass"``. A key may
    also name a category folder, whose fields then apply to every class below it.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable YAML file ({err}); fix its syntax") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with the key 'classes', got {type(data).__name__}")
    for key in data:
        if key != "classes":
            raise ValueError(f"{path}: unknown top-level key {key!r}; the only key is 'classes'")
    classes = data.get("classes") or {}
    if not isinstance(classes, dict):
        raise ValueError(f"{path}: 'classes' must map folder paths to class entries")
    entries: dict[str, dict[str, Any]] = {}
    for key, value in classes.items():
        folder = _clean_key(key, path, "classes")
        fields, subclasses = _parse_entry(value, path, f"classes.{key}", nested=True)
        _add_entry(entries, folder, fields, path)
        for sub, sub_value in subclasses.items():
            where = f"classes.{key}.subclasses.{sub}"
            sub_fields, _ = _parse_entry(sub_value, path, where, nested=False)
            _add_entry(entries, f"{folder}/{_clean_key(sub, path, where)}", sub_fields, path)
    return entries


def _clean_key(key: Any, path: Path, where: str) -> str:
    if not isinstance(key, str) or not key.strip("/ "):
        raise ValueError(f"{path}: {where}: key {key!r} must be a folder path such as 'shapes/star'")
    return key.strip("/ ")


def _add_entry(entries: dict[str, dict[str, Any]], key: str, fields: dict[str, Any], path: Path) -> None:
    if key in entries:
        raise ValueError(f"{path}: folder {key!r} is described twice; merge the two entries")
    entries[key] = fields


def _parse_entry(value: Any, path: Path, where: str, nested: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate one class entry; returns (fields, subclass entries)."""
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {where}: expected a mapping of fields, got {type(value).__name__}")
    allowed = sorted(ENTRY_FIELDS) + (["subclasses"] if nested else [])
    fields: dict[str, Any] = {}
    subclasses: dict[str, Any] = {}
    for key, item in value.items():
        if key == "subclasses" and nested:
            if not isinstance(item, dict):
                raise ValueError(f"{path}: {where}.subclasses: expected a mapping of subfolder names to entries")
            subclasses = item
        elif key not in ENTRY_FIELDS:
            raise ValueError(f"{path}: {where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        else:
            fields[key] = _check_field(key, item, path, where)
    return fields, subclasses


def _check_field(key: str, item: Any, path: Path, where: str) -> Any:
    kind = ENTRY_FIELDS[key]
    if kind is list:
        if isinstance(item, str):
            item = [item]
        if not isinstance(item, list) or not all(isinstance(x, str) for x in item):
            raise ValueError(f"{path}: {where}.{key}: expected a list of strings, got {item!r}")
        return tuple(item)
    if kind is int:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"{path}: {where}.{key}: expected a whole number >= 1, got {item!r}")
        return item
    if not isinstance(item, str) or (key == "trigger" and not item.strip()):
        raise ValueError(f"{path}: {where}.{key}: expected a non-empty string, got {item!r}")
    return item.strip()


# ---------------------------------------------------------------- folder scan


def _walk(root: Path) -> list[_Folder]:
    """Every non-hidden folder under root (root excluded), depth first in name order."""
    folders: list[_Folder] = []

    def visit(path: Path, raw: tuple[str, ...], parts: tuple[str, ...], repeats: int | None) -> None:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        images = tuple(Path(e.path) for e in entries if e.is_file() and _is_image(e.name))
        if raw:
            folders.append(_Folder(path, raw, parts, images, repeats, is_leaf=not subdirs))
        for sub in subdirs:
            # kohya's convention applies to image folders only, so "2023_trip/" above them keeps its name.
            holds_images = any(_is_image(name) for name in os.listdir(sub.path))
            match = _KOHYA.match(sub.name) if holds_images else None
            name, count = (match.group(2), int(match.group(1))) if match else (sub.name, None)
            visit(Path(sub.path), raw + (sub.name,), parts + (name,), count)

    visit(root, (), (), None)
    return folders


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _hierarchy(folder: _Folder) -> tuple[str, str, str]:
    """(category, class, subclass) from the folder's depth: class, category/class or category/class/subclass."""
    parts = folder.parts
    if len(parts) == 1:
        return "", parts[0], ""
    if len(parts) == 2:
        return parts[0], parts[1], ""
    if len(parts) == 3:
        return parts
    raise ValueError(f"{folder.path} is nested {len(parts)} folders deep; the layout is {_LAYOUT}/images")


def _make_concept(folder: _Folder, manifest: dict[str, dict[str, Any]]) -> Concept:
    """Defaults from the folder (trigger = its name, kohya repeats), then each ancestor's manifest entry in turn."""
    category, class_name, subclass = _hierarchy(folder)
    values: dict[str, Any] = {"trigger": folder.parts[-1], "repeats": folder.repeats}
    drop_tags: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    for depth in range(1, len(folder.parts) + 1):
        entry = manifest.get("/".join(folder.parts[:depth])) or manifest.get("/".join(folder.raw[:depth])) or {}
        # Tag and prompt lists accumulate down the tree; the other fields override.
        drop_tags += entry.get("drop_tags", ())
        prompts += entry.get("prompts", ())
        values.update({k: v for k, v in entry.items() if k not in ("drop_tags", "prompts")})
    values.setdefault("eval_text", values["trigger"])
    return Concept(category, class_name, subclass, folder.path, drop_tags=drop_tags, prompts=prompts,
                   images=folder.images, **values)


def _folder_keys(folders: Sequence[_Folder]) -> set[str]:
    return {"/".join(f.parts) for f in folders} | {"/".join(f.raw) for f in folders}


def read_tags(path: Path) -> list[str]:
    """A caption file's tags: comma- or line-separated, stripped, empties dropped."""
    return [t.strip() for t in re.split(r"[,\n]", path.read_text(encoding="utf-8")) if t.strip()]


def _norm(tag: str) -> str:
    # Booru-style tags use underscores; compare "five_points" and "Five points" as equal.
    return " ".join(tag.replace("_", " ").lower().split())


def clean_tags(tags: Sequence[str], concept: Concept) -> tuple[str, ...]:
    """Remove the concept-tied tags and those repeating the caption's head; drop duplicates, keep order."""
    banned = {_norm(t) for t in (*concept.drop_tags, concept.trigger, concept.class_word, concept.descriptor)}
    seen: set[str] = set()
    kept = []
    for tag in tags:
        key = _norm(tag)
        if key and key not in banned and key not in seen:
            seen.add(key)
            kept.append(tag)
    return tuple(kept)


def build_caption(head: str, tags: Sequence[str], keep_tokens: int = 1, shuffle: bool = False,
                  tag_dropout: float = 0.0, rng: np.random.Generator | None = None) -> str:
    """``"head, tag1, ..., tagk"``; without ``rng`` the tags stay as given.

    The first ``keep_tokens`` comma-separated tokens (the head counts as one) stay in place and are never
    dropped; the rest are dropped with probability ``tag_dropout`` and shuffled if ``shuffle`` (kohya's
    semantics).
    """
    tokens = [head, *tags] if head else list(tags)
    fixed, rest = tokens[:keep_tokens], tokens[keep_tokens:]
    if rng is not None and tag_dropout > 0:
        rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= tag_dropout]
    if rng is not None and shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(fixed + rest)


def probe_image(path: Path) -> tuple[int, int]:
    """Decode the image once (JPEG at 1/8 scale) so corrupt files fail at setup; returns its upright (w, h)."""
    with Image.open(path) as img:
        size = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90°: width and height swap
            size = size[::-1]
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    return size


def _check_file(path: Path, caption_extension: str, min_side: int = 0,
                ) -> tuple[tuple[int, int], list[str]] | str:
    """(size, raw tags) of a usable image, or why it is not usable."""
    try:
        size = probe_image(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image: {err}"
    if min(size) < min_side:
        return (f"image {size[0]}x{size[1]} is smaller than the smallest bucket (min_bucket_resolution {min_side}); "
                f"use a larger image or lower min_bucket_resolution")
    caption = path.with_suffix(caption_extension)
    try:
        tags = read_tags(caption) if caption.is_file() else []
    except UnicodeDecodeError:
        return f"caption {caption.name} is not UTF-8 text"
    return size, tags


def scan(root: Path, caption_extension: str = ".txt", on_bad_file: OnBadFile = "error", min_side: int = 0,
         ) -> tuple[list[Concept], list[Sample], list[tuple[Path, str]]]:
    """Read a dataset folder: (concepts, usable samples, skipped (path, reason)). The folder is never modified.

    Images with a side under ``min_side`` (the smallest bucket) are bad files too.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; set data.root to a folder "
                                f"laid out as {_LAYOUT}/images")
    if any(_is_image(p.name) for p in root.iterdir() if p.is_file()):
        raise ValueError(f"{root} holds images directly; move them into class folders ({_LAYOUT}/images)")
    folders = _walk(root)
    manifest_path = root / MANIFEST
    manifest = load_manifest(manifest_path) if manifest_path.is_file() else {}
    known = _folder_keys(folders)
    for key in manifest:
        if key not in known:
            raise FileNotFoundError(f"{manifest_path}: classes.{key} names folder {root / key}, which does not exist; "
                                    f"fix the key or create the folder (folders: {', '.join(sorted(known)) or 'none'})")
    skipped: list[tuple[Path, str]] = []
    for folder in folders:
        if folder.is_leaf and not folder.images:
            _bad(folder.path, f"empty class folder: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                 on_bad_file, skipped)
    image_folders = [f for f in folders if f.images]
    if not image_folders:
        raise ValueError(f"no images under {root}; the layout is {_LAYOUT}/images")
    paths = [p for f in image_folders for p in f.images]
    # Decoding dominates setup; PIL releases the GIL while decoding, so threads help.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checks = dict(zip(paths, pool.map(lambda p: _check_file(p, caption_extension, min_side), paths)))
    concepts: list[Concept] = []
    samples: list[Sample] = []
    for folder in image_folders:
        concept = _make_concept(folder, manifest)
        usable = []
        for path in folder.images:
            check = checks[path]
            if isinstance(check, str):
                _bad(path, check, on_bad_file, skipped)
            else:
                usable.append(Sample(path, len(concepts), clean_tags(check[1], concept), check[0]))
        if not usable:
            _bad(folder.path, "no usable images left in this class folder", on_bad_file, skipped)
            continue
        concepts.append(replace(concept, images=tuple(s.path for s in usable)))
        samples.extend(usable)
    return concepts, samples, skipped


def _bad(path: Path, reason: str, on_bad_file: OnBadFile, skipped: list[tuple[Path, str]]) -> None:
    if on_bad_file == "error":
        raise ValueError(f"{path}: {reason}; fix or remove it, or set on_bad_file: skip to leave it out")
    skipped.append((path, reason))


def apply_repeats(concepts: Sequence[Concept], repeats: dict[str, int]) -> list[Concept]:
    """Explicit repeats by folder key (a concept's key or an ancestor's; the deepest match wins)."""
    ancestry = {c.key: _ancestors(c.key) for c in concepts}
    known = {k for keys in ancestry.values() for k in keys}
    by_key = {}
    for key, value in repeats.items():
        if key.strip("/") not in known:
            raise ValueError(f"repeats: unknown folder {key!r}; use one of: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"repeats: {key!r} must be a whole number >= 1, got {value!r}")
        by_key[key.strip("/")] = value
    out = []
    for concept in concepts:
        hits = [by_key[k] for k in ancestry[concept.key] if k in by_key]
        out.append(replace(concept, repeats=hits[-1]) if hits else concept)
    return out


def _ancestors(key: str) -> list[str]:
    """``"a/b/c"`` → ``["a", "a/b", "a/b/c"]``."""
    parts = key.split("/")
    return ["/".join(parts[:d]) for d in range(1, len(parts) + 1)]


# ---------------------------------------------------------------- balancing and sampling

Quota = tuple[np.ndarray, int]  # sample indices, and how many exposures they share per epoch


def plan_quotas(samples: Sequence[Sample], concepts: Sequence[Concept], balance: Balance) -> list[Quota]:
    """Split the epoch into groups with fixed exposure counts (see the module docstring)."""
    fixed: list[Quota] = []
    groups: dict[Any, list[int]] = {}
    members: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        members.setdefault(sample.concept, []).append(i)
    for c, indices in members.items():
        concept = concepts[c]
        if concept.repeats is not None:
            fixed.append((np.asarray(indices), concept.repeats * len(indices)))
            continue
        for i in indices:
            groups.setdefault(_group_key(concept, balance, i), []).append(i)
    target = max((len(g) for g in groups.values()), default=0)
    return fixed + [(np.asarray(g), target) for g in groups.values()]


def _group_key(concept: Concept, balance: Balance, index: int) -> Any:
    if balance == "none":
        return index
    if balance == "category":
        return concept.category
    if balance == "class":
        return concept.category, concept.class_name
    return concept.key


def expected_exposures(quotas: Sequence[Quota], samples: Sequence[Sample], n_concepts: int) -> np.ndarray:
    """Mean exposures per concept per epoch (exact for leaf balancing and explicit repeats)."""
    out = np.zeros(n_concepts)
    for indices, exposures in quotas:
        for i in indices:
            out[samples[i].concept] += exposures / len(indices)
    return out


class BalancedSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, sample seed)``; the epoch's content depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` before every epoch (also through its ``DistributedSamplerWrapper``,
    which then gives rank r the positions r, r+W, ... of this same list: disjoint shards).
    """

    def __init__(self, quotas: Sequence[Quota], seed: int = 0, strata: Sequence[int] | None = None) -> None:
        """``strata`` (one integer per sample, e.g. its bucket) fixes how many exposures each stratum of a group
        gets, the same every epoch (see :func:`_spread`); None draws the extra exposures from the whole group."""
        self.quotas = [(np.asarray(indices, dtype=np.int64), int(exposures)) for indices, exposures in quotas]
        self.seed = seed
        self.epoch = 0
        self.strata = None if strata is None else np.asarray(strata, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(exposures for _, exposures in self.quotas)

    def epoch_plan(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.concatenate([_spread(indices, exposures, rng, self.strata) for indices, exposures in self.quotas])
        order = order[rng.permutation(len(order))]
        seeds = rng.integers(0, 2**63 - 1, size=len(order), dtype=np.int64)
        return list(zip(order.tolist(), seeds.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_plan())


def _spread(indices: np.ndarray, exposures: int, rng: np.random.Generator,
            strata: np.ndarray | None = None) -> np.ndarray:
    """Each index ⌊E/n⌋ times, plus once more for E mod n of them picked at random.

    With ``strata`` the E mod n extras are first shared among the strata in proportion to their sizes (largest
    remainders, fixed across epochs) and then drawn within each stratum, so that every stratum's exposures, and
    hence the number of bucket batches, are the same in every epoch.
    """
    base, extra = divmod(exposures, len(indices))
    counts = np.full(len(indices), base)
    if strata is None:
        counts[rng.choice(len(indices), extra, replace=False)] += 1
    else:
        for members, share in _stratum_extras(strata[indices], extra):
            counts[members[rng.choice(len(members), share, replace=False)]] += 1
    return np.repeat(indices, counts)


def _stratum_extras(labels: np.ndarray, extra: int) -> list[tuple[np.ndarray, int]]:
    """(positions of each stratum, its share of ``extra``): proportional, largest remainders, ties by label."""
    strata = np.unique(labels)
    members = [np.flatnonzero(labels == s) for s in strata]
    # Integer arithmetic: share = extra·m // n, and the leftover extras go to the largest remainders.
    shares = [extra * len(m) // len(labels) for m in members]
    remainders = [extra * len(m) % len(labels) for m in members]
    for j in sorted(range(len(members)), key=lambda j: -remainders[j])[: extra - sum(shares)]:
        shares[j] += 1
    return list(zip(members, shares))


def _stratum_counts(quotas: Sequence[Quota], strata: np.ndarray) -> dict[int, int]:
    """Exposures per stratum per epoch under :func:`_spread` with ``strata`` (the same every epoch)."""
    counts: dict[int, int] = {}
    for indices, exposures in quotas:
        indices = np.asarray(indices, dtype=np.int64)
        base, extra = divmod(int(exposures), len(indices))
        for members, share in _stratum_extras(strata[indices], extra):
            label = int(strata[indices[members[0]]])
            counts[label] = counts.get(label, 0) + base * len(members) + share
    return counts


# ---------------------------------------------------------------- aspect-ratio buckets


def bucket_sizes(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[Bucket]:
    """kohya's buckets: for each width w (a multiple of ``step`` in [min, max]) the tallest h ≤ max with
    w·h ≤ resolution², both orientations, plus the largest square; sorted."""
    area = resolution * resolution
    sizes = set()
    square = resolution // step * step
    if min_side <= square <= max_side:
        sizes.add((square, square))
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def assign_bucket(size: tuple[int, int], buckets: Sequence[Bucket], resolution: int, step: int,
                  max_side: int, no_upscale: bool = False) -> Bucket:
    """The bucket of an image of ``size`` (w, h): the one nearest its aspect ratio (in log ratio); with
    ``no_upscale``, an image under resolution² in area keeps its own size rounded down to the step."""
    w, h = size
    if no_upscale and w * h < resolution * resolution:
        return min(max_side, w // step * step), min(max_side, h // step * step)
    log_ratio = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(sample index, sample seed)`` from one bucket each; the epoch depends only on (seed, epoch).

    Takes the :class:`BalancedSampler`'s epoch plan (built with the buckets as strata, so that each bucket gets
    the same number of exposures every epoch and ``len`` is exact), cuts each bucket's share, in plan order,
    into batches of ``batch_size`` (a bucket's last batch may be smaller), then shuffles the batch order.
    Used as the loader's *sampler* (``batch_size=None``), so Lightning's ``DistributedSamplerWrapper`` shards
    whole batches across ranks and forwards :meth:`set_epoch` here.
    """

    def __init__(self, sampler: BalancedSampler, buckets: Sequence[Bucket], batch_size: int) -> None:
        self.sampler = sampler
        self.buckets = list(buckets)  # one per sample index
        self.batch_size = batch_size
        strata = np.asarray(bucket_strata(self.buckets), dtype=np.int64)
        if sampler.strata is None or not np.array_equal(sampler.strata, strata):
            raise ValueError("the BalancedSampler must be built with strata=bucket_strata(buckets)")
        self.counts = _stratum_counts(sampler.quotas, strata)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.counts.values())

    def epoch_batches(self) -> list[list[tuple[int, int]]]:
        by_bucket: dict[Bucket, list[tuple[int, int]]] = {}
        for item in self.sampler.epoch_plan():
            by_bucket.setdefault(self.buckets[item[0]], []).append(item)
        batches = [items[i:i + self.batch_size] for _, items in sorted(by_bucket.items())
                   for i in range(0, len(items), self.batch_size)]
        # A stream of its own (the trailing 1), so the batch order does not disturb the plan's draws.
        rng = np.random.default_rng([self.sampler.seed, self.sampler.epoch, 1])
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.epoch_batches())


def bucket_strata(buckets: Sequence[Bucket]) -> list[int]:
    """One integer per sample: its bucket's rank among the distinct buckets (the sampler's strata)."""
    labels = {b: i for i, b in enumerate(sorted(set(buckets)))}
    return [labels[b] for b in buckets]


# ---------------------------------------------------------------- images and the dataset


def load_rgb(path: Path) -> Image.Image:
    """The upright RGB image: EXIF orientation applied, transparency composited on white."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")


def square_crop(img: Image.Image, size: int, offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize the shorter side to ``size`` and crop a square; offset (0..1, 0..1) places it (0.5 = centre)."""
    return cover_crop(img, (size, size), offset)


def cover_crop(img: Image.Image, size: Bucket, offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize to cover ``size`` (w, h) and crop it out; offset (0..1, 0..1) places the crop (0.5 = centre)."""
    w, h = img.size
    if size[0] * h >= size[1] * w:  # the target is relatively wider: keep the full width
        box_w, box_h = float(w), w * size[1] / size[0]
    else:
        box_w, box_h = h * size[0] / size[1], float(h)
    left, top = (w - box_w) * offset[0], (h - box_h) * offset[1]
    # Cropping in source coordinates inside resize avoids resampling pixels that are then thrown away.
    return img.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h), reducing_gap=3.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB → float32 CHW in [-1, 1]."""
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class HierarchicalDataset(Dataset):
    """Items by ``index`` (deterministic: centre crop, full caption) or ``(index, seed)`` (augmented); a list of
    keys gives the collated batch (what :class:`BucketBatchSampler` asks for).

    ``buckets`` (one (w, h) per sample) replaces the square ``resolution`` crop. An item holds ``pixel_values``
    or, with the latent cache, ``latent_parameters``; with the text cache also ``encoder_hidden_states``.
    """

    def __init__(self, samples: Sequence[Sample], concepts: Sequence[Concept], resolution: int,
                 center_crop: bool = True, flip: bool = False, shuffle_tags: bool = False, keep_tokens: int = 1,
                 tag_dropout: float = 0.0, caption_dropout: float = 0.0,
                 buckets: Sequence[Bucket] | None = None) -> None:
        self.buckets = None if buckets is None else list(buckets)
        self.samples = list(samples)
        self.concepts = list(concepts)
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip = flip
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.caption_dropout = caption_dropout
        # Set by HierarchicalDataModule.cache_encodings: per sample the (unflipped, flipped) latent entry, and per
        # caption its text entry; items then carry those tensors instead of pixels / instead of nothing.
        self.cache: EncodingCache | None = None
        self.latent_keys: list[tuple[str, str | None]] | None = None
        self.text_keys: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int] | list[tuple[int, int]]) -> dict[str, Any]:
        if isinstance(key, list):
            return default_collate([self[k] for k in key])
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        concept = self.concepts[sample.concept]
        rng = None if seed is None else np.random.default_rng(seed)
        # Always draw the same four numbers first, so switching one option does not reshuffle the others.
        u_drop, u_flip, u_x, u_y = rng.random(4) if rng is not None else (1.0, 1.0, 0.5, 0.5)
        flip = bool(self.flip and u_flip < 0.5)
        item: dict[str, Any] = {}
        if self.latent_keys is not None:
            item["latent_parameters"] = self._cache().read("latent_parameters", self.latent_keys[index][flip])
        else:
            item["pixel_values"] = self.pixels(index, (0.5, 0.5) if self.center_crop else (u_x, u_y), flip)
        caption = "" if u_drop < self.caption_dropout else build_caption(
            concept.descriptor, sample.tags, self.keep_tokens, self.shuffle_tags, self.tag_dropout, rng)
        if self.text_keys is not None:
            item["encoder_hidden_states"] = self._cache().read("encoder_hidden_states", self.text_keys[caption])
        return {**item, "caption": caption, "category": concept.category, "class": concept.class_name,
                "subclass": concept.subclass, "path": str(sample.path)}

    def size(self, index: int) -> Bucket:
        """The (w, h) sample ``index`` is trained at."""
        return (self.resolution, self.resolution) if self.buckets is None else self.buckets[index]

    def pixels(self, index: int, offset: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> torch.Tensor:
        """The image cropped to its training size (``offset`` places the crop), mirrored if ``flip``."""
        path = self.samples[index].path
        try:
            img = cover_crop(load_rgb(path), self.size(index), offset)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{path}: unreadable image ({err}); it was readable at setup") from err
        return to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)

    def full_caption(self, index: int) -> str:
        """The caption without shuffle or dropout (what validation uses)."""
        sample = self.samples[index]
        return build_caption(self.concepts[sample.concept].descriptor, sample.tags, self.keep_tokens)

    def _cache(self) -> EncodingCache:
        assert self.cache is not None, "cache keys are set together with the cache"
        return self.cache


class _LatentInputs(Dataset):
    """The cropped, maybe flipped images of the latent entries to encode: ``(key, pixels, metadata)``."""

    def __init__(self, dataset: HierarchicalDataset, jobs: Sequence[tuple[str, int, bool]]) -> None:
        self.dataset, self.jobs = dataset, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> tuple[str, torch.Tensor, dict[str, str]]:
        key, index, flip = self.jobs[j]
        (w, h), path = self.dataset.size(index), self.dataset.samples[index].path
        return key, self.dataset.pixels(index, flip=flip), {"image": str(path), "size": f"{w}x{h}", "flip": str(flip)}


def _collate_latent_inputs(rows: list[tuple[str, torch.Tensor, dict[str, str]]]) -> tuple[list, torch.Tensor, list]:
    return [r[0] for r in rows], torch.stack([r[1] for r in rows]), [r[2] for r in rows]


# ---------------------------------------------------------------- the data module


class HierarchicalDataModule(L.LightningDataModule):
    """Class-balanced captioned images from a ``category/class[/subclass]`` folder tree (DESIGN §5)."""

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 1,
        caption_dropout: float = 0.0,
        balance: Balance = "subclass",
        repeats: dict[str, int] | None = None,
        center_crop: bool = True,
        flip: bool = False,
        shuffle_tags: bool = False,
        keep_tokens: int = 1,
        tag_dropout: float = 0.0,
        caption_extension: str = ".txt",
        num_workers: int = 0,
        seed: int = 0,
        on_bad_file: OnBadFile = "error",
        bucketing: bool = False,
        min_bucket_resolution: int = 256,
        max_bucket_resolution: int = 1024,
        bucket_step: int = 64,
        bucket_no_upscale: bool = False,
        cache_latents: bool = False,
        cache_text_encoder_outputs: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            root: dataset folder: ``category/class[/subclass]/`` images, caption files beside them, optional
                ``dataset.yaml`` manifest (triggers, class words, tags to drop, evaluation text, prompts).
            resolution: side of the square training images (shorter side resized, then cropped).
            batch_size: images per batch.
            caption_dropout: probability that a training caption is replaced by "" (paper: 0.05).
            balance: which groups get equal exposure per epoch: every leaf ``subclass`` (the paper), every
                ``class``, every ``category``, or ``none`` (each image once).
            repeats: fixed repeats per epoch by folder key (``category/class[/subclass]``), overriding the
                balance, the manifest and kohya ``N_`` prefixes for that folder.
            center_crop: crop the centre; otherwise a random crop per sample.
            flip: mirror half the training images horizontally.
            shuffle_tags: shuffle the caption's tags after the first ``keep_tokens``.
            keep_tokens: leading comma-separated tokens kept in place and never dropped (the
                ``trigger class_word`` head is one).
            tag_dropout: probability of dropping each tag after the first ``keep_tokens``.
            caption_extension: extension of the caption file beside each image.
            num_workers: data loader worker processes (0: load in the main process).
            seed: seed of the epoch order, repeats, crops, flips and dropouts (non-negative).
            on_bad_file: ``error`` stops at an unreadable image, caption, empty class folder or (with
                ``bucketing``) an image with a side under ``min_bucket_resolution``; ``skip`` leaves it out and
                lists it at setup.
            bucketing: aspect-ratio buckets instead of square crops: each image is resized to cover the bucket
                nearest its aspect ratio and cropped (centre or random per ``center_crop``); every batch holds
                one bucket. Buckets (kohya's): (w, h), multiples of ``bucket_step`` within
                [``min_bucket_resolution``, ``max_bucket_resolution``], w·h ≤ ``resolution``². Under DDP each
                rank takes whole batches (disjoint; up to world size − 1 batches repeated to even out the ranks).
            min_bucket_resolution: smallest bucket side (a multiple of ``bucket_step``).
            max_bucket_resolution: largest bucket side (a multiple of ``bucket_step``).
            bucket_step: bucket sides are multiples of this (64 for SD: 8 latent pixels).
            bucket_no_upscale: an image smaller than ``resolution``² in area gets a bucket of its own size
                rounded down to ``bucket_step`` (never upscaled), instead of a predefined bucket.
            cache_latents: encode every training image with the VAE once, before the first batch (progress bar),
                and read the latents from disk afterwards. Entries are keyed by image content, VAE, size and flip
                (with ``flip`` both orientations are encoded); needs ``center_crop``.
            cache_text_encoder_outputs: likewise for the text encoder's outputs, one entry per caption; needs a
                frozen text encoder (``model.train_text_encoder: false``) and fixed captions (no ``shuffle_tags``
                or ``tag_dropout``; ``caption_dropout`` is fine).
            cache_dir: where the caches live (default ``<lycoflow cache>/encodings``); entries are content-keyed,
                so runs share them, and the folder can be deleted at any time.
        """
        super().__init__()
        _check_options(resolution, batch_size, caption_dropout, tag_dropout, keep_tokens, num_workers, seed,
                       caption_extension)
        if bucketing:
            _check_buckets(resolution, min_bucket_resolution, max_bucket_resolution, bucket_step)
        if cache_latents and not center_crop:
            raise ValueError("cache_latents needs center_crop: true (a random crop differs every epoch, so its "
                             "latents could not be reused); set center_crop: true or cache_latents: false")
        if cache_text_encoder_outputs and (shuffle_tags or tag_dropout):
            raise ValueError("cache_text_encoder_outputs needs fixed captions: set shuffle_tags: false and "
                             "tag_dropout: 0, or cache_text_encoder_outputs: false")
        self.save_hyperparameters()
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.balance = balance
        self.repeats = dict(repeats or {})
        self.center_crop = center_crop
        self.flip = flip
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.caption_extension = caption_extension
        self.num_workers = num_workers
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.bucketing = bucketing
        self.min_bucket_resolution = min_bucket_resolution
        self.max_bucket_resolution = max_bucket_resolution
        self.bucket_step = bucket_step
        self.bucket_no_upscale = bucket_no_upscale
        self.cache_latents = cache_latents
        self.cache_text_encoder_outputs = cache_text_encoder_outputs
        self.cache_dir = cache_dir
        self.buckets: list[Bucket] = []  # with bucketing: the (w, h) of each sample
        self.concepts: list[Concept] = []  # read by the evaluation callbacks: triggers, eval texts, prompts
        self.samples: list[Sample] = []
        self.skipped: list[tuple[Path, str]] = []
        self.exposures = np.zeros(0)  # mean exposures per concept per epoch
        self.dataset: HierarchicalDataset | None = None
        self.sampler: BalancedSampler | None = None
        self.bucket_sampler: BucketBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        root = Path(self.root).expanduser()
        min_side = self.min_bucket_resolution if self.bucketing else 0
        concepts, samples, skipped = scan(root, self.caption_extension, self.on_bad_file, min_side)
        if self.repeats:
            concepts = apply_repeats(concepts, self.repeats)
        quotas = plan_quotas(samples, concepts, self.balance)
        self.concepts, self.samples, self.skipped = concepts, samples, skipped
        self.exposures = expected_exposures(quotas, samples, len(concepts))
        if self.bucketing:
            sizes = bucket_sizes(self.resolution, self.min_bucket_resolution, self.max_bucket_resolution,
                                 self.bucket_step)
            self.buckets = [assign_bucket(s.size, sizes, self.resolution, self.bucket_step,
                                          self.max_bucket_resolution, self.bucket_no_upscale) for s in samples]
            self.sampler = BalancedSampler(quotas, self.seed, strata=bucket_strata(self.buckets))
            self.bucket_sampler = BucketBatchSampler(self.sampler, self.buckets, self.batch_size)
        else:
            self.sampler = BalancedSampler(quotas, self.seed)
        self.dataset = HierarchicalDataset(samples, concepts, self.resolution, self.center_crop, self.flip,
                                           self.shuffle_tags, self.keep_tokens, self.tag_dropout,
                                           self.caption_dropout, self.buckets or None)
        print_summary(self.concepts, self.exposures, self.skipped)
        if self.bucketing:
            print_buckets(self.buckets)

    def train_dataloader(self) -> DataLoader:
        self._fill_caches()
        if self._ready().bucket_sampler is not None:
            # Whole batches come from the sampler, so Lightning's DDP wrapper shards batches, not images.
            return self._loader(sampler=self.bucket_sampler, batch_size=None)
        return self._loader(sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        """Every image once, in scan order, centre-cropped, unflipped, with its full caption (with bucketing:
        batches of one bucket each, in bucket order)."""
        self._fill_caches()
        if self._ready().buckets:
            by_bucket: dict[Bucket, list[int]] = {}
            for i, bucket in enumerate(self.buckets):
                by_bucket.setdefault(bucket, []).append(i)
            batches = [group[i:i + self.batch_size] for _, group in sorted(by_bucket.items())
                       for i in range(0, len(group), self.batch_size)]
            # Whole batches as the sampler's items, as for training: under DDP each rank takes whole batches.
            return self._loader(sampler=batches, batch_size=None)
        return self._loader(shuffle=False)

    def cache_encodings(self, encoders: Encoders, rank: int = 0, world_size: int = 1,
                        barrier: Callable[[], None] | None = None) -> None:
        """Encode what the caches lack and make the loaders read from them.

        Inside a Trainer the loaders call this with the LightningModule (on its device, after it was moved);
        elsewhere call it yourself. Under DDP each rank encodes a share of the missing entries, waits at
        ``barrier``, then encodes whatever it still cannot see (a disk other ranks do not share).
        """
        dataset = self._ready().dataset
        assert dataset is not None
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "encodings"
        cache = EncodingCache(root)
        latent_keys, latent_jobs = self._latent_jobs(encoders, dataset) if self.cache_latents else (None, {})
        text_keys, text_jobs = self._text_jobs(encoders, dataset) if self.cache_text_encoder_outputs else (None, {})

        def encode_missing(share: slice) -> None:
            latents = cache.missing("latent_parameters", latent_jobs)[share]
            texts = cache.missing("encoder_hidden_states", text_jobs)[share]
            show = rank == 0
            if latents:
                self._encode_latents(cache, encoders, dataset, [(k, *latent_jobs[k]) for k in latents], show)
            if texts:
                chunks = [texts[i:i + TEXT_BATCH] for i in range(0, len(texts), TEXT_BATCH)]
                batches = ((keys, [text_jobs[k] for k in keys], [{"caption": text_jobs[k]} for k in keys])
                           for keys in chunks)
                fill(cache, "encoder_hidden_states", batches, encoders.encode_text, len(texts),
                     "caching text-encoder outputs", show)

        report_cache(cache.root, {"latents": (len(latent_jobs), len(cache.missing("latent_parameters", latent_jobs))),
                                  "text-encoder outputs": (len(text_jobs),
                                                           len(cache.missing("encoder_hidden_states", text_jobs)))})
        encode_missing(slice(rank, None, world_size))
        if world_size > 1 and barrier is not None:
            barrier()
            encode_missing(slice(None))
        dataset.cache, dataset.latent_keys, dataset.text_keys = cache, latent_keys, text_keys

    def _latent_jobs(self, encoders: Encoders, dataset: HierarchicalDataset
                     ) -> tuple[list[tuple[str, str | None]], dict[str, tuple[int, bool]]]:
        """Per sample its (unflipped, flipped) entry keys, and per key what to encode: (sample, flip)."""
        vae = encoders.latent_identity()
        digests = file_digests([sample.path for sample in self.samples])
        keys = [(latent_key(d, vae, dataset.size(i), False), latent_key(d, vae, dataset.size(i), True)
                 if self.flip else None) for i, d in enumerate(digests)]
        return keys, {key: (i, bool(flip)) for i, pair in enumerate(keys) for flip, key in enumerate(pair)
                      if key is not None}

    def _text_jobs(self, encoders: Encoders, dataset: HierarchicalDataset) -> tuple[dict[str, str], dict[str, str]]:
        """Per caption its entry key, and per key the caption: every full caption, and "" with caption dropout."""
        identity = encoders.text_identity()
        if identity is None:
            raise ValueError("cache_text_encoder_outputs needs a frozen text encoder, but the model trains it: set "
                             "model.train_text_encoder: false, or data.init_args.cache_text_encoder_outputs: false")
        captions = [dataset.full_caption(i) for i in range(len(dataset))] + [""] * (self.caption_dropout > 0)
        keys = {caption: text_key(caption, identity) for caption in captions}
        return keys, {key: caption for caption, key in keys.items()}

    def _encode_latents(self, cache: EncodingCache, encoders: Encoders, dataset: HierarchicalDataset,
                        jobs: list[tuple[str, int, bool]], show: bool) -> None:
        # One size per VAE call: batches are cut within each training size.
        by_size: dict[Bucket, list[int]] = {}
        for j, (_, index, _) in enumerate(jobs):
            by_size.setdefault(dataset.size(index), []).append(j)
        batches = [group[i:i + self.batch_size] for _, group in sorted(by_size.items())
                   for i in range(0, len(group), self.batch_size)]
        loader = DataLoader(_LatentInputs(dataset, jobs), batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_collate_latent_inputs)
        fill(cache, "latent_parameters", loader, encoders.latent_parameters, len(jobs), "caching latents", show)

    def _fill_caches(self) -> None:
        """Inside a Trainer: fill the caches with the LightningModule's encoders the first time a loader is asked."""
        wanted = self.cache_latents or self.cache_text_encoder_outputs
        if not wanted or self._ready().dataset.cache is not None:
            return
        if self.trainer is None:
            raise RuntimeError("cache_latents / cache_text_encoder_outputs need encoders: call "
                               "dm.cache_encodings(model) before asking for a loader outside a Trainer")
        model = self.trainer.lightning_module
        if not isinstance(model, Encoders):
            raise TypeError(f"cache_latents / cache_text_encoder_outputs need a model that encodes "
                            f"(latent_identity, latent_parameters, text_identity, encode_text); "
                            f"{type(model).__name__} does not")
        self.cache_encodings(model, self.trainer.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)

    def _ready(self) -> HierarchicalDataModule:
        if self.dataset is None:
            raise RuntimeError("call setup() before asking HierarchicalDataModule for a data loader")
        return self

    def _loader(self, **kwargs: Any) -> DataLoader:
        kwargs.setdefault("batch_size", self.batch_size)
        return DataLoader(
            self._ready().dataset, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
            # The loader draws its worker base seed from this generator instead of the global RNG.
            generator=torch.Generator().manual_seed(self.seed), **kwargs)


def _check_options(resolution: int, batch_size: int, caption_dropout: float, tag_dropout: float, keep_tokens: int,
                   num_workers: int, seed: int, caption_extension: str) -> None:
    for name, value, low in (("resolution", resolution, 1), ("batch_size", batch_size, 1),
                             ("keep_tokens", keep_tokens, 0), ("num_workers", num_workers, 0), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("caption_dropout", caption_dropout), ("tag_dropout", tag_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {value}")
    if not caption_extension.startswith("."):
        raise ValueError(f"caption_extension must start with a dot, e.g. '.txt', got {caption_extension!r}")


def _check_buckets(resolution: int, min_side: int, max_side: int, step: int) -> None:
    if step < 1 or min_side < step or min_side % step or max_side % step or max_side < min_side:
        raise ValueError(f"bucket sides: need 1 <= bucket_step <= min_bucket_resolution <= max_bucket_resolution, "
                         f"both multiples of bucket_step; got step {step}, min {min_side}, max {max_side}")
    if min_side * min_side > resolution * resolution:
        raise ValueError(f"min_bucket_resolution {min_side} leaves no bucket with w·h <= resolution² "
                         f"(resolution {resolution}); lower it to at most {resolution}")


@rank_zero_only
def report_cache(root: Path, counts: dict[str, tuple[int, int]]) -> None:
    """One line per cache in use: entries wanted, how many to encode, and where they live."""
    for name, (total, missing) in counts.items():
        if total:
            Console().print(f"{name} cache: {total} entries, {total - missing} found, {missing} to encode ({root})",
                            soft_wrap=True, markup=False, highlight=False)


@rank_zero_only
def print_buckets(buckets: Sequence[Bucket]) -> None:
    """One line: each bucket used (w×h) and how many images it holds."""
    counts: dict[Bucket, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    listing = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
    Console().print(f"buckets (w x h: images): {listing}", soft_wrap=True, markup=False, highlight=False)


@rank_zero_only
def print_summary(concepts: Sequence[Concept], exposures: np.ndarray, skipped: Sequence[tuple[Path, str]]) -> None:
    """The setup table: what each concept contributes to an epoch, and what was left out."""
    total = float(exposures.sum())
    table = Table(title=f"training data: {sum(len(c.images) for c in concepts)} images, "
                        f"{total:.0f} samples per epoch")
    for column in ("category", "class", "subclass", "images", "repeats", "share"):
        table.add_column(column, justify="right" if column in ("images", "repeats", "share") else "left")
    for concept, exposure in zip(concepts, exposures):
        repeats = f"{exposure / len(concept.images):.3g}" + (" (fixed)" if concept.repeats is not None else "")
        table.add_row(concept.category, concept.class_name, concept.subclass, str(len(concept.images)), repeats,
                      f"{exposure / total:.1%}")
    console = Console()
    console.print(table)
    if skipped:
        # Plain lines, not a table: a table would shorten long paths, and the path is what the user needs.
        console.print(f"[bold yellow]skipped {len(skipped)} files (on_bad_file: skip):[/]")
        for path, reason in skipped:
            console.print(f"  {path}: {reason}", soft_wrap=True, markup=False, highlight=False)
