"""LoKr: low-rank Kronecker product (Yeh et al., LyCORIS paper §3.2; after KronA, Edalati et al. 2022).

ΔW = w1 ⊗ w2 · α/r. Each dimension d splits as (m, d/m) by `factorization(d, factor)`; w1 is the small
(out_l × in_m) block, w2 the large (out_k × in_n [× k×k]) one. w2 is low-rank (w2_a·w2_b, or a Tucker
product on k×k convs) only when dim < max(out_k, in_n)/2, otherwise full — the paper's LoKr uses
dim=10000, so both blocks are full and the scale is 1 (what UIs compute when no factor is decomposed).
With ``decompose_both`` w1 is low-rank too when dim < max(out_l, in_m)/2.

Where it is cheaper (see `_cheaper_by_reshape`), (w1 ⊗ w2)·x runs through reshapes — w2 applied as the
layer's op to each input group and w1 mixing the groups, in the cheaper order — never building the Kronecker
product; otherwise the weight is rebuilt once per call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Adapter, Decomposable
from .functional import ENTRY_COST, factorization, in_out, kaiming_, kernel_size, layer_op, rebuild_tucker


class LoKrAdapter(Adapter):
    signature = ("lokr_w1", "lokr_w1_a")

    def __init__(
        self,
        base: nn.Module,
        dim: int,
        alpha: float,
        factor: int = -1,
        decompose_both: bool = False,
        use_tucker: bool = False,
        full_w1: bool | None = None,
        full_w2: bool | None = None,
        w1_shape: tuple[int, int] | None = None,
        **common,
    ):
        super().__init__(base, **common)
        in_dim, out_dim = in_out(base)
        ksize = kernel_size(base)
        # full_w1/full_w2/w1_shape are only given when rebuilding from a file, whose shapes decide.
        out_l, in_m = w1_shape or (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0])
        out_k, in_n = out_dim // out_l, in_dim // in_m
        self.blocks = (out_l, out_k, in_m, in_n)
        self.full_w1 = full_w1 if full_w1 is not None else not (decompose_both and dim < max(out_l, in_m) / 2)
        self.full_w2 = full_w2 if full_w2 is not None else dim >= max(out_k, in_n) / 2
        self.tucker = use_tucker and any(k > 1 for k in ksize) and not self.full_w2
        self.dim = dim

        if self.full_w1:
            self.lokr_w1 = nn.Parameter(kaiming_(torch.empty(out_l, in_m)))
        else:
            self.lokr_w1_a = nn.Parameter(kaiming_(torch.empty(out_l, dim)))
            self.lokr_w1_b = nn.Parameter(kaiming_(torch.empty(dim, in_m)))
        # The w2 side starts at zero, so ΔW = 0.
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *ksize))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(kaiming_(torch.empty(dim, dim, *ksize)))
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(dim, out_k)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(out_k, dim)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, in_n * math.prod(ksize)))
        # Both blocks full: no rank anywhere, so the scale is 1 (alpha stored as dim, as LyCORIS does).
        self.register_constant("alpha", float(dim if self.full_w1 and self.full_w2 else alpha))

    @property
    def scale(self) -> float:
        # No factor is low-rank, so there is no rank to scale by; UIs ignore alpha here too.
        return 1.0 if self.full_w1 and self.full_w2 else self.constant("alpha") / self.dim

    def _w1(self) -> Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> Tensor:
        out_l, out_k, in_m, in_n = self.blocks
        if self.full_w2:
            return self.lokr_w2
        if self.tucker:
            return rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(out_k, in_n, *self.base.weight.shape[2:])

    def _delta(self) -> Tensor:
        w1, w2 = self._w1(), self._w2()
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale

    def _reshape_costs(self, x: Tensor) -> tuple[int, int]:
        """Forward cost of (w1 ⊗ w2)·x through reshapes, w1 applied first and w2 applied first.

        Multiply-adds plus ENTRY_COST per activation entry written (the einsum's permuted copies and the final
        scale and add included). w1 first mixes the input, w2 first the output: the first is cheaper where the
        layer widens (GEGLU's 320 → 2560), the second where it narrows.
        """
        out_l, out_k, in_m, in_n = self.blocks
        out, inp, kk = out_l * out_k, in_m * in_n, math.prod(self.base.weight.shape[2:])
        pos_in, pos_out = self.positions(x)
        w1_first = (pos_in * (out_l * inp + ENTRY_COST * (inp + 2 * out_l * in_n))
                    + pos_out * (out * in_n * kk + ENTRY_COST * 3 * out))
        w2_first = pos_out * (inp * out_k * kk + out * in_m + ENTRY_COST * (2 * in_m * out_k + 4 * out))
        return w1_first, w2_first

    def _cheaper_by_reshape(self, x: Tensor) -> bool:
        """Whether (w1 ⊗ w2)·x through reshapes costs less than one op with the rebuilt weight.

        Both counted as extra work over the base op, in multiply-adds plus ENTRY_COST per entry written (what
        the small GEMMs, einsums and elementwise passes are bound by, and what autograd keeps for backward).
        The weight path writes W0 + ΔW in four passes over out·in·k² entries (Kronecker product, scale,
        multiplier, sum) and keeps it for backward; with gradients it adds dL/dW (positions·out·in·k²) and five
        more passes back to w1 and w2. The reshape path costs `_reshape_costs` in its cheaper order, about three
        times that with gradients. It is linear in the positions, so it wins by far over the few tokens of deep
        blocks (SD 1.5's 1280-channel layers over 4×4 and 8×8 maps: 3-5× less time, and a 10240×1280 weight
        kept for backward is 50 MB) and loses over many positions on small blocks (320 channels, 64×64 map).
        """
        out_l, out_k, in_m, in_n = self.blocks
        grad = torch.is_grad_enabled()
        dense = out_l * out_k * in_m * in_n * math.prod(self.base.weight.shape[2:])
        weight_path = dense * (ENTRY_COST * (4 + 5 * grad) + grad * self.positions(x)[1])
        return (1 + 2 * grad) * min(self._reshape_costs(x)) < weight_path

    def _kron_forward(self, x: Tensor) -> Tensor:
        """(w1 ⊗ w2) applied to x without building it: w2 as the layer's op on each input group of in_n
        channels, w1 mixing the groups, in the cheaper order (`_reshape_costs`)."""
        out_l, out_k, in_m, in_n = self.blocks
        w1, w2 = self._w1(), self._w2()
        h = x.to(w2.dtype)
        w1_first, w2_first = self._reshape_costs(h)
        if isinstance(self.base, nn.Linear):
            h = h.unflatten(-1, (in_m, in_n))  # (..., in_m, in_n)
            if w1_first < w2_first:
                h = torch.einsum("lm,...mn->...ln", w1, h)  # (..., out_l, in_n)
                return layer_op(self.base, h, w2, None).flatten(-2)  # (..., out_l, out_k) → (..., out)
            h = layer_op(self.base, h, w2, None)  # (..., in_m, out_k)
            return torch.einsum("lm,...mk->...lk", w1, h).flatten(-2)
        batch = h.shape[0]
        if w1_first < w2_first:
            # Mixing channel groups commutes with a convolution applied to each group (padding included).
            h = torch.einsum("lm,bm...->bl...", w1, h.unflatten(1, (in_m, in_n)))  # (B, out_l, in_n, *spatial)
            h = layer_op(self.base, h.flatten(0, 1), w2, None)  # (B·out_l, out_k, *spatial')
            return h.unflatten(0, (batch, out_l)).flatten(1, 2)
        h = layer_op(self.base, h.reshape(batch * in_m, in_n, *h.shape[2:]), w2, None)
        h = h.unflatten(0, (batch, in_m))  # (B, in_m, out_k, *spatial')
        return torch.einsum("lm,bm...->bl...", w1, h).flatten(1, 2)

    def _forward(self, x: Tensor) -> Tensor:
        needs_weight = self.weight_decompose or (self.training and (self.dropout or self.rank_dropout))
        if needs_weight or not self._cheaper_by_reshape(x):
            return super()._forward(x)
        out = self.base_forward(x)
        return out + (self.multiplier * self.scale * self._kron_forward(x)).to(out.dtype)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> LoKrAdapter:
        full_w1, full_w2 = "lokr_w1" in tensors, "lokr_w2" in tensors
        w1_shape = (
            tuple(tensors["lokr_w1"].shape) if full_w1
            else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
        )
        if full_w2:
            dim = tensors["lokr_w1_b"].shape[0] if not full_w1 else 1
        else:
            dim = tensors["lokr_w2_b"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else dim
        return cls(
            base, dim, alpha, use_tucker="lokr_t2" in tensors, full_w1=full_w1, full_w2=full_w2,
            w1_shape=w1_shape, **cls.dora_args(base, tensors),
        )


class LoKr(Decomposable):
    """LoKr: Kronecker product of a small and a large block (paper default factor 8, dim 10000, alpha 1).

    Args:
        factor: the size of the small block (-1: split each dimension as evenly as possible).
        decompose_both: make the small block low-rank too when dim is small enough.
        use_tucker: Tucker-decompose a low-rank w2 of k×k convolutions.
        **kwargs: DoRA and shared hyperparameters, see `lycoris.Decomposable` and `lycoris.Strategy`.
    """

    algo = "lokr"
    adapter_class = LoKrAdapter

    def __init__(
        self,
        factor: int = -1,
        decompose_both: bool = False,
        use_tucker: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if factor == 0 or factor < -1:
            raise ValueError(f"LoKr: factor={factor} must be -1 or a positive integer")
        self.factor = factor
        self.decompose_both = decompose_both
        self.use_tucker = use_tucker

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> LoKrAdapter:
        return LoKrAdapter(
            layer, dim, alpha, factor=self.factor, decompose_both=self.decompose_both,
            use_tucker=self.use_tucker, **self.common(),
        )
