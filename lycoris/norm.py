"""Norm-layer training: learned differences on the affine weight and bias of GroupNorm/LayerNorm layers (the
LyCORIS library's ``train_norm``, its NormModule).

γ' = γ + m·w_norm, β' = β + m·b_norm, both differences zero at start. The library computes exactly this: its
forward adds ``norm(x; m·w_norm, m·b_norm)`` to ``norm(x; γ, β)``, which the norm's linearity in (γ, β) makes
``norm(x; γ', β')``, and its merge adds m·w_norm and m·b_norm (lycoris/modules/norms.py). So do ComfyUI (comfy/lora.py
load_lora: ``w_norm``, ``b_norm`` become "diff" patches of weight and bias) and A1111 (extensions-builtin/Lora/
network_norm.py: ΔW = w_norm, Δb = b_norm, times the strength). The differences are not an algorithm of their own:
every strategy builds them on the norm layers it targets when it trains norms (`lycoris.Strategy`, ``train_norm``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import Adapter
from .functional import NORM_LAYERS


class NormAdapter(Adapter):
    """γ + m·w_norm and β + m·b_norm on one GroupNorm or LayerNorm layer (``b_norm`` only where it has a bias).

    Args:
        base: the norm layer, with its affine weight.
        dropout: elementwise dropout on w_norm while training.
        rank_dropout: dropout over the channels of w_norm while training.
        module_dropout: probability of skipping the whole adapter for a training step.
    """

    signature = ("w_norm",)  # what the library's NormModule.weight_list_det detects
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = NORM_LAYERS

    def __init__(self, base: nn.Module, *, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0):
        super().__init__(base, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        if base.weight is None:
            raise ValueError(f"{type(base).__name__} without affine parameters has nothing to adapt")
        # Shaped as the weight (the library's (channels,) for every norm it supports): the UIs add it as it lies.
        self.w_norm = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))
        if base.bias is not None:
            self.b_norm = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))

    def _delta(self) -> Tensor:
        return self.w_norm

    def delta_bias(self) -> Tensor | None:
        return getattr(self, "b_norm", None)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> NormAdapter:
        return cls(base)
