"""Low-rank extraction: the LoRA/LoCon adapters nearest to the difference between a fine-tuned model and its base.

Each layer's ΔW = W_tuned − W_base, the kernel flattened for convolutions, is factored by its truncated SVD as
ΔW ≈ up·down with up = U√Σ and down = √ΣVᵀ, and held by a `LoRAAdapter` with alpha = rank (scale 1): on a k×k
convolution ``down`` keeps the kernel (LoCon: down [r, in, k, k], up [out, r, 1, 1]). The rank is fixed, or per
layer the smallest whose σ² hold a share (``energy``) of Σσ²; either is capped by the layer's own bound
min(out, in·k·k). Models in, adapters out: loading models and writing the file (`lycoris.save_file`) are the
caller's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .functional import kernel_size
from .lora import LoRAAdapter
from .targeting import matches, supported_layers


def lowrank_factors(matrix: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """(up [out, r], down [r, in]) = (U√Σ, √Σ Vᵀ) of ``matrix``'s truncated SVD: at ``rank``, or (``rank`` None)
    at the smallest rank whose leading σ² hold ``energy`` of Σσ²; never above the matrix's own rank bound."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        power = s.square()
        kept = power.cumsum(0) / power.sum()
        rank = int((kept < energy).sum()) + 1
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class LayerPair(NamedTuple):
    """A layer of the base model and the same layer of the fine-tuned one."""

    raw: str  # its path in the model (its state-dict keys start with it)
    path: str  # its canonical path: the file names it by `lycoris.targeting.file_namer`
    base: nn.Module
    tuned: nn.Module
    spatial: bool  # a convolution with a kernel larger than 1


def mismatched_tensors(base: nn.Module, tuned: nn.Module) -> list[str]:
    """The state-dict keys that only one model has or whose shapes differ: empty for one architecture."""
    ours, theirs = base.state_dict(), tuned.state_dict()
    return sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k].shape != theirs[k].shape]


def layer_pairs(base: nn.Module, tuned: nn.Module, patterns: Iterable[str], convolutions: bool = True) \
        -> list[LayerPair]:
    """Every layer of ``base`` an adapter can wrap whose canonical path ``patterns`` match, with its counterpart in
    ``tuned`` (of the same architecture: see `mismatched_tensors`); ``convolutions=False`` leaves k×k ones out."""
    patterns = tuple(patterns)
    counterparts = dict(tuned.named_modules())
    pairs = []
    for raw, path, layer in supported_layers(base):
        spatial = any(k > 1 for k in kernel_size(layer))
        if matches(path, patterns) and (convolutions or not spatial):
            pairs.append(LayerPair(raw, path, layer, counterparts[raw], spatial))
    return pairs


def changed_tensors(base: nn.Module, tuned: nn.Module, min_diff: float, exclude: Iterable[str] = ()) -> list[str]:
    """The state-dict keys, but ``exclude``, whose tensors differ between the models by more than ``min_diff``
    somewhere (the models of one architecture)."""
    ours, theirs, skipped = base.state_dict(), tuned.state_dict(), set(exclude)
    return [key for key, value in ours.items()
            if key not in skipped and (theirs[key].float() - value.float()).abs().max() > min_diff]


@dataclass
class LayerExtraction:
    """One layer's extracted adapter and how much of ΔW it misses.

    Attributes:
        adapter: the LoRA/LoCon adapter on the base layer, not attached; None when the layer did not change
            (largest |ΔW| at most ``min_diff``).
        residual: ‖ΔW − up·down‖²_F with the factors as stored (``dtype``); ‖ΔW‖²_F when skipped.
        total: ‖ΔW‖²_F.
    """

    adapter: LoRAAdapter | None
    residual: float
    total: float


@torch.no_grad()
def extract_layer(
    pair: LayerPair,
    rank: int | None = None,
    energy: float | None = None,
    conv_rank: int | None = None,
    min_diff: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LayerExtraction:
    """The LoRA/LoCon adapter of one layer's ΔW, at ``rank`` or (``rank`` None) the rank keeping ``energy``.

    Args:
        pair: the layer in both models.
        rank: fixed rank (capped by the layer's bound).
        energy: with no fixed rank: the share of Σσ² to keep, in (0, 1].
        conv_rank: fixed rank of a k×k convolution; None: as the other layers.
        min_diff: a layer whose largest |ΔW| is at most this gets no adapter.
        dtype: the factors are rounded to it, as the file will hold them, so that ``residual`` is the file's.
        device: where the SVD runs; None: the base layer's.
    """
    delta = pair.tuned.weight.to(device, torch.float32) - pair.base.weight.to(device, torch.float32)
    matrix = delta.flatten(1)
    total = float(matrix.square().sum())
    if float(matrix.abs().max()) <= min_diff:
        return LayerExtraction(None, total, total)
    up, down = lowrank_factors(matrix, conv_rank if pair.spatial and conv_rank is not None else rank, energy)
    up, down = up.to(dtype).float(), down.to(dtype).float()
    adapter = LoRAAdapter(pair.base, dim=up.shape[1], alpha=up.shape[1])
    adapter.lora_up.weight.copy_(up.reshape(adapter.lora_up.weight.shape))
    adapter.lora_down.weight.copy_(down.reshape(adapter.lora_down.weight.shape))
    return LayerExtraction(adapter, float((matrix - up @ down).square().sum()), total)
