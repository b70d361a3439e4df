"""LoRA / LoCon (Hu et al. 2021; LoCon extends it to convolutions), optionally with DoRA (Liu et al. 2024).

ΔW = up · down · α/r. On a k×k convolution ``down`` carries the layer's full geometry (LoCon); with
``use_tucker`` it is split into 1×1 down, k×k ``mid`` (r×r) and 1×1 up. Training and unmerged inference
run the bypass ``base(x) + m·α/r·up(mid(down(x)))`` and never build ΔW.

DoRA runs through the factors too where the weight is larger than the activations (`LoRAAdapter._dora_forward`,
chosen by `_factors_cheaper`: 3×3 convolutions, few-token layers): the norms of W0 + ΔW per input column (or output
row) expand as ‖w‖² + 2s⟨w, Δw⟩ + s²‖Δw‖², each term at rank cost (W0ᵀ·up or W0·downᵀ, and the r×r Gram matrix
of the other factor), and the magnitudes then scale the layer's input (per column) or output (per row), which
commutes with the layer's op. Elsewhere, and with Tucker factors or training-time dropouts (which act on ΔW's
entries), the weight is rebuilt.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Decomposable
from .functional import (
    along,
    channel_scale,
    conv_like,
    in_out,
    kaiming_,
    kernel_size,
    layer_op,
    per_row,
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
        self.register_constant("alpha", float(alpha))
        self.dim = dim
        kaiming_(self.lora_down.weight)
        if self.tucker:
            kaiming_(self.lora_mid.weight)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.constant("alpha") / self.dim

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
        if not self.weight_decompose:
            return self._add_bypass(x, self.lora_down.weight, self.lora_up.weight, self.scale)
        if self.tucker or (self.training and (self.dropout or self.rank_dropout)) or not self._factors_cheaper(x):
            return super()._forward(x)
        return self._dora_forward(x)

    def _factors_cheaper(self, x: Tensor) -> bool:
        """DoRA through the factors passes over the activations (input scaled and blended, a rank-r path), the
        rebuilt weight over W0's entries (and, training, through dL/dW'): the factors win where the weight is
        the larger, positions·(in + out) < out·in·k². Measured on SD 1.5's slice (benchmarks/adapters.py, 2
        cores): 3×3 convolutions over 32×32 maps (1.64× the floor instead of 2.24×) and few-token layers take
        the factors, the 320-wide Linear layers over 1024 tokens keep the weight."""
        in_dim, out_dim = in_out(self.base)
        return self.positions(x)[0] * (in_dim + out_dim) < self.base.weight.numel()

    def _dora_ratio(self, w0: Tensor) -> Tensor:
        """magnitude / ‖W0 + ΔW‖ per input column (or output row), the norms from the factors: W0 and the
        factors flattened to (out, in, k²) and (r, in, k²), never ΔW itself. ``w0`` is the caller's (`w0`
        dequantises an 8-bit base on every read)."""
        s, dtype = self.scale, self.lora_down.weight.dtype
        w0 = w0.to(dtype)
        w = w0.reshape(*w0.shape[:2], -1)
        up = self.lora_up.weight.reshape(self.lora_up.weight.shape[0], -1)  # (out, r)
        down = self.lora_down.weight.reshape(*self.lora_down.weight.shape[:2], -1)  # (r, in, k²)
        if per_row(self.dora_scale, w0):
            cross = (torch.einsum("oik,rik->or", w, down) * up).sum(1)  # ⟨w_o, Δw_o⟩ / s
            square = torch.einsum("or,rq,oq->o", up, torch.einsum("rik,qik->rq", down, down), up)
            base = w.square().sum(dim=(1, 2))
        else:
            cross = (torch.einsum("oik,or->rik", w, up) * down).sum(dim=(0, 2))
            square = torch.einsum("rik,rq,qik->i", down, up.T @ up, down)
            base = w.square().sum(dim=(0, 2))
        norm = (base + 2 * s * cross + s * s * square).clamp_min(0).sqrt()
        return self.dora_scale.flatten() / (norm + torch.finfo(norm.dtype).eps)

    def _dora_forward(self, x: Tensor) -> Tensor:
        """W0 + m·(DoRA(W0 + ΔW) − W0) applied to x with one base op. Per input column, DoRA's weight is
        (W0 + ΔW)·diag(ratio): W0·((1 − m)·x + m·ratio⊙x) + m·s·up(down(ratio⊙x)). Per output row it is
        diag(ratio)·(W0 + ΔW): (1 + m·(ratio − 1))⊙W0x + m·s·ratio⊙up(down(x))."""
        w0, m = self.w0, self.multiplier
        ratio = self._dora_ratio(w0)
        h = x.to(ratio.dtype)
        if per_row(self.dora_scale, w0):
            out = layer_op(self.base, x.to(w0.dtype) if x.is_floating_point() else x, w0, None).to(ratio.dtype)
            low = layer_op(self.lora_up, layer_op(self.lora_down, h, self.lora_down.weight, None),
                           self.lora_up.weight, None)
            out = channel_scale(out, 1 + m * (ratio - 1), self.channel_dim) + \
                channel_scale(low, (m * self.scale) * ratio, self.channel_dim)
        else:
            scaled = channel_scale(h, ratio, self.channel_dim)
            mixed = h + m * (scaled - h)
            out = layer_op(self.base, mixed.to(w0.dtype), w0, None).to(ratio.dtype)
            low = layer_op(self.lora_down, scaled, self.lora_down.weight, None) * (m * self.scale)
            out = out + layer_op(self.lora_up, low, self.lora_up.weight, None)
        if self.base.bias is not None:
            out = out + along(self.base.bias.to(out.dtype), out, self.channel_dim)
        return out.to(w0.dtype)

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
