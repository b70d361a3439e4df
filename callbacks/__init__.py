"""Lightning callbacks of lycoflow: adapter export, resumable checkpoints, evaluation at saved epochs."""

from .evaluation import Evaluation
from .saving import AdapterExport, RunCheckpoint

__all__ = ["AdapterExport", "Evaluation", "RunCheckpoint"]
