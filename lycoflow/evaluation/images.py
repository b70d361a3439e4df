"""The suite's images on disk: 8-bit PNG files, where each one goes, and how they are read back.

Images are measured as saved (8-bit), so re-measuring the files gives the same values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..cache import atomic_path
from ..models import Components
from .prompts import EvalPrompt
from .sampling import Sampler


def quantize(images: Tensor) -> Tensor:
    """[0, 1] floats → what an 8-bit PNG holds, back as floats."""
    return (images * 255).round() / 255


def to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def load_png(path: Path) -> Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_png(image: Tensor, path: Path) -> None:
    """Atomically: a crash never leaves a truncated image that a later run would take for a finished one."""
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def image_path(folder: Path, prompt: EvalPrompt) -> Path:
    """``folder/<prompt type>/<category>/<class>[/<subclass>]/<index>.png``."""
    return folder / prompt.prompt_type / prompt.key / f"{prompt.index:04d}.png"


def base_image_path(folder: Path, prompt: EvalPrompt) -> Path:
    """The base model's image, named by its prompt and seed too: a changed suite never reuses a stale file."""
    tag = hashlib.sha256(f"{prompt.prompt}\n{prompt.seed}".encode()).hexdigest()[:12]
    return folder / prompt.prompt_type / prompt.key / f"{prompt.index:04d}-{tag}.png"


def sampler_folder(sampler: Sampler, base_model: str, parts: Components) -> str:
    """Base images depend on the base model (``base_model``: a digest of the weights of ``parts``) and the
    sampler's settings: one folder per pair, so a reused run folder never takes another model's images for this
    one's."""
    settings = sampler.describe(parts)
    return hashlib.sha256(json.dumps([base_model, settings], sort_keys=True).encode()).hexdigest()[:12]
