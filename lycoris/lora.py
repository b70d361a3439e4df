"""LoRA / LoCon (Hu et al. 2021; LoCon extends it to convolutions), optionally with DoRA (Liu et al. 2024).

ΔW = up · down · α/r. On a k×k convolution ``down`` carries the layer's full geometry (LoCon); with
``use_tucker`` it is split into 1×1 down, k×k ``mid`` (r×r) and 1×1 up. Training and unmerged inference
run the bypass ``base(x) + m·α/r·up(mid(down(x)))`` and never build ΔW (except under DoRA, whose
row norm needs the full weight).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Decomposable
from .functional import (
    channel_scale,
    conv_like,
    in_out,
    kaiming_,
    kernel_size,
    layer_op,
    rank_mask,
    rebuild_lowrank,
    rebuild_tucker,
)


class LoRAAdapter(Adapter):
    signature = ("lora_down.weight",)

    def __init__(self, base: nn.Module, dim: int, alpha: float, use_tucker: bool = False, **common):
        super().__init__(base, **common)
        in_dim, out_dim = in_out(base)
        self.tucker = use_tucker and any(k > 1 for k in kernel_size(base))
        self.lora_down = conv_like(base, in_dim, dim, spatial=not self.tucker)
        if self.tucker:
            self.lora_mid = conv_like(base, dim, dim, spatial=True)
        self.lora_up = conv_like(base, dim, out_dim, spatial=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dim = dim
        kaiming_(self.lora_down.weight)
        if self.tucker:
            kaiming_(self.lora_mid.weight)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.dim

    def _delta(self) -> Tensor:
        shape = self.base.weight.shape
        up, down = self.lora_up.weight, self.lora_down.weight
        if self.tucker:
            core = self.lora_mid.weight
            return rebuild_tucker(core, up.flatten(1).T, down.flatten(1)) * self.scale
        return rebuild_lowrank(up, down, shape) * self.scale

    def _add_bypass(self, x: Tensor, down_weight: Tensor, up_weight: Tensor, scale: float) -> Tensor:
        """base(x) + m·scale·up(mid(down(x))) for a (possibly truncated) rank, through the layer's ops.

        The scale goes on the rank-r activation and the sum is taken in place, so no output-sized
        temporaries are made beyond the adapter's own output.
        """
        out = self.base_forward(x)
        h = x.to(down_weight.dtype)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout)
        h = layer_op(self.lora_down, h, down_weight, None)
        if self.tucker:
            h = self.lora_mid(h)
        if self.rank_dropout and self.training:
            h = channel_scale(h, rank_mask(h.shape[self.channel_dim], self.rank_dropout, h), self.channel_dim)
        h = h * (self.multiplier * scale)
        return out.add_(layer_op(self.lora_up, h, up_weight, None).to(out.dtype))

    def _forward(self, x: Tensor) -> Tensor:
        if self.weight_decompose:
            return super()._forward(x)
        return self._add_bypass(x, self.lora_down.weight, self.lora_up.weight, self.scale)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> LoRAAdapter:
        down = tensors["lora_down.weight"]
        dim = down.shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else dim
        return cls(base, dim, alpha, use_tucker="lora_mid.weight" in tensors,
                   **cls.dora_args(base, tensors))


class LoRA(Decomposable):
    """LoRA on linear layers and LoCon on convolutions.

    Args:
        use_tucker: factor k×k convolutions as 1×1 down, k×k r×r core, 1×1 up (fewer parameters).
        **kwargs: DoRA and shared hyperparameters, see `lycoris.Decomposable` and `lycoris.Strategy`.
    """

    algo = "lora"
    adapter_class = LoRAAdapter

    def __init__(self, use_tucker: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.use_tucker = use_tucker

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> LoRAAdapter:
        return LoRAAdapter(layer, dim, alpha, use_tucker=self.use_tucker, **self.common())
