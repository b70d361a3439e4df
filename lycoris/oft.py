"""OFT: orthogonal fine-tuning with block-diagonal rotations (Qiu et al. 2023), LyCORIS "diag-oft".

The output rows of W0 are split into ``block_num`` blocks of ``block_size`` (by `factorization(out, dim)`)
and each block is rotated by a Cayley transform R = (I+Q)(I−Q)⁻¹ of a skew matrix Q = B − Bᵀ, B the
trained ``oft_blocks`` (zero at start: R = I). As in LyCORIS and the UIs, a block of rows is mixed as
Rᵀ·W. ``constraint`` (COFT) caps ‖Q‖; ``rescaled`` adds a learned per-row scale. ΔW = (rescale·RᵀW0) − W0.
Where a cost model says so, the layer's output is rotated instead of its weight (`lycoris.rotation.RowRotation`):
block_size multiply-adds per output entry on top of the frozen op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Strategy
from .functional import cayley, factorization, in_out
from .rotation import RowRotation


class OFTAdapter(RowRotation):
    signature = ("oft_blocks",)

    def __init__(self, base: nn.Module, block_size: int, constraint: float = 0.0, rescaled: bool = False,
                 **common):
        super().__init__(base, **common)
        out_dim = in_out(base)[1]
        if out_dim % block_size:
            raise ValueError(f"OFT block size {block_size} does not divide the {out_dim} output rows")
        self.block_size, self.block_num = block_size, out_dim // block_size
        self._init_rotation((self.block_num, block_size, block_size), constraint, rescaled)

    @classmethod
    def detects(cls, tensors: dict[str, Tensor]) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 3

    def rotation(self) -> Tensor:
        return cayley(self.oft_blocks, self.constant("alpha"))

    @property
    def rotation_cost(self) -> int:
        return self.block_size

    @property
    def rotation_passes(self) -> int:
        return 2  # the einsum's permuted input and its output

    def _rotate_rows(self, rows: Tensor) -> Tensor:
        # Block k of rows n mixes as RᵀW: row m of the result is Σ_n R[k, n, m]·row n.
        blocks = rows.unflatten(-1, (self.block_num, self.block_size))
        return torch.einsum("knm,...kn->...km", self.rotation(), blocks).flatten(-2)


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
