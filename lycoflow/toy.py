"""The toy base model: `lycoflow.tiny`'s SD-1.x architecture trained on the toy world (`lycoflow.data.world`) by
``lycoflow pretrain``, shipped inside the package with the toy evaluation encoders (`lycoflow.metrics.toy`) as one
safetensors file whose SHA-256 is checked before anything is read from it.

`ToySD` is a base-model source like `lycoflow.tiny.TinySD`: on first use it writes the trained weights out as a
real diffusers folder in the cache and loads it with the code that loads SD 1.5.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from .cache import cache_dir
from .models import BaseModel, BaseModelError, Components, Pretrained
from .tiny import tiny_components, write_diffusers_folder

#: The weights that ship with lycoflow, and their SHA-256 (`lycoflow pretrain` prints a new file's).
WEIGHTS = Path(__file__).resolve().parent / "weights" / "toy-world.safetensors"
WEIGHTS_SHA256 = "b67fa7870f80788aeb6d7ff2d9e9386adef5323fb1789e847beafae761a419d5"
#: The toy base's VAE and UNet: `lycoflow.tiny`'s constructors at 4× spatial reduction (16×16 latents of 64² images),
#: not SD's (and TinySD's) 8×. A VAE this small with 8×8 latents did not keep what the world lacks: held-out stars
#: came back orange, blurred and without their outline, their reconstructions as far from the real stars for the
#: image encoder (-0.085) as the base's samples (-0.096), so no adapter could raise fidelity. The UNet's first level
#: (16×16, 16 channels) has no attention, so a step costs about 1.2× TinySD's (measured: 45 vs 37 ms, batch 8, forward
#: and backward, 2 cores). The VAE normalises in 2 groups (`lycoflow.tiny.tiny_vae` says why not 8).
VAE = {"block_out_channels": (16, 32, 64), "norm_num_groups": 2}
UNET = {"block_out_channels": (16, 32, 64), "attention": (False, True, False), "sample_size": 16}
#: The parts of the base model in the file, by key prefix.
BASE_PARTS = ("unet", "vae", "text_encoder")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve(weights: str | os.PathLike | None) -> Path:
    path = Path(weights).expanduser() if weights else WEIGHTS
    if not path.is_file():
        raise BaseModelError(
            f"toy-world weights not found: {path}" + (
                " (they ship with lycoflow: reinstall it, or write them with `lycoflow pretrain --out DIR` and pass "
                "weights=DIR/toy-world.safetensors)" if not weights else ""))
    return path


def check_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file, after checking it: the shipped one against `WEIGHTS_SHA256`; any file for the toy world
    version its metadata names. Raises `BaseModelError` saying what is wrong and how to fix it."""
    path = _resolve(weights)
    if not weights and sha256(path) != WEIGHTS_SHA256:
        raise BaseModelError(
            f"{path} has SHA-256 {sha256(path)}, not the {WEIGHTS_SHA256} lycoflow shipped: the file is damaged or was "
            "replaced. Reinstall lycoflow, or pass your own file as weights=PATH")
    from .data.world import WORLD_VERSION

    meta = metadata(path)
    if meta.get("world_version") != str(WORLD_VERSION):
        raise BaseModelError(f"{path} was trained on toy world version {meta.get('world_version')}, not "
                             f"{WORLD_VERSION} (lycoflow.data.world): rerun `lycoflow pretrain`")
    return path


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@lru_cache(maxsize=4)
def _read(path: str, stamp: tuple[int, int]) -> dict[str, Tensor]:
    return load_file(path)


def read_weights(weights: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Every tensor of a checked weights file (read once per process while the file is unchanged)."""
    path = check_weights(weights)
    stat = path.stat()
    return _read(str(path), (stat.st_mtime_ns, stat.st_size))


def toy_architecture(seed: int = 0) -> Components:
    """The toy base's parts, built from config under ``seed`` with random weights (what `lycoflow pretrain` trains)."""
    return tiny_components(seed, UNET, VAE)


def toy_components(weights: str | os.PathLike | None = None) -> Components:
    """The toy base's parts with the trained weights."""
    tensors, meta = read_weights(weights), metadata(check_weights(weights))
    parts = toy_architecture()
    for name in BASE_PARTS:
        state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        getattr(parts, name).load_state_dict(state)
    parts.vae.register_to_config(scaling_factor=float(meta["vae_scaling_factor"]))
    return parts


def save_toy_sd(folder: Path, weights: str | os.PathLike | None = None) -> Path:
    """Write the toy base as a diffusers folder, atomically (as `lycoflow.tiny.save_tiny_sd`)."""
    return write_diffusers_folder(folder, toy_components(weights))


class ToySD(BaseModel):
    """SD 1.x's architecture at toy scale (its VAE reducing 4×, not 8×: `VAE`), trained on the toy world: it draws
    what captions in the world's words ask for (see the README for what it can and cannot draw). For the quickstart,
    the toy sweep and tests of learning; `lycoflow.tiny.TinySD` has the same blocks with random weights.

    Args:
        weights: a file written by ``lycoflow pretrain``; None: the one shipped with lycoflow (checksum-verified).
        folder: where the diffusers folder is written and read; default ``<cache>/models/toy-world-<digest>``.
    """

    def __init__(self, weights: str | None = None, folder: str | None = None):
        self.weights, self.folder = weights, folder

    def load(self) -> Components:
        path = check_weights(self.weights)
        digest = WEIGHTS_SHA256 if not self.weights else sha256(path)
        folder = Path(self.folder) if self.folder else cache_dir() / "models" / f"toy-world-{digest[:12]}"
        if not (folder / "model_index.json").is_file():
            save_toy_sd(folder, self.weights)
        return Pretrained(str(folder)).load()

    def __repr__(self) -> str:
        return f"ToySD(weights={self.weights!r})"


def bundle_metadata(extra: dict[str, object]) -> dict[str, str]:
    """The file's metadata: the world version and the pretraining settings (strings, as safetensors wants)."""
    from .data.world import WORLD_VERSION

    return {"world_version": str(WORLD_VERSION), **{k: v if isinstance(v, str) else json.dumps(v)
                                                    for k, v in extra.items()}}
