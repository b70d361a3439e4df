"""BOFT: butterfly orthogonal fine-tuning (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via
Butterfly Factorization").

The rotation of the output rows is a product of m = log2(block_num)+1 sparse butterfly factors; stage i
permutes the rows so that rows 2^i·b/2 apart meet in the same block, rotates each block of size b by a
Cayley transform (as in OFT), and permutes back. ``oft_blocks`` is (m, block_num, b, b). The output
dimension must factor as b·2^p with b even and <= dim (`butterfly_factor`), otherwise construction fails
naming the layer and the block sizes that would work.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Strategy
from .functional import butterfly_factor, cayley, in_out
from .rotation import RowRotation


class BOFTAdapter(RowRotation):
    signature = ("oft_blocks",)

    def __init__(self, base: nn.Module, block_size: int, constraint: float = 0.0, rescaled: bool = False,
                 **common):
        super().__init__(base, **common)
        out_dim = in_out(base)[1]
        block_size, block_num = butterfly_factor(out_dim, block_size)
        self.block_size, self.block_num = block_size, block_num
        stages = block_num.bit_length()  # log2(block_num) + 1
        self._init_rotation((stages, block_num, block_size, block_size), constraint, rescaled)

    @classmethod
    def detects(cls, tensors: dict[str, Tensor]) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4

    def _rotate_rows(self, w: Tensor) -> Tensor:
        """Apply the butterfly rotation to the last dimension of ``w`` (the output rows)."""
        b, half = self.block_size, self.block_size // 2
        for stage, r in enumerate(cayley(self.oft_blocks, self.constant("alpha"))):
            k = 2**stage * half
            # Gather rows k apart into adjacent pairs, then blocks of b; rotate; scatter back.
            w = w.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
            w = torch.einsum("bij,...bj->...bi", r, w)
            w = w.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
        return w

    @property
    def rotation_cost(self) -> int:
        return self.block_size * self.oft_blocks.shape[0]  # a b-wide block product per stage

    @property
    def rotation_passes(self) -> int:
        return 3 * self.oft_blocks.shape[0]  # per stage: gather, rotate, scatter


class BOFT(Strategy):
    """Butterfly orthogonal fine-tuning: dense rotations from log-many sparse stages.

    ``dim`` bounds the block size b: the output dimension must be b·2^p with b even and <= dim.

    Args:
        constraint: cap on the norm of each Q (COFT); 0 disables it.
        rescaled: also learn a scale per output row.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "boft"
    adapter_class = BOFTAdapter

    def __init__(self, constraint: float = 0.0, rescaled: bool = False, **kwargs):
        super().__init__(**kwargs)
        if constraint < 0:
            raise ValueError(f"BOFT: constraint={constraint} must be >= 0")
        self.constraint = constraint
        self.rescaled = rescaled

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> BOFTAdapter:
        return BOFTAdapter(layer, dim, self.constraint, self.rescaled, **self.common())
