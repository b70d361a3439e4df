"""Shared maths of the adapter algorithms: factorisations, layer ops, Tucker/Kronecker/Hadamard rebuilds.

Everything here is a pure function of tensors (or of a base layer's geometry), so each algorithm file only
states its own formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How many multiply-adds one tensor entry written costs as much time as, in the factored paths' cost models
#: (LoKr's reshapes, OFT/BOFT's rotated outputs). Elementwise passes, permutes and GEMMs with an 8-wide side are
#: memory-bound; 20 reproduces which LoKr path wins in per-layer timings (forward and backward, 2 CPU cores) of
#: the attn-mlp layer shapes of SD 1.5's UNet at 32×32 and 64×64 latents, but for a few within 20% of each other
#: (320-channel MLP layers at 64×64).
ENTRY_COST = 20

#: Layer types an adapter can wrap. Grouped convolutions are excluded: no LyCORIS format describes them.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_supported(layer: nn.Module) -> bool:
    return isinstance(layer, SUPPORTED_LAYERS) and getattr(layer, "groups", 1) == 1


#: Normalisation layers whose affine weight and bias a `lycoris.NormAdapter` trains (the LyCORIS library's NormModule).
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


def is_norm(layer: nn.Module) -> bool:
    """A GroupNorm/LayerNorm with an affine weight: one built without one has nothing to adapt."""
    return isinstance(layer, NORM_LAYERS) and layer.weight is not None


def kernel_size(layer: nn.Module) -> tuple[int, ...]:
    """The spatial kernel of a layer; () for Linear."""
    return tuple(layer.kernel_size) if isinstance(layer, nn.Conv1d | nn.Conv2d) else ()


def in_out(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return w.shape[1], w.shape[0]


def layer_op(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``layer``'s operation (stride, padding, dilation, padding mode; groups and eps of a norm) with another
    weight."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    return layer._conv_forward(x, weight, bias)


def conv_like(layer: nn.Module, in_ch: int, out_ch: int, *, spatial: bool) -> nn.Module:
    """A bias-free layer of the same kind as ``layer``: its full geometry when ``spatial``, else 1x1.

    Used for factored (bypass) paths, so that ``up(down(x))`` has exactly the shape of ``layer(x)``.
    """
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_ch, out_ch, bias=False)
    cls = nn.Conv1d if layer.weight.dim() == 3 else nn.Conv2d
    if not spatial:
        return cls(in_ch, out_ch, 1, bias=False)
    return cls(
        in_ch, out_ch, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        bias=False, padding_mode=layer.padding_mode,
    )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m*n = dimension, with the LyCORIS LoKr rule.

    ``factor > 0`` dividing ``dimension`` gives (min(f, d/f), max(f, d/f)); otherwise (``-1`` means no
    bound) the divisors m of d are walked upward while m <= factor and m < d/m, and the last is kept.
    """
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = next(c for c in range(m + 1, dimension + 1) if dimension % c == 0)
        if new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def butterfly_factor(dimension: int, factor: int) -> tuple[int, int]:
    """(block size b, block count) for BOFT: b even and <= factor, block count a power of two.

    The largest such block size wins, as in LyCORIS (each block as close to ``dim`` as allowed).
    """
    best = 0
    for b in range(2, min(factor, dimension) + 1, 2):
        if dimension % b == 0 and (dimension // b).bit_count() == 1:
            best = dimension // b
    if best == 0:
        valid = [b for b in range(2, dimension + 1, 2) if dimension % b == 0 and (dimension // b).bit_count() == 1]
        raise ValueError(
            f"BOFT cannot factor dimension {dimension} with dim={factor}: it needs an even block size "
            f"<= dim that divides {dimension} into a power-of-two number of blocks. "
            f"Block sizes that work for {dimension}: {valid or 'none'}; set dim to one of them "
            f"(or exclude this layer)."
        )
    return dimension // best, best


def rebuild_tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """W[o,i,...] = sum_ab wa[a,o] core[a,b,...] wb[b,i] — the LyCORIS Tucker layout (rank first)."""
    return torch.einsum("ab...,ao,bi->oi...", core, wa, wb)


def rebuild_lowrank(up: Tensor, down: Tensor, shape: torch.Size) -> Tensor:
    """up (out, r, ...) @ down (r, in*k*k ...) reshaped to ``shape``."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


class HadamardProduct(torch.autograd.Function):
    """(w1a w1b) ⊙ (w2a w2b) · scale, keeping only the four factors for backward.

    Autograd would keep both full-size products; recomputing them in backward costs two small matmuls
    and saves two weight-sized buffers per layer.
    """

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def row_norm(w: Tensor) -> Tensor:
    """L2 norm of each output row of a weight, shaped to broadcast against it: (out, 1, ...)."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def column_norm(w: Tensor) -> Tensor:
    """L2 norm of each input column of a weight, shaped to broadcast against it: (1, in, 1, ...)."""
    return row_norm(w.transpose(0, 1)).transpose(0, 1)


def per_row(magnitude: Tensor, weight: Tensor) -> bool:
    """Whether DoRA magnitudes are per output row, shape (out, 1, ...); else per input column, (1, in, ...).

    Decided by the whole shape, not its first size: a one-row layer's column magnitudes also start with 1.
    """
    return tuple(magnitude.shape) == (weight.shape[0], *[1] * (weight.dim() - 1))


def weight_decompose(w0: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA: the adapted weight m·(W0+ΔW)/‖W0+ΔW‖, the norm per output row or per input column as
    ``magnitude`` is shaped (`per_row`)."""
    w = w0 + delta
    norm = row_norm(w) if per_row(magnitude, w) else column_norm(w)
    return w * (magnitude / (norm + torch.finfo(w.dtype).eps))


def capped(blocks: Tensor, constraint: float) -> Tensor:
    """The blocks B scaled so that Q = B − Bᵀ (all blocks together) has norm at most ``constraint`` (0: no cap)."""
    if constraint <= 0:
        return blocks
    norm = (blocks - blocks.transpose(-1, -2)).norm() + 1e-8
    return torch.where(norm > constraint, blocks * (constraint / norm), blocks)


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """Orthogonal R = (I+Q)(I−Q)⁻¹ for Q = B − Bᵀ per block (last two dims), Q's norm capped at constraint."""
    blocks = capped(blocks, constraint)
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    # (I+Q) and (I−Q)⁻¹ commute, so R = (I−Q)⁻¹(I+Q): one batched solve instead of an inverse.
    return torch.linalg.solve(eye - q, eye + q)


def rank_mask(rank: int, p: float, like: Tensor) -> Tensor:
    """Keep-mask over ``rank`` channels with inverted-dropout scaling."""
    return F.dropout(torch.ones(rank, device=like.device, dtype=like.dtype), p, training=True)


def along(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """The vector ``v`` shaped to broadcast along ``channel_dim`` of ``like`` (1: conv maps, -1: tokens)."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.view(shape)


def channel_scale(h: Tensor, v: Tensor, channel_dim: int) -> Tensor:
    return h * along(v, h, channel_dim)


def kaiming_(t: Tensor) -> Tensor:
    """nn.Linear's default initialisation (what LyCORIS uses for its non-zero factors)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
