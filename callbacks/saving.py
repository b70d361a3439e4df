"""Saving a run: adapter files every N epochs, and resumable Lightning checkpoints, inside the run folder.

Both default to folders under the Trainer's ``default_root_dir`` (the run folder the recipe names), so
``--trainer.default_root_dir=runs/other`` moves everything together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class AdapterExport(L.Callback):
    """Write ``adapters/epoch=E.safetensors`` every ``every_n_epochs`` (E counts completed epochs, from 1) and
    after the last epoch: LyCORIS keys, kohya metadata and the resolved recipe; A1111, ComfyUI, diffusers and
    the LyCORIS library load them.

    Args:
        every_n_epochs: save after every this many epochs (paper: 5 of 50).
        dtype: tensor dtype in the file; float16 is what the UIs expect and halves the size.
        dirpath: the folder; None means ``<default_root_dir>/adapters``.
        output_name: kohya's ``ss_output_name``; None uses the run folder's name.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        dirpath: str | None = None,
        output_name: str | None = None,
    ):
        if every_n_epochs < 1:
            raise ValueError(f"AdapterExport: every_n_epochs={every_n_epochs} must be >= 1")
        self.every_n_epochs, self.dtype = every_n_epochs, dtype
        self.dirpath, self.output_name = dirpath, output_name
        self.saved: list[Path] = []

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapters"

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        name = self.output_name or Path(trainer.default_root_dir).resolve().name
        path = pl_module.save_adapter(self.folder(trainer) / f"epoch={epoch}.safetensors", self.dtype, name)
        self.saved.append(path)
        rank_zero_info(f"adapter saved: {path} ({path.stat().st_size / 2**20:.1f} MiB)")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (resumable: adapters, optimizer, schedulers, loops, RNG-free data order),
    writing to ``<default_root_dir>/checkpoints`` unless ``dirpath`` says otherwise, with ``last.ckpt`` kept up
    to date, so ``--ckpt_path last`` continues an interrupted run.

    Args:
        every_n_epochs: also keep ``epoch=E.ckpt`` every this many epochs (``last.ckpt`` follows every epoch).
        save_top_k: how many of those to keep (-1: all).
        filename: name pattern of the kept checkpoints.
        save_last: keep ``last.ckpt``, which ``--ckpt_path last`` resumes from.
        **kwargs: any other `ModelCheckpoint` argument.
    """

    def __init__(self, every_n_epochs: int = 1, save_top_k: int = 1, filename: str = "{epoch}",
                 save_last: bool = True, **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, save_top_k=save_top_k, filename=filename,
                         save_last=save_last, **kwargs)

    def _default_dir(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Called for ckpt_path="last" before setup: the folder must be known by then.
        self._default_dir(trainer)
        return super()._find_last_checkpoints(trainer)
