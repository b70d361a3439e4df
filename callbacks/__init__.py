"""Lightning callbacks of lycoflow: adapter export, resumable checkpoints (generation, evaluation and logging to
come)."""

from .saving import AdapterExport, RunCheckpoint

__all__ = ["AdapterExport", "RunCheckpoint"]
