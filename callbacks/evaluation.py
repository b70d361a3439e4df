"""`Evaluation`: at the saved epochs, generate the prompt suite and measure fidelity, controllability, diversity
and base-model preservation (paper §4–§5.2); log them to W&B and to ``metrics.csv``. When is decided here; the
work is `lycoflow.evaluation.Evaluator`'s."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lycoflow.data import HierarchicalDataModule
from lycoflow.evaluation import Evaluator, Protocol, Sampler, adapters_off
from lycoflow.evaluation.table import summary
from lycoflow.metrics.encoders import ImageEmbedder, StyleFeatures, TextImageEmbedder

from .saving import AdapterExport


class Evaluation(L.Callback):
    """Generate images for every prompt type of every (sub)class and measure them, at the epochs adapters are
    saved (and on demand: ``lycoflow evaluate``).

    Per (sub)class and prompt type, over its ``images`` images, the protocol's metrics: image similarity and
    squared centroid distance to the class's dataset images (DINOv2), text–image similarity to the prompt with the
    descriptor replaced by the class's evaluated form (CLIP), Vendi score (DINOv2; pooled or per prompt), and style
    loss against the base model's image of the same prompt and seed (VGG19 Gram matrices; base images generated
    once per run). Written to ``<run>/metrics.csv`` (one row per value, its ``protocol`` column naming the protocol)
    and logged as ``eval/<category>/<prompt_type>/<metric>`` (the mean over the category's classes), a per-class
    table and image grids with their prompts.

    Args:
        every_n_epochs: evaluate after every this many epochs; None follows the ``AdapterExport`` callback's
            schedule (the epochs whose adapter files exist). The last epoch is always evaluated.
        epochs: evaluate after exactly these epochs instead (the paper ranks epochs 10, 30 and 50); the last epoch
            is then evaluated only if listed.
        images: images per (sub)class and prompt type (paper: 100), spread over the type's prompts and seeded as
            the protocol says: the same images are asked for at every epoch and in every run.
        protocol: what is generated and measured how (None: `lycoflow.evaluation.PaperProtocol`, the paper's;
            `lycoflow.evaluation.GenericProtocol` for data sets that are not the paper's).
        sampler: scheduler, steps, guidance, resolution, batch size (default: DDIM, 25 steps, CFG 7, the base's
            own size: 512² for SD 1.5, 1024² for SDXL).
        image_encoder: fidelity and diversity embeddings; None: ``DINOv2()`` (ViT-L/14, as in the paper).
        text_image_encoder: controllability; None: ``OpenCLIP()`` (ViT-L/14 DataComp-XL, as in the paper).
        style_encoder: Gram-matrix features; None: ``VGG19()``.
        config_name: the ``config`` column of metrics.csv; None: a digest of the recipe without its seeds and
            run folder (so the seeds of one configuration share it).
        grid_images: images per class and prompt type in the W&B grids.
        dirpath: where images and metrics.csv go; None: the run folder (``trainer.default_root_dir``).
        base: also evaluate the base model (every adapter at multiplier 0) before the first epoch, as epoch 0: what
            training is measured against. At the end of training a table per evaluated epoch is printed.
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        epochs: list[int] | None = None,
        images: int = 100,
        protocol: Protocol | None = None,
        sampler: Sampler | None = None,
        image_encoder: ImageEmbedder | None = None,
        text_image_encoder: TextImageEmbedder | None = None,
        style_encoder: StyleFeatures | None = None,
        config_name: str | None = None,
        grid_images: int = 8,
        dirpath: str | None = None,
        base: bool = False,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"Evaluation: every_n_epochs={every_n_epochs} must be >= 1 (or null: with AdapterExport)")
        if epochs is not None:
            if every_n_epochs is not None:
                raise ValueError("Evaluation: give every_n_epochs or epochs, not both")
            if not epochs or any(e < 1 for e in epochs):
                raise ValueError(f"Evaluation: epochs={epochs} must list epochs >= 1")
        self.every_n_epochs, self.epochs, self.dirpath, self.base = every_n_epochs, epochs, dirpath, base
        #: Does the work; also what `lycoflow evaluate` takes a recipe's evaluation settings from.
        self.evaluator = Evaluator(images, protocol, sampler, image_encoder, text_image_encoder, style_encoder,
                                   config_name, grid_images)

    def due(self, trainer: L.Trainer, epoch: int) -> bool:
        """Whether completed epoch ``epoch`` (from 1) is evaluated."""
        if self.epochs is not None:
            return epoch in self.epochs
        if trainer.max_epochs is not None and epoch == trainer.max_epochs:
            return True
        every = self.every_n_epochs
        if every is None:
            exports = [c for c in trainer.callbacks if isinstance(c, AdapterExport)]
            every = exports[0].every_n_epochs if exports else None
        return every is not None and epoch % every == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Load (or download) the encoders now: a missing one must stop the run before training, not after an epoch.
        if stage == "fit":
            self.evaluator.encoders(torch.device("cpu"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.base and trainer.global_step == 0:  # not again when a run resumes
            with adapters_off(pl_module.networks.values()):
                self._evaluate(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.due(trainer, epoch):
            self._evaluate(trainer, pl_module, epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = self.folder(trainer) / "metrics.csv"
        if trainer.is_global_zero and table.is_file():
            run = Path(trainer.default_root_dir).resolve().name
            rank_zero_info(f"evaluation of {run} ({table}; mean over classes):\n{summary(table, run)}")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, HierarchicalDataModule):
            raise TypeError("Evaluation needs a lycoflow.data.HierarchicalDataModule (its classes and images)")
        mode = pl_module.training
        pl_module.eval()  # adapter dropouts and DyLoRA's random rank are for training only
        try:
            with trainer.precision_plugin.forward_context():
                result = self.evaluator.evaluate(
                    pl_module.components, list(pl_module.networks.values()), datamodule, self.folder(trainer),
                    epoch=epoch, step=trainer.global_step, run=Path(trainer.default_root_dir).resolve().name,
                    config=self.evaluator.config_of(getattr(pl_module, "recipe", None)),
                    seed=int(getattr(pl_module, "seed", 0)), rank=trainer.global_rank, world=trainer.world_size)
        finally:
            pl_module.train(mode)
        if trainer.is_global_zero:
            result.log(trainer.loggers)

    def folder(self, trainer: L.Trainer) -> Path:
        """Where images and metrics.csv go."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir)
