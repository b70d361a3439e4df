"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022).

W = W0 ⊙ (1 + w), with one learned factor per output row (or, with ``train_on_input``, per input
column); w starts at zero. ΔW = W0 ⊙ w. The forward scales activations instead of the weight:
``base(x)·(1+m·w) − m·w·b`` on the output side, ``base(x ⊙ (1+m·w))`` on the input side.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Strategy
from .functional import along, channel_scale, in_out


class IA3Adapter(Adapter):
    signature = ("on_input",)

    def __init__(self, base: nn.Module, train_on_input: bool = False, **common):
        super().__init__(base, **common)
        in_dim, out_dim = in_out(base)
        size = in_dim if train_on_input else out_dim
        # LyCORIS' file shapes: (size,) for Linear, (1, size, 1[, 1]) for convolutions.
        shape = (size,) if isinstance(base, nn.Linear) else (1, size, *[1] * (base.weight.dim() - 2))
        self.weight = nn.Parameter(torch.zeros(shape))
        self.register_constant("on_input", int(train_on_input), torch.int64)

    def _delta(self) -> Tensor:
        w0 = self.w0.to(self.weight.dtype)
        return channel_scale(w0, self.weight.flatten(), 1 if self.constant("on_input") else 0)

    def _forward(self, x: Tensor) -> Tensor:
        if self.training and (self.dropout or self.rank_dropout):
            return super()._forward(x)
        w = self.multiplier * self.weight.flatten()
        if self.constant("on_input"):
            return self.base_forward(channel_scale(x, 1 + w.to(x.dtype), self.channel_dim))
        out = self.base_forward(x)
        # W0⊙(1+w) leaves the bias alone, so only the bias-free part of the output is scaled.
        bias = self.base.bias
        unbiased = out if bias is None else out - along(bias, out, self.channel_dim)
        return out + channel_scale(unbiased, w.to(out.dtype), self.channel_dim)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> IA3Adapter:
        return cls(base, train_on_input=bool(int(tensors["on_input"])))


class IA3(Strategy):
    """(IA)³: learn one multiplicative factor per output (or input) channel; ``dim``/``alpha`` are unused.

    Args:
        train_on_input: scale input channels instead of output channels.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "ia3"
    adapter_class = IA3Adapter

    def __init__(self, train_on_input: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.train_on_input = train_on_input

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> IA3Adapter:
        return IA3Adapter(layer, self.train_on_input, **self.common())
