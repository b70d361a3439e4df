"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al. 2023).

A LoRA/LoCon of rank ``dim`` trained so that every prefix of ``block_size``·j rank channels is itself a
good adapter: each training step samples b ∈ {block_size, 2·block_size, …, dim} and uses the first b
rows of ``down`` and columns of ``up`` with scale α/b. Saved with LoCon keys at full rank (any tool that
reads LoRA reads it); truncating the file to rank b later gives the adapter trained at rank b.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Strategy
from .lora import LoRAAdapter


class DyLoRAAdapter(LoRAAdapter):
    def __init__(self, base: nn.Module, dim: int, alpha: float, block_size: int, **common):
        super().__init__(base, dim, alpha, **common)
        self.block_size = block_size

    def _forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super()._forward(x)
        blocks = self.dim // self.block_size
        b = self.block_size * int(torch.randint(1, blocks + 1, ()))
        return self._add_bypass(x, self.lora_down.weight[:b], self.lora_up.weight[:, :b], self.constant("alpha") / b)


class DyLoRA(Strategy):
    """DyLoRA: LoRA trained at randomly sampled rank prefixes.

    Args:
        block_size: rank granularity; ``dim`` must be a multiple of it.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    algo = "dylora"
    adapter_class = LoRAAdapter  # its files are LoCon files at full rank: LoRA reads them

    def __init__(self, block_size: int = 1, **kwargs):
        super().__init__(**kwargs)
        if block_size < 1:
            raise ValueError(f"DyLoRA: block_size={block_size} must be >= 1")
        self.block_size = block_size

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> DyLoRAAdapter:
        if dim % self.block_size:
            raise ValueError(f"DyLoRA: dim={dim} is not a multiple of block_size={self.block_size}")
        return DyLoRAAdapter(layer, dim, alpha, self.block_size, **self.common())
