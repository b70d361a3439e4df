"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara; LyCORIS paper §3.2).

ΔW = (w1a·w1b) ⊙ (w2a·w2b) · α/r, whose rank can reach r² for the parameters of a rank-2r LoRA.
With ``use_tucker`` on
a k×k convolution each factor pair becomes a Tucker product with a r×r×k×k core (``hada_t1``/``hada_t2``,
factors stored rank-first). ΔW is computed through `HadamardProduct`, which keeps only the factors for
backward instead of both weight-sized products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Adapter, Decomposable
from .functional import HadamardProduct, in_out, kernel_size, rebuild_tucker


class LoHaAdapter(Adapter):
    signature = ("hada_w1_a",)

    def __init__(self, base: nn.Module, dim: int, alpha: float, use_tucker: bool = False, **common):
        super().__init__(base, **common)
        in_dim, out_dim = in_out(base)
        ksize = kernel_size(base)
        self.tucker = use_tucker and any(k > 1 for k in ksize)
        self.dim = dim
        if self.tucker:
            for i in (1, 2):
                self.register_parameter(f"hada_t{i}", nn.Parameter(torch.empty(dim, dim, *ksize)))
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.empty(dim, out_dim)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.empty(dim, in_dim)))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            fan_in = in_dim * math.prod(ksize)
            for i in (1, 2):
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.empty(out_dim, dim)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.empty(dim, fan_in)))
        # LyCORIS' initialisation: ΔW = 0 through w2a = 0, the other factors random.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        self.register_constant("alpha", float(alpha))

    @property
    def scale(self) -> float:
        return self.constant("alpha") / self.dim

    def _delta(self) -> Tensor:
        shape = self.base.weight.shape
        if self.tucker:
            w1 = rebuild_tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = rebuild_tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return w1 * w2 * self.scale
        delta = HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return delta.reshape(shape)

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> LoHaAdapter:
        tucker = "hada_t1" in tensors
        dim = tensors["hada_w1_b"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else dim
        return cls(base, dim, alpha, use_tucker=tucker, **cls.dora_args(base, tensors))


class LoHa(Decomposable):
    """LoHa: Hadamard product of two low-rank matrices (paper default dim 4, alpha 2).

    Args:
        use_tucker: Tucker-decompose the factors of k×k convolutions.
        **kwargs: DoRA and shared hyperparameters, see `lycoris.Decomposable` and `lycoris.Strategy`.
    """

    algo = "loha"
    adapter_class = LoHaAdapter

    def __init__(self, use_tucker: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.use_tucker = use_tucker

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> LoHaAdapter:
        return LoHaAdapter(layer, dim, alpha, use_tucker=self.use_tucker, **self.common())
