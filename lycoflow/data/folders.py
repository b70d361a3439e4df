"""Reading a data set folder: its concept folders, their images and tags, and the files that cannot be used.

A data set is a folder tree ``category/class[/subclass]/`` of images, each with an optional caption file beside
it. Every folder that holds images is one leaf concept; its depth says what it is (1: class, 2: category/class,
3: category/class/subclass). kohya's ``N_name`` image folders mean "repeat each image N times" and name the
concept ``name``. The folder is only ever read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .captions import clean_tags, read_tags
from .images import probe_image
from .manifest import MANIFEST, Concept, load_manifest

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_KOHYA = re.compile(r"^([1-9][0-9]*)_(.+)$")
_LAYOUT = "category/class[/subclass]"

OnBadFile = Literal["error", "skip"]


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


def scan(root: Path, caption_extension: str = ".txt", on_bad_file: OnBadFile = "error", min_side: int = 0,
         min_side_rule: str = "", ) -> tuple[list[Concept], list[Sample], list[tuple[Path, str]]]:
    """Read a dataset folder: (concepts, usable samples, skipped (path, reason)). The folder is never modified.

    Images with a side under ``min_side`` are bad files too; ``min_side_rule`` says why (and how to change it).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; set data.root to a folder "
                                f"laid out as {_LAYOUT}/images")
    if any(_is_image(p.name) for p in root.iterdir() if p.is_file()):
        raise ValueError(f"{root} holds images directly; move them into class folders ({_LAYOUT}/images)")
    folders, broken = _walk(root)
    manifest = _read_manifest(root, folders)
    skipped: list[tuple[Path, str]] = []
    for path, reason in broken:
        _bad(path, reason, on_bad_file, skipped)
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
        checks = dict(zip(paths, pool.map(lambda p: _check_file(p, caption_extension, min_side, min_side_rule), paths)))
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


def _read_manifest(root: Path, folders: Sequence[_Folder]) -> dict[str, dict[str, Any]]:
    """The root's manifest entries (none without one); each must name a folder that exists."""
    manifest_path = root / MANIFEST
    manifest = load_manifest(manifest_path) if manifest_path.is_file() else {}
    known = _folder_keys(folders)
    for key in manifest:
        if key not in known:
            raise FileNotFoundError(f"{manifest_path}: classes.{key} names folder {root / key}, which does not exist; "
                                    f"fix the key or create the folder (folders: {', '.join(sorted(known)) or 'none'})")
    return manifest


def _walk(root: Path) -> tuple[list[_Folder], list[tuple[Path, str]]]:
    """Every non-hidden folder under root (root excluded), depth first in name order; and the links that lead
    nowhere (a broken symlink, a folder linking back to one above it), which are bad files, not silence or a
    crash."""
    folders: list[_Folder] = []
    broken: list[tuple[Path, str]] = []

    def visit(path: Path, raw: tuple[str, ...], parts: tuple[str, ...], repeats: int | None,
              above: frozenset[str]) -> None:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        for e in entries:
            if e.is_symlink() and not os.path.exists(e.path) and not e.name.startswith("."):
                broken.append((Path(e.path), f"broken symlink: its target {os.readlink(e.path)} does not exist"))
        subdirs = []
        for e in entries:
            if e.is_dir() and not e.name.startswith("."):
                if os.path.realpath(e.path) in above:
                    broken.append((Path(e.path), f"symlink loop: links back to {os.path.realpath(e.path)}, a folder "
                                                 "above it"))
                else:
                    subdirs.append(e)
        images = tuple(Path(e.path) for e in entries if e.is_file() and _is_image(e.name))
        if raw:
            folders.append(_Folder(path, raw, parts, images, repeats, is_leaf=not subdirs))
        for sub in subdirs:
            # kohya's convention applies to image folders only, so "2023_trip/" above them keeps its name.
            holds_images = any(_is_image(name) for name in os.listdir(sub.path))
            match = _KOHYA.match(sub.name) if holds_images else None
            name, count = (match.group(2), int(match.group(1))) if match else (sub.name, None)
            visit(Path(sub.path), raw + (sub.name,), parts + (name,), count, above | {os.path.realpath(sub.path)})

    visit(root, (), (), None, frozenset({os.path.realpath(root)}))
    return folders, broken


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
        # Tag and prompt lists accumulate down the tree; the other fields (``alter_prompts`` too) override.
        drop_tags += entry.get("drop_tags", ())
        prompts += entry.get("prompts", ())
        values.update({k: v for k, v in entry.items() if k not in ("drop_tags", "prompts")})
    values.setdefault("eval_text", values["trigger"])
    return Concept(category, class_name, subclass, folder.path, drop_tags=drop_tags, prompts=prompts,
                   images=folder.images, **values)


def _folder_keys(folders: Sequence[_Folder]) -> set[str]:
    return {"/".join(f.parts) for f in folders} | {"/".join(f.raw) for f in folders}


def _check_file(path: Path, caption_extension: str, min_side: int = 0, min_side_rule: str = "",
                ) -> tuple[tuple[int, int], list[str]] | str:
    """(size, raw tags) of a usable image, or why it is not usable."""
    try:
        size = probe_image(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image: {err}"
    if min(size) < min_side:
        return f"image {size[0]}x{size[1]} has a side under {min_side} px ({min_side_rule})"
    caption = path.with_suffix(caption_extension)
    try:
        tags = read_tags(caption) if caption.is_file() else []
    except UnicodeDecodeError:
        return f"caption {caption.name} is not UTF-8 text"
    return size, tags


def _bad(path: Path, reason: str, on_bad_file: OnBadFile, skipped: list[tuple[Path, str]]) -> None:
    if on_bad_file == "error":
        raise ValueError(f"{path}: {reason}; fix or remove it, or set on_bad_file: skip to leave it out")
    skipped.append((path, reason))
