"""On-disk caches of VAE latents and frozen-text-encoder outputs: a speed-up that leaves training unchanged.

Training SD spends much of a step in the frozen VAE encoder (and, when it is not trained, the text encoder)
recomputing the same outputs every epoch. With ``cache_latents`` / ``cache_text_encoder_outputs`` the data
module has them encoded once, before the first batch, and its loaders then read tensors from disk.

Each entry is one safetensors file named by a content key, so a cache is shared by every run and data set
that asks for the same thing, and any change to a key part misses just the entries it touches:

- latents: SHA-256 of the image file's bytes, the VAE's identity (config + weights), the training size
  (w, h), the crop (centre) and the flip. The file holds the VAE's posterior parameters (mean and log-variance,
  float32), not a sample: the step draws the sample with its own generator, exactly as without the cache.
- text: the caption and the text encoder's identity (weights, dtype, tokenizer, and how many caption tokens it
  reads: ``max_token_length``, which also sets the entry's length). The file holds the hidden states, and for
  SDXL also the pooled text (``text_embeds``), both encoders' identities in its key.

Files live in ``<lycoflow cache>/encodings`` unless ``cache_dir`` says otherwise; nothing is ever written
beside the data set. Deleting the folder is always safe. Old entries (of a changed image, another VAE) stay
until then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..cache import atomic_path

# Part of every key: bump it when what an entry holds, or how its input is prepared, changes.
FORMAT = "lycoflow-encodings-1"
# Captions encoded per text-encoder call while caching (CLIP on 77 tokens: small even for SD's encoder).
TEXT_BATCH = 64


@runtime_checkable
class EncodingModel(Protocol):
    """The model that fills the caches: what the data module needs from it (``DiffusionFinetune`` provides it)."""

    def latent_identity(self) -> str:
        """A digest of everything that decides the VAE's output: its config and weights."""
        ...

    def latent_parameters(self, pixels: Tensor) -> Tensor:
        """The VAE posterior's parameters ``[b, 2·c, h/8, w/8]`` (mean, log-variance) of pixels in [-1, 1]."""
        ...

    def text_identity(self) -> str | None:
        """A digest of everything that decides the text encoder's output: its weights, dtype and tokenizer, and
        how captions are cut into its context (``max_token_length``); None while the text encoder trains (its
        outputs change every step and cannot be cached)."""
        ...

    def text_conditioning(self, captions: list[str]) -> dict[str, Tensor]:
        """The UNet's text conditioning of the captions: ``encoder_hidden_states`` ``[b, tokens, d]`` (tokens: 77
        for SD's CLIP, ``max_token_length + 2`` with longer captions), and for SDXL ``text_embeds`` ``[b, p]``."""
        ...


def module_digest(module: nn.Module, *extra: object) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes) and of ``extra`` (e.g. its config)."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        if type(tensor) is not torch.Tensor:  # an 8-bit frozen weight (lycoris.quantize_frozen): what the layer uses
            tensor = tensor.dequantize()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Bytes through a uint8 view: numpy has no bfloat16.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_digests(paths: Sequence[Path], workers: int = 8) -> list[str]:
    """SHA-256 of each file's bytes (threads: hashlib releases the GIL)."""
    def one(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths))


def latent_key(image_digest: str, vae: str, size: tuple[int, int], flip: bool) -> str:
    return _key(image_digest, vae, list(size), "center", flip)


def text_key(caption: str, text_encoder: str) -> str:
    return _key(caption, text_encoder)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts]).encode()).hexdigest()


class EncodingCache:
    """Content-addressed safetensors entries under ``root/<kind>/<key[:2]>/<key>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def missing(self, kind: str, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if not self.path(kind, k).is_file()]

    def write(self, kind: str, key: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        """Atomically (temporary file + rename): a crash never leaves a truncated entry under a valid key."""
        with atomic_path(self.path(kind, key)) as tmp:
            save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, str(tmp),
                      metadata=metadata)

    def read(self, kind: str, key: str) -> dict[str, Tensor]:
        """The entry's tensors by name (the kind's own name, and any it was written with beside it)."""
        path = self.path(kind, key)
        try:
            tensors = load_file(str(path))
            if kind not in tensors:
                raise KeyError(f"no {kind!r} tensor")
            return tensors
        except Exception as err:  # a damaged entry: say which file, and that deleting it is the fix
            raise ValueError(f"{path}: unreadable cache entry ({err}); delete it and it is encoded again") from err


def fill(cache: EncodingCache, kind: str, batches: Iterable[tuple[list[str], Any, list[dict[str, str]]]],
         encode: Callable[[Any], Tensor | dict[str, Tensor]], total: int, description: str, show: bool = True) -> None:
    """Encode each batch (keys, encoder input, per-entry metadata) and write one entry per output row (of each
    tensor, when ``encode`` gives several by name; a lone tensor is named ``kind``)."""
    with tqdm(total=total, desc=description, unit="item", disable=not show, dynamic_ncols=True) as bar:
        for keys, inputs, metadata in batches:
            with torch.no_grad():
                outputs = encode(inputs)
            named = {kind: outputs} if isinstance(outputs, Tensor) else outputs
            for i, (key, meta) in enumerate(zip(keys, metadata)):
                cache.write(kind, key, {name: t[i] for name, t in named.items()}, meta)
            bar.update(len(keys))
