"""GLoRA: generalised LoRA (Chavan et al. 2023, "One-for-All"), as implemented in LyCORIS.

ΔW = (b1·b2 + W0·a1·a2) · α/r: a low-rank additive term plus a low-rank re-mixing of W0's inputs.
``a2`` (in→r) and ``b2`` (in→r, the layer's geometry) start at zero. The forward never builds ΔW:
``base(x + m·s·a1(a2(x))) + m·s·b1(b2(x))``, since W0·(A·x) = (W0·A)·x for a 1×1 channel map A.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Strategy
from .functional import conv_like, in_out, kaiming_, rebuild_lowrank


class GLoRAAdapter(Adapter):
    signature = ("a1.weight",)

    def __init__(self, base: nn.Module, dim: int, alpha: float, **common):
        super().__init__(base, **common)
        in_dim, out_dim = in_out(base)
        self.a2 = conv_like(base, in_dim, dim, spatial=False)
        self.a1 = conv_like(base, dim, in_dim, spatial=False)
        self.b2 = conv_like(base, in_dim, dim, spatial=True)
        self.b1 = conv_like(base, dim, out_dim, spatial=False)
        kaiming_(self.a1.weight)
        nn.init.zeros_(self.a2.weight)
        kaiming_(self.b1.weight)
        nn.init.zeros_(self.b2.weight)
        self.register_constant("alpha", float(alpha))
        self.dim = dim

    @property
    def scale(self) -> float:
        return self.constant("alpha") / self.dim

    def _delta(self) -> Tensor:
        w0 = self.w0.to(self.a1.weight.dtype)
        a = self.a1.weight.flatten(1) @ self.a2.weight.flatten(1)  # (in, in)
        w0_a = torch.einsum("oi...,ij->oj...", w0, a)
        return (rebuild_lowrank(self.b1.weight, self.b2.weight, w0.shape) + w0_a) * self.scale

    def _forward(self, x: Tensor) -> Tensor:
        if self.training and (self.dropout or self.rank_dropout):
            return super()._forward(x)
        s = self.multiplier * self.scale
        h = x.to(self.a2.weight.dtype)
        mixed = x + (s * self.a1(self.a2(h))).to(x.dtype)
        out = self.base_forward(mixed)
        return out + (s * self.b1(self.b2(h))).to(out.dtype)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> GLoRAAdapter:
        dim = tensors["a2.weight"].shape[0]
        return cls(base, dim, float(tensors["alpha"]) if "alpha" in tensors else dim)


class GLoRA(Strategy):
    """GLoRA: a low-rank additive term plus a low-rank transform of the frozen weight.

    Args:
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "glora"
    adapter_class = GLoRAAdapter

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> GLoRAAdapter:
        return GLoRAAdapter(layer, dim, alpha, **self.common())
