"""Native fine-tuning of the targeted layers, trained and saved as a difference (LyCORIS "full").

The trained parameters are ``diff`` (W − W0) and ``diff_b`` (b − b0), both zero at start, so the file
is the exact weight difference the UIs add back, and weight decay pulls towards the base model rather
than towards zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Strategy


class FullAdapter(Adapter):
    signature = ("diff",)

    def __init__(self, base: nn.Module, **common):
        super().__init__(base, **common)
        self.diff = nn.Parameter(torch.zeros(base.weight.shape, device=base.weight.device))
        if base.bias is not None:
            self.diff_b = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))

    def _delta(self) -> Tensor:
        return self.diff

    def delta_bias(self) -> Tensor | None:
        return getattr(self, "diff_b", None)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> FullAdapter:
        return cls(base)


class Full(Strategy):
    """Native fine-tuning of the targeted layers (paper: lr 1e-6); ``dim``/``alpha`` are unused.

    Args:
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "full"
    adapter_class = FullAdapter

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> FullAdapter:
        return FullAdapter(layer, **self.common())
