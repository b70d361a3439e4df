"""Saving a run: adapter files every N epochs, and resumable Lightning checkpoints, inside the run folder.

Both default to folders under the Trainer's ``default_root_dir`` (the run folder the recipe names), so
``--trainer.default_root_dir=runs/other`` moves everything together.

Both write a temporary file beside the real one and rename it: a save that fails leaves the previous files as they
were and removes its temporary file; when the disk is full the error is a `lycoflow.cache.DiskFullError`, one line
naming the file. A save killed outright (SIGKILL, power loss) can leave its temporary file: those are removed when
the next fit starts (`remove_stale_temp_files`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lycoflow.cache import DiskFullError, no_room

#: The temporary files lycoflow's writers leave beside a file when killed while writing it: RunCheckpoint's
#: ``.last.ckpt.tmp``, and ``.<name>.<8 random characters>.tmp`` from `lycoflow.cache.atomic_path` and
#: `lycoris.save_file` (``tempfile.mkstemp``'s names). Nothing else is ever removed.
STALE_TEMP = re.compile(r"\.last\.ckpt\.tmp|\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(trainer: L.Trainer) -> list[Path]:
    """Remove the temporary files an interrupted save left in the run's adapter and checkpoint folders (those of
    its `AdapterExport` and `RunCheckpoint` callbacks), on global rank 0; say so once, naming them. Only regular
    files whose names match `STALE_TEMP` are removed. Returns them."""
    if not trainer.is_global_zero:
        return []
    root = Path(trainer.default_root_dir)
    folders: list[Path] = []
    for callback in trainer.callbacks:
        if isinstance(callback, AdapterExport):
            folders.append(callback.folder(trainer))
        elif isinstance(callback, RunCheckpoint):
            folders.append(Path(callback.dirpath) if callback.dirpath else root / "checkpoints")
    removed: list[Path] = []
    for folder in dict.fromkeys(folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if STALE_TEMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        names = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in removed)
        rank_zero_info(f"removed {len(removed)} temporary file{'s' * (len(removed) > 1)} left by an interrupted "
                       f"save: {names}")
    return removed


class AdapterExport(L.Callback):
    """Write ``adapters/epoch=E.safetensors`` every ``every_n_epochs`` (E counts completed epochs, from 1) and
    after the last epoch (``step=S.safetensors`` if training stops mid-epoch, e.g. at ``max_steps``): LyCORIS
    keys, kohya metadata and the resolved recipe; A1111, ComfyUI, diffusers and the LyCORIS library load them.

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
        self._saved_step = 0  # global step of the last file written (0: nothing trained yet)

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapters"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            remove_stale_temp_files(trainer)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, filename: str) -> None:
        name = self.output_name or Path(trainer.default_root_dir).resolve().name
        path = self.folder(trainer) / filename
        try:  # lycoris.save_file writes a temporary file beside it, renamed when whole, removed on any failure
            path = pl_module.save_adapter(path, self.dtype, name)
        except Exception as err:
            if (code := no_room(err)) is None or isinstance(err, DiskFullError):
                raise
            raise DiskFullError(path, code, "adapter file ", "; the adapter files and the checkpoint saved before "
                                "are intact: free some space, then resume with --ckpt_path last") from err
        self._saved_step = trainer.global_step
        rank_zero_info(f"adapter saved: {path} ({path.stat().st_size / 1024:,.0f} KiB)")

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        if epoch % self.every_n_epochs == 0 or last:
            self._save(trainer, pl_module, f"epoch={epoch}.safetensors")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped by max_steps, max_time or early stopping: keep what was trained since the last file.
        if trainer.global_step != self._saved_step:
            self._save(trainer, pl_module, f"step={trainer.global_step}.safetensors")


class RunCheckpoint(ModelCheckpoint):
    """A resumable Lightning checkpoint (adapters, optimizer, schedulers, loop progress), replaced (atomically) as
    ``<default_root_dir>/checkpoints/last.ckpt`` at the end of every training epoch, so ``--ckpt_path last``
    continues an interrupted run from its last complete epoch. The frozen base model is not in it.

    Args:
        every_n_epochs: write it every this many epochs instead (large native fine-tuning runs).
        dirpath: the folder; None means ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, every_n_epochs: int = 1, dirpath: str | None = None):
        # One file, rewritten in place, at every epoch's end whether or not validation runs that epoch.
        super().__init__(dirpath=dirpath, filename="last", every_n_epochs=every_n_epochs, save_top_k=1,
                         save_last=False, save_on_train_epoch_end=True, enable_version_counter=False)

    def _default_dir(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dir(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            remove_stale_temp_files(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Written beside it and renamed: a crash while writing leaves the previous last.ckpt whole, not truncated;
        # a failed write removes what it wrote.
        tmp = str(Path(filepath).with_name(f".{Path(filepath).name}.tmp"))
        try:
            super()._save_checkpoint(trainer, tmp)
            if trainer.is_global_zero:
                os.replace(tmp, filepath)
        except BaseException as err:
            if trainer.is_global_zero:
                Path(tmp).unlink(missing_ok=True)
            if (code := no_room(err)) is None or isinstance(err, DiskFullError):
                raise
            kept = f"the previous {Path(filepath).name} and the adapter files are" if os.path.exists(filepath) \
                else "the adapter files saved before are"
            raise DiskFullError(filepath, code, "checkpoint ", f"{_staged_elsewhere(filepath)}; {kept} intact: free "
                                "some space, then resume with --ckpt_path last") from err
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Called for ckpt_path="last" before setup: the folder must be known by then.
        self._default_dir(trainer)
        return super()._find_last_checkpoints(trainer)


def _staged_elsewhere(filepath: str) -> str:
    """Lightning writes a local checkpoint into the temporary folder first (fsspec's transaction), then moves it:
    when that folder is on another disk, that disk may be the full one."""
    staging = tempfile.gettempdir()
    try:
        if os.stat(staging).st_dev != os.stat(Path(filepath).parent).st_dev:
            return f" (Lightning stages it in {staging} first, another disk: free space there too)"
    except OSError:
        pass
    return ""
