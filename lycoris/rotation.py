"""The orthogonal family's shared adapter (OFT, BOFT): W' = rescale ⊙ R(W0), R an orthogonal map of the output rows.

Because R mixes output rows only, W'x = rescale ⊙ R(W0·x): the adapted layer can run the frozen op and rotate its
*output* (the bypass path), positions·out·c multiply-adds for a rotation of c per entry, instead of rotating the
weight (out·in·k²·c) and training through a rebuilt weight, whose gradient dL/dW' costs positions·out·in·k² more.
`RowRotation._bypass_cheaper` picks per call: training rotates the output of 3×3 convolutions and of layers over
few positions, and rebuilds the weight of Linear layers over many tokens (SD 1.5's 320-wide ones over 1024) and
when sampling without gradients over many positions. Both paths compute the same function
(tests/test_algorithms.py checks outputs and gradients in float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Adapter
from .functional import ENTRY_COST, capped, rank_mask


class RowRotation(Adapter):
    """An adapter that rotates W0's output rows by a Cayley-parameterised orthogonal map (``oft_blocks``, the
    file key both algorithms share), with an optional learned scale per row (``rescale``).

    Subclasses set ``oft_blocks`` (and ``rescale``) through `_init_rotation` and give `_rotate_rows` (R along the
    last dimension), `rotation_cost` (multiply-adds per rotated entry) and `rotation_passes` (entries it writes
    per rotated entry: its permuted copies).
    """

    no_weight_decay = ("rescale",)  # starts at 1: decaying it would shrink the rotated weight

    def _init_rotation(self, blocks: tuple[int, ...], constraint: float, rescaled: bool) -> None:
        self.oft_blocks = nn.Parameter(torch.zeros(blocks))  # zero: R = I, ΔW = 0
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(self.base.weight.shape[0], *[1] * (self.base.weight.dim() - 1)))
        self.register_constant("alpha", float(constraint))

    @property
    def rotation_cost(self) -> int:
        """Multiply-adds of `_rotate_rows` per entry of the rotated dimension."""
        raise NotImplementedError

    @property
    def rotation_passes(self) -> int:
        """Entries `_rotate_rows` writes per entry rotated (einsum outputs and permuted copies)."""
        raise NotImplementedError

    def _rotate_rows(self, rows: Tensor) -> Tensor:
        """R applied along the last dimension of ``rows`` (the output channels)."""
        raise NotImplementedError

    def _delta(self) -> Tensor:
        w0 = self.w0.to(self.oft_blocks.dtype)
        rotated = self._rotate_rows(w0.flatten(1).T).T.reshape(w0.shape)
        if hasattr(self, "rescale"):
            rotated = rotated * self.rescale
        return rotated - w0

    def _bypass_cheaper(self, x: Tensor) -> bool:
        """Whether rotating the output costs less than rotating the weight, in multiply-adds plus ENTRY_COST per
        entry written (backward: twice the forward): the rotation over positions·out entries with four more
        passes (cast, bias, interpolation, cast back) and three counted for what the measurements show beyond the
        count (the activations kept for backward where the rebuilt path keeps the weight, the einsum's batches of
        small products), against the rotation over the weight's out·in·k² entries with four more (rescale,
        difference, blend, cast) plus, with gradients, the rebuilt weight's dL/dW' (positions·out·in·k²). Measured
        on SD 1.5's slice (benchmarks/adapters.py, 2 cores): it keeps the weight path for the transformer block's
        320-wide Linear layers over 1024 tokens, where rotating the activations was slower and kept more memory
        (OFT 1.59× against 1.36× the floor, memory 1.43× against 1.22×), and rotates the output of 3×3
        convolutions (nine times the weight) and of the layers with few positions (cross-attention's keys and
        values, the time embedding)."""
        grad = torch.is_grad_enabled()
        out, fan_in = self.base.weight.shape[0], math.prod(self.base.weight.shape[1:])
        positions = self.positions(x)[1]
        steps, c, q = 1 + 2 * grad, self.rotation_cost, self.rotation_passes
        bypass = steps * positions * out * (c + ENTRY_COST * (7 + q))
        rebuilt = steps * out * fan_in * (c + ENTRY_COST * (4 + q)) + grad * positions * out * fan_in
        return bypass < rebuilt

    def _forward(self, x: Tensor) -> Tensor:
        # Elementwise dropout acts on ΔW's entries, DoRA on W' itself: only the rebuilt weight has them.
        if self.weight_decompose or (self.training and self.dropout) or not self._bypass_cheaper(x):
            return super()._forward(x)
        return self._bypass_forward(x)

    def _bypass_forward(self, x: Tensor) -> Tensor:
        """The frozen op's output h = W0x + b with its bias-free part rotated: W0x + b + m·(s ⊙ R(W0x) − W0x), as
        one interpolation from h to s ⊙ R(h) + (b − s ⊙ R(b)) at the multiplier: R is linear, so the
        bias comes out through its own rotation (a vector) instead of a pass over the activations. Rank dropout
        acts on the output channels as the rebuilt path drops ΔW's rows. The frozen op is the layer's own, so an
        8-bit base keeps no dequantised weight for backward."""
        h = self.base_forward(x)
        rotated = self._rotate_rows(h.movedim(self.channel_dim, -1).to(self.oft_blocks.dtype))
        scale = self.rescale.flatten() if hasattr(self, "rescale") else None
        if scale is not None:
            rotated = rotated * scale
        if self.base.bias is not None:
            bias = self.base.bias.to(rotated.dtype)
            bias_rotated = self._rotate_rows(bias)
            rotated = rotated + (bias - (bias_rotated if scale is None else scale * bias_rotated))
        weight: float | Tensor = self.multiplier
        if self.training and self.rank_dropout:
            weight = self.multiplier * rank_mask(rotated.shape[-1], self.rank_dropout, rotated)
        # Also at 1: the interpolation writes in h's layout, where the rotation's output is channels-last, whose
        # gradient a convolution's backward would copy (measured: a 3×3 conv's step peak one activation higher).
        rotated = torch.lerp(h.movedim(self.channel_dim, -1).to(rotated.dtype), rotated, weight)
        return rotated.movedim(-1, self.channel_dim).to(h.dtype)

    def file_tensors(self) -> dict[str, Tensor]:
        # The blocks as the cap leaves them (the same rotation): ComfyUI caps ‖Q‖ at alpha, A1111 and the LyCORIS
        # library at alpha·out_dim, so only blocks no cap acts on read the same everywhere.
        return {**super().file_tensors(), "oft_blocks": capped(self.oft_blocks.detach(), self.constant("alpha"))}

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> RowRotation:
        return cls(base, tensors["oft_blocks"].shape[-1], float(tensors.get("alpha", torch.tensor(0.0))),
                   rescaled="rescale" in tensors)

