"""`Evaluation`: at the saved epochs, generate the prompt suite and measure fidelity, controllability, diversity
and base-model preservation (paper §4–§5.2, DESIGN §6); log them to W&B and to ``metrics.csv``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lycoflow.data import HierarchicalDataModule, load_rgb, square_crop, to_tensor
from lycoflow.encodings import module_digest
from lycoflow.evaluation import (
    Encoders,
    Record,
    image_path,
    measure_shard,
    metric_rows,
    reference_embeddings,
    sampler_folder,
    write_metrics,
)
from lycoflow.generation import Parts, Sampler
from lycoflow.metrics.encoders import ImageEmbedder, StyleFeatures, TextImageEmbedder
from lycoflow.prompts import ALTER_TEMPLATES, STYLE_TEMPLATES, EvalPrompt, PromptType, build_suite

from .saving import AdapterExport

# Recipe keys that differ between the seeds of one configuration (left out of its config id).
_SEED_KEYS = (("model", "seed"), ("data", "init_args", "seed"), ("trainer", "default_root_dir"))


class Evaluation(L.Callback):
    """Generate images for every prompt type of every (sub)class and measure them, at the epochs adapters are
    saved (and on demand: ``lycoflow evaluate``).

    Per (sub)class and prompt type, over its ``images`` images: image similarity and squared centroid distance
    to the class's dataset images (DINOv2), text–image similarity to the prompt with the trigger replaced by the
    class's evaluation text (CLIP), Vendi score per prompt averaged (DINOv2), and style loss against the base
    model's image of the same prompt and seed (VGG19 Gram matrices; base images generated once per run).
    Written to ``<run>/metrics.csv`` (one row per value) and logged as ``eval/<category>/<prompt_type>/<metric>``
    (the mean over the category's classes), a per-class table and image grids with their prompts.

    Args:
        every_n_epochs: evaluate after every this many epochs; None follows the ``AdapterExport`` callback's
            schedule (the epochs whose adapter files exist). The last epoch is always evaluated.
        images: images per (sub)class and prompt type (paper: 100), each with a seed fixed by (seed, class, type,
            index): the same images are asked for at every epoch and in every run.
        prompt_types: which of train, trigger, alter, style, agnostic (the paper: the first four).
        sampler: scheduler, steps, guidance, resolution, batch size (default: DDIM, 25 steps, CFG 7, 512²).
        alter_templates: content-alteration templates (``{}`` = trigger + class word); None: the ten shipped
            ones. The manifest's ``prompts`` of a class are added to its alter prompts.
        style_templates: style templates; None: the paper's five.
        style_loss_prompt_types: prompt types whose images get a style loss against base-model images (the
            paper: style).
        image_encoder: fidelity and diversity embeddings; None: ``DINOv2()`` (ViT-L/14, as in the paper).
        text_image_encoder: controllability; None: ``CLIP()`` (ViT-L/14).
        style_encoder: Gram-matrix features; None: ``VGG19()``.
        seed: seed of the evaluation images (the same across runs, so runs are comparable).
        config_name: the ``config`` column of metrics.csv; None: a digest of the recipe without its seeds and
            run folder (so the seeds of one configuration share it).
        grid_images: images per class and prompt type in the W&B grids.
        dirpath: where images and metrics.csv go; None: the run folder (``trainer.default_root_dir``).
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        images: int = 100,
        prompt_types: list[PromptType] | None = None,
        sampler: Sampler | None = None,
        alter_templates: list[str] | None = None,
        style_templates: list[str] | None = None,
        style_loss_prompt_types: list[PromptType] | None = None,
        image_encoder: ImageEmbedder | None = None,
        text_image_encoder: TextImageEmbedder | None = None,
        style_encoder: StyleFeatures | None = None,
        seed: int = 0,
        config_name: str | None = None,
        grid_images: int = 8,
        dirpath: str | None = None,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"Evaluation: every_n_epochs={every_n_epochs} must be >= 1 (or null: with AdapterExport)")
        if images < 1:
            raise ValueError(f"Evaluation: images={images} must be >= 1")
        self.every_n_epochs, self.images = every_n_epochs, images
        self.prompt_types = list(prompt_types or ["train", "trigger", "alter", "style"])
        self.sampler = sampler or Sampler()
        self.alter_templates = list(ALTER_TEMPLATES if alter_templates is None else alter_templates)
        self.style_templates = list(STYLE_TEMPLATES if style_templates is None else style_templates)
        self.style_loss_prompt_types = list(style_loss_prompt_types or ["style"])
        self._encoders = (image_encoder, text_image_encoder, style_encoder)
        self.seed, self.config_name, self.grid_images, self.dirpath = seed, config_name, grid_images, dirpath
        self._references: dict[str, torch.Tensor] | None = None  # dataset embeddings per class, once per run
        self._announced = False  # which encoders run is said once per run
        self._base_model: str | None = None  # digest of the frozen base model, once per run

    # -- when ---------------------------------------------------------------------------------------------------
    def due(self, trainer: L.Trainer, epoch: int) -> bool:
        """Whether completed epoch ``epoch`` (from 1) is evaluated."""
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
            self.encoders(torch.device("cpu"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not self.due(trainer, epoch):
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, HierarchicalDataModule):
            raise TypeError("Evaluation needs a lycoflow.data.HierarchicalDataModule (its classes and images)")
        mode = pl_module.training
        pl_module.eval()  # adapter dropouts and DyLoRA's random rank are for training only
        try:
            with trainer.precision_plugin.forward_context():
                rows, images = self.evaluate(
                    parts_of(pl_module), list(pl_module.networks.values()), datamodule, self.folder(trainer),
                    epoch=epoch, step=trainer.global_step, run=Path(trainer.default_root_dir).resolve().name,
                    config=self.config_name or config_id(getattr(pl_module, "recipe", None)),
                    seed=int(getattr(pl_module, "seed", 0)), rank=trainer.global_rank, world=trainer.world_size)
        finally:
            pl_module.train(mode)
            for encoder in self._encoders:  # give their memory back to training (3.4 GB for the paper's three)
                if isinstance(encoder, torch.nn.Module):
                    encoder.to("cpu")
        if trainer.is_global_zero:
            self.log_results(trainer, rows, images)

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir)

    # -- what ---------------------------------------------------------------------------------------------------
    def encoders(self, device: torch.device) -> Encoders:
        """The encoders on ``device``; the paper's defaults are built (and downloaded once) on first use."""
        from lycoflow.metrics.encoders import CLIP, VGG19, DINOv2

        image, text_image, style = self._encoders
        if not self._announced:
            self._encoders = (image or DINOv2(), text_image or CLIP(), style or VGG19())
            self._announced = True
            rank_zero_info(f"evaluation encoders: {', '.join(e.name for e in self._encoders)}")
            untrained = [e.name for e in self._encoders if not e.pretrained]
            if untrained:
                rank_zero_warn(f"evaluation encoders with random weights: {', '.join(untrained)}; their metrics "
                               "test the machinery, not image quality")
        for encoder in self._encoders:
            if isinstance(encoder, torch.nn.Module):
                encoder.to(device)
        return Encoders(*self._encoders)

    def suite(self, datamodule: HierarchicalDataModule) -> list[EvalPrompt]:
        captions = [[s.tags for s in datamodule.samples if s.concept == c] for c in range(len(datamodule.concepts))]
        return build_suite(datamodule.concepts, captions, self.prompt_types, self.images, self.seed,
                           datamodule.keep_tokens, self.alter_templates, self.style_templates)

    def evaluate(self, parts: Parts, networks: Sequence[Any], datamodule: HierarchicalDataModule, folder: Path,
                 epoch: int, step: int, run: str, config: str, seed: int, rank: int = 0, world: int = 1
                 ) -> tuple[list[dict[str, object]], dict[str, Any]]:
        """Generate, save and measure this checkpoint's suite (this rank's share); on rank 0 write metrics.csv and
        return its rows and the image paths per (class, prompt type); other ranks return nothing."""
        device = next(parts.unet.parameters()).device
        encoders = self.encoders(device)
        suite = self.suite(datamodule)
        epoch_folder = folder / "eval" / f"epoch={epoch}"
        if self._base_model is None:  # base images belong to this base model (weights and dtype) and sampler
            self._base_model = module_digest(parts.unet, module_digest(parts.text_encoder), module_digest(parts.vae))
        base_folder = folder / "eval" / "base" / sampler_folder(self.sampler, self._base_model)
        rank_zero_info(f"evaluation at epoch {epoch}: {len(suite)} images ({len(self.prompt_types)} prompt types × "
                       f"{len(datamodule.concepts)} classes × {self.images}) into {epoch_folder}")
        records, rate = measure_shard(parts, networks, suite, range(rank, len(suite), world), self.sampler,
                                      encoders, epoch_folder, base_folder, self.style_loss_prompt_types,
                                      show=rank == 0)
        everything = gather(records, world)
        if rank != 0:
            return [], {}
        if self._references is None:
            self._references = self.references(datamodule, encoders.image, device)
        context = {"run": run, "config": config, "seed": seed, "epoch": epoch, "step": step}
        rows = metric_rows(suite, everything, self._references, context)
        write_metrics(folder / "metrics.csv", rows)
        grids: dict[tuple[str, str], list[tuple[Path, str]]] = {}
        for prompt in suite:
            grid = grids.setdefault((prompt.key, prompt.prompt_type), [])
            if len(grid) < self.grid_images:
                grid.append((image_path(epoch_folder, prompt), prompt.prompt))
        rank_zero_info(f"evaluation at epoch {epoch}: {rate * world:.2f} images/s generated; "
                       f"{len(rows)} values in {folder / 'metrics.csv'}")
        return rows, {"grids": grids, "images_per_s": rate * world, "step": step}

    def references(self, datamodule: HierarchicalDataModule, encoder: ImageEmbedder, device: torch.device
                   ) -> dict[str, torch.Tensor]:
        """The class's dataset images embedded, per class key: square centre crops at the sampler's resolution,
        like the generated images (whatever bucket the image trains in)."""
        size = self.sampler.resolution
        out = {}
        for c, concept in enumerate(datamodule.concepts):
            paths = [s.path for s in datamodule.samples if s.concept == c]
            out[concept.key] = reference_embeddings(
                encoder, lambda j, paths=paths: (to_tensor(square_crop(load_rgb(paths[j]), size)) + 1) / 2,
                len(paths), self.sampler.batch_size, device)
        return out

    # -- where it goes ------------------------------------------------------------------------------------------
    def log_results(self, trainer: L.Trainer, rows: list[dict[str, object]], images: dict[str, Any]) -> None:
        step = images["step"]
        by_group: dict[str, list[float]] = {}
        for row in rows:
            by_group.setdefault(f"eval/{row['category'] or row['class']}/{row['prompt_type']}/{row['metric']}",
                                []).append(float(row["value"]))
        scalars = {key: sum(values) / len(values) for key, values in by_group.items()}
        scalars["eval/images_per_s"] = images["images_per_s"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, LightningWandbLogger):
                columns = ["epoch", "category", "class", "subclass", "prompt_type", "metric", "value"]
                logger.log_table("eval/classes", columns=columns, data=[[r[c] for c in columns] for r in rows],
                                 step=step)
                for (key, prompt_type), grid in images["grids"].items():
                    logger.log_image(f"eval/images/{key}/{prompt_type}", [str(p) for p, _ in grid], step=step,
                                     caption=[prompt for _, prompt in grid])


def parts_of(module: Any) -> Parts:
    """The sampling parts of a `DiffusionFinetune` (its adapters are attached to them), sampled with the
    prediction type it trains (``model.prediction_type`` may override the base model's)."""
    schedule = {**module.noise_scheduler.config, "prediction_type": module.prediction_type}
    return Parts(module.unet, module.vae, module.text_encoder, module.tokenizer, schedule)


def gather(records: list[Record], world: int) -> list[Record]:
    """Every rank's records, on every rank (DDP); the records themselves when alone."""
    if world == 1 or not dist.is_available() or not dist.is_initialized():
        return records
    out: list[list[Record] | None] = [None] * world
    dist.all_gather_object(out, records)
    return [r for part in out for r in (part or [])]


def config_id(recipe: str | None) -> str:
    """A short digest of the resolved recipe without its seeds and run folder: one id per configuration."""
    if not recipe:
        return "unnamed"
    # Only what is built counts: fit's own options (ckpt_path on a resume, ...) do not change the configuration.
    config = {k: v for k, v in (yaml.safe_load(recipe) or {}).items() if k in ("model", "data", "trainer")}
    for path in _SEED_KEYS:
        node = config
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
