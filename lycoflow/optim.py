"""`AdamW8bit`: the paper's optimizer, bitsandbytes' 8-bit AdamW where bitsandbytes is installed, torch's AdamW
(same arguments, full-precision moments) where it is not.

A recipe names it by class path, so the same recipe runs on a GPU machine with ``pip install 'lycoflow[bnb]'``
and on one without bitsandbytes (a CPU, a test run)::

    optimizer:
      class_path: lycoflow.optim.AdamW8bit
      init_args: {weight_decay: 0.1, betas: [0.9, 0.99]}

Which one it is is decided once, when this module is imported. Its state is the state of the optimizer it is,
saved in Lightning checkpoints and restored on resume like any optimizer's; a checkpoint of the one cannot
resume the other, which `AdamW8bit.load_state_dict` says in words.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

try:
    from bitsandbytes.optim import AdamW8bit as _Backend

    #: Whether `AdamW8bit` is bitsandbytes' 8-bit AdamW (True) or torch's AdamW (False).
    EIGHT_BIT = True
except ImportError:
    _Backend = torch.optim.AdamW
    EIGHT_BIT = False

# Lightning's own rank-zero logger: its console handler prints the message as one line.
_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")


@functools.cache  # once per process: a sweep or a test builds many optimizers
@rank_zero_only
def _say_fallback() -> None:
    _log.warning("lycoflow.optim.AdamW8bit: bitsandbytes is not installed, so this is torch.optim.AdamW with the same "
                 "arguments (32-bit moments: more memory, the same update up to 8-bit rounding); for the 8-bit "
                 "optimizer: pip install 'lycoflow[bnb]'")


class AdamW8bit(_Backend):
    """AdamW with 8-bit moments (Dettmers et al. 2022, as kohya's ``--optimizer_type AdamW8bit``): bitsandbytes'
    ``AdamW8bit`` when bitsandbytes is installed, otherwise `torch.optim.AdamW` with the same arguments (said
    once in the log).

    Args:
        params: the parameters or parameter groups (a group's own ``lr``/``weight_decay`` win).
        lr: learning rate (lycoflow sets it per part: ``model.lr``, ``model.text_encoder_lr``).
        betas: coefficients of the running averages of the gradient and its square (paper: 0.9, 0.99).
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (paper: 0.1).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not EIGHT_BIT:
            _say_fallback()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Either optimizer would take the other's state and fail at its first step with a bare KeyError. torch
        # keeps AdamW's moments as exp_avg/exp_avg_sq; bitsandbytes under names of its own (which vary by version).
        by_torch = {"exp_avg" in state for state in state_dict["state"].values()}
        if by_torch and by_torch != {not EIGHT_BIT}:
            raise ValueError(
                "this optimizer state was written by " + ("bitsandbytes' 8-bit AdamW, and bitsandbytes is not "
                "installed here: pip install 'lycoflow[bnb]' to resume it" if not EIGHT_BIT else
                "torch's AdamW (lycoflow.optim.AdamW8bit without bitsandbytes), and bitsandbytes is installed "
                "here: resume it where bitsandbytes is not installed, or start the run afresh")
            )
        super().load_state_dict(state_dict)
