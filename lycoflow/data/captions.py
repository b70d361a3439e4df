"""Captions: the tags of a caption file, cleaned of what the concept implies, and the caption built from them.

A caption file sits beside its image (``x.png`` + ``x.txt``) and holds comma-separated tags. A training caption
is ``"trigger class_word, tag1, ..., tagk"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .manifest import Concept


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
