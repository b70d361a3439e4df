"""OFT: orthogonal fine-tuning with block-diagonal rotations (Qiu et al. 2023), LyCORIS "diag-oft".

The output rows of W0 are split into ``block_num`` blocks of ``block_size`` (by `factorization(out, dim)`)
and each block is rotated by a Cayley transform R = (I+Q)(I−Q)⁻¹ of a skew matrix Q = B − Bᵀ, B the
trained ``oft_blocks`` (zero at start: R = I). As in LyCORIS and the UIs, a block of rows is mixed as
Rᵀ·W. ``constraint`` (COFT) caps ‖Q‖; ``rescaled`` adds a learned per-row scale. ΔW = (rescale·RᵀW0) − W0,
and the weight is rotated once per step (one small batched solve plus one einsum over W0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Strategy
from .functional import capped, cayley, factorization, in_out


class OFTAdapter(Adapter):
    signature = ("oft_blocks",)
    no_weight_decay = ("rescale",)  # starts at 1: decaying it would shrink the rotated weight

    def __init__(self, base: nn.Module, block_size: int, constraint: float = 0.0, rescaled: bool = False,
                 **common):
        super().__init__(base, **common)
        out_dim = in_out(base)[1]
        if out_dim % block_size:
            raise ValueError(f"OFT block size {block_size} does not divide the {out_dim} output rows")
        self.block_size, self.block_num = block_size, out_dim // block_size
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_num, block_size, block_size))
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(out_dim, *[1] * (base.weight.dim() - 1)))
        self.register_buffer("alpha", torch.tensor(float(constraint)))

    @classmethod
    def detects(cls, tensors: dict[str, Tensor]) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 3

    def rotation(self) -> Tensor:
        return cayley(self.oft_blocks, float(self.alpha))

    def _delta(self) -> Tensor:
        w0 = self.w0.to(self.oft_blocks.dtype)
        blocks = w0.unflatten(0, (self.block_num, self.block_size))
        rotated = torch.einsum("knm,kn...->km...", self.rotation(), blocks).flatten(0, 1)
        if hasattr(self, "rescale"):
            rotated = rotated * self.rescale
        return rotated - w0

    def file_tensors(self) -> dict[str, Tensor]:
        # The blocks as the cap leaves them (the same rotation): ComfyUI caps ‖Q‖ at alpha, A1111 and the LyCORIS
        # library at alpha·out_dim, so only blocks no cap acts on read the same everywhere.
        return {**super().file_tensors(), "oft_blocks": capped(self.oft_blocks.detach(), float(self.alpha))}

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> OFTAdapter:
        return cls(base, tensors["oft_blocks"].shape[-1], float(tensors.get("alpha", torch.tensor(0.0))),
                   rescaled="rescale" in tensors)


class OFT(Strategy):
    """Orthogonal fine-tuning with block-diagonal rotations of the output rows.

    ``dim`` sets the block size: the output dimension d is split by `factorization(d, dim)` and the smaller
    part is the block size (dim=4 on 320 rows: 80 blocks of 4).

    Args:
        constraint: cap on the norm of Q (COFT); 0 disables it.
        rescaled: also learn a scale per output row.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "diag-oft"
    adapter_class = OFTAdapter

    def __init__(self, constraint: float = 0.0, rescaled: bool = False, **kwargs):
        super().__init__(**kwargs)
        if constraint < 0:
            raise ValueError(f"OFT: constraint={constraint} must be >= 0")
        self.constraint = constraint
        self.rescaled = rescaled

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> OFTAdapter:
        block_size = factorization(in_out(layer)[1], dim)[0]
        return OFTAdapter(layer, block_size, self.constraint, self.rescaled, **self.common())
