"""`Evaluator`: the evaluation of one checkpoint (paper §4–§5.2), with no Trainer in sight — generate the prompt
suite with the adapters on (each rank its share), measure it, write ``metrics.csv``; and `EvaluationResult`,
what it gives and how it is logged. The `callbacks.Evaluation` callback runs it at saved epochs, ``lycoflow
evaluate`` on an adapter file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lycoris import Network

from ..data import HierarchicalDataModule, letterbox, load_rgb, square_crop, to_tensor
from ..data.encodings import module_digest
from ..metrics.encoders import ImageEmbedder, StyleFeatures, TextImageEmbedder
from ..models import Components
from .images import image_path, sampler_folder
from .measuring import MetricEncoders, Record, measure_shard, metric_values, reference_embeddings
from .prompts import EvalPrompt
from .protocol import PaperProtocol, Protocol
from .sampling import Sampler
from .table import config_id, table_rows, write_metrics

#: The columns of the per-class W&B table.
_TABLE_COLUMNS = ["epoch", "category", "class", "subclass", "prompt_type", "metric", "value"]


@dataclass
class EvaluationResult:
    """One checkpoint's evaluation. On other ranks than 0 ``rows`` and ``grids`` are empty."""

    epoch: int
    step: int
    rows: list[dict[str, object]]  # what was written to metrics.csv (`lycoflow.metrics.COLUMNS`)
    grids: dict[tuple[str, str], list[tuple[Path, str]]]  # (class key, prompt type) → its first images, prompts
    images_per_s: float  # of generation, all ranks together

    def scalars(self) -> dict[str, float]:
        """``eval/<category>/<prompt type>/<metric>``: the mean over the category's classes; and the images/s."""
        by_group: dict[str, list[float]] = {}
        for row in self.rows:
            by_group.setdefault(f"eval/{row['category'] or row['class']}/{row['prompt_type']}/{row['metric']}",
                                []).append(float(row["value"]))
        scalars = {key: sum(values) / len(values) for key, values in by_group.items()}
        scalars["eval/images_per_s"] = self.images_per_s
        return scalars

    def log(self, loggers: Iterable[Logger]) -> None:
        """The scalars to every logger; to W&B also the per-class table and the image grids with their prompts."""
        scalars = self.scalars()
        for logger in loggers:
            logger.log_metrics(scalars, step=self.step)
            if isinstance(logger, WandbLogger):
                logger.log_table("eval/classes", columns=_TABLE_COLUMNS,
                                 data=[[r[c] for c in _TABLE_COLUMNS] for r in self.rows], step=self.step)
                for (key, prompt_type), grid in self.grids.items():
                    logger.log_image(f"eval/images/{key}/{prompt_type}", [str(p) for p, _ in grid], step=self.step,
                                     caption=[prompt for _, prompt in grid])


class Evaluator:
    """Generates the prompt suite of every (sub)class with a model's adapters and measures it: fidelity,
    controllability, diversity and base-model preservation, per (sub)class and prompt type.

    Args:
        images: images per (sub)class and prompt type (paper: 100), spread over the type's prompts and seeded as
            the protocol says.
        protocol: prompts, allocation, seeds, reference fitting, diversity pooling and which metric is measured
            on which prompt type (None: `PaperProtocol`; `GenericProtocol` for data sets that are not the paper's).
        sampler: how images are generated (None: DDIM, 25 steps, CFG 7, the base's own size: 512² for SD 1.5).
        image_encoder: fidelity and diversity embeddings (None: ``DINOv2()``).
        text_image_encoder: controllability (None: ``OpenCLIP()``, the paper's DataComp ViT-L/14).
        style_encoder: Gram-matrix features (None: ``VGG19()``).
        config_name: the ``config`` column of metrics.csv (None: `config_id` of the recipe).
        grid_images: images per class and prompt type in the logged grids.
    """

    def __init__(
        self,
        images: int = 100,
        protocol: Protocol | None = None,
        sampler: Sampler | None = None,
        image_encoder: ImageEmbedder | None = None,
        text_image_encoder: TextImageEmbedder | None = None,
        style_encoder: StyleFeatures | None = None,
        config_name: str | None = None,
        grid_images: int = 8,
    ) -> None:
        if images < 1:
            raise ValueError(f"Evaluation: images={images} must be >= 1")
        self.images = images
        self.protocol = protocol or PaperProtocol()
        self.sampler = sampler or Sampler()
        self._encoders = (image_encoder, text_image_encoder, style_encoder)
        self.config_name, self.grid_images = config_name, grid_images
        self._references: dict[str, Tensor] | None = None  # dataset embeddings per class, once per run
        self._announced = False  # which encoders run is said once per run
        self._base_model: str | None = None  # digest of the frozen base model, once per run

    def config_of(self, recipe: str | None) -> str:
        """The ``config`` column: ``config_name``, else the digest of the resolved recipe (`config_id`)."""
        return self.config_name or config_id(recipe)

    def encoders(self, device: torch.device) -> MetricEncoders:
        """The encoders on ``device``; the paper's defaults are built (and downloaded once) on first use."""
        from ..metrics.encoders import VGG19, DINOv2, OpenCLIP

        image, text_image, style = self._encoders
        if not self._announced:
            self._encoders = (image or DINOv2(), text_image or OpenCLIP(), style or VGG19())
            self._announced = True
            rank_zero_info(f"evaluation encoders: {', '.join(e.name for e in self._encoders)}")
            toy = [e.name for e in self._encoders if e.name.startswith("toy-world")]
            if toy:
                rank_zero_info(f"{', '.join(toy)}: trained on lycoflow's toy world (lycoflow.metrics.toy), they "
                               "measure images of that world only")
            untrained = [e.name for e in self._encoders if not e.pretrained]
            if untrained:
                rank_zero_warn(f"evaluation encoders with random weights: {', '.join(untrained)}; their metrics "
                               "test the machinery, not image quality")
        for encoder in self._encoders:
            if isinstance(encoder, torch.nn.Module):
                encoder.to(device)
        return MetricEncoders(*self._encoders)

    def suite(self, datamodule: HierarchicalDataModule) -> list[EvalPrompt]:
        captions = [[s.tags for s in datamodule.samples if s.concept == c] for c in range(len(datamodule.concepts))]
        return self.protocol.suite(datamodule.concepts, captions, self.images, datamodule.keep_tokens)

    def references(self, datamodule: HierarchicalDataModule, encoder: ImageEmbedder, device: torch.device,
                   side: int) -> dict[str, Tensor]:
        """The class's dataset images embedded, per class key, whatever bucket the image trains in: letterboxed
        into the encoder's square (its ``image_size``, else ``side``: the generated images'), or centre-cropped
        to ``side`` like the generated images, as the protocol says."""
        if self.protocol.references == "letterbox":
            size = int(getattr(encoder, "image_size", None) or side)
            fit = letterbox
        else:
            size, fit = side, square_crop
        out = {}
        for c, concept in enumerate(datamodule.concepts):
            paths = [s.path for s in datamodule.samples if s.concept == c]
            out[concept.key] = reference_embeddings(
                encoder, lambda j, paths=paths: (to_tensor(fit(load_rgb(paths[j]), size)) + 1) / 2,
                len(paths), self.sampler.batch_size, device)
        return out

    @contextmanager
    def _encoders_on(self, device: torch.device) -> Iterator[MetricEncoders]:
        """The encoders on ``device``, back on the CPU after: training gets their memory back (3.4 GB for the
        paper's three)."""
        try:
            yield self.encoders(device)
        finally:
            for encoder in self._encoders:
                if isinstance(encoder, torch.nn.Module):
                    encoder.to("cpu")

    def evaluate(self, components: Components, networks: Sequence[Network], datamodule: HierarchicalDataModule,
                 folder: Path, epoch: int, step: int, run: str, config: str, seed: int, rank: int = 0,
                 world: int = 1) -> EvaluationResult:
        """Generate, save and measure this checkpoint's suite (this rank's share) into ``folder/eval``; on rank 0
        also add its rows to ``folder/metrics.csv`` (``run``, ``config``, ``seed``, ``epoch``, ``step``: their
        columns)."""
        device = next(components.unet.parameters()).device
        with self._encoders_on(device) as encoders:
            suite = self.suite(datamodule)
            epoch_folder = folder / "eval" / f"epoch={epoch}"
            if self._base_model is None:  # base images belong to this base model (weights and dtype) and sampler
                # (SD 1.x: the digest as before SDXL, so existing base images stay found)
                second = [module_digest(components.text_encoder_2)] if components.is_sdxl else []
                self._base_model = module_digest(components.unet, module_digest(components.text_encoder),
                                                 module_digest(components.vae), *second)
            base_folder = folder / "eval" / "base" / sampler_folder(self.sampler, self._base_model, components)
            rank_zero_info(f"evaluation at epoch {epoch} ({self.protocol.name} protocol): {len(suite)} images "
                           f"({len(self.protocol.prompt_types)} prompt types × {len(datamodule.concepts)} classes × "
                           f"{self.images}) into {epoch_folder}")
            records, rate = measure_shard(components, networks, suite, range(rank, len(suite), world),
                                          self.sampler, encoders, epoch_folder, base_folder,
                                          self.protocol.style_loss_prompt_types, show=rank == 0)
            everything = gather(records, world)
            if rank != 0:
                return EvaluationResult(epoch, step, [], {}, rate * world)
            if self._references is None:
                self._references = self.references(datamodule, encoders.image, device,
                                                   self.sampler.side(components))
            rows = table_rows(metric_values(suite, everything, self._references, self.protocol), run, config,
                              self.protocol.name, seed, epoch, step)
            write_metrics(folder / "metrics.csv", rows)
            rank_zero_info(f"evaluation at epoch {epoch}: {rate * world:.2f} images/s generated; "
                           f"{len(rows)} values in {folder / 'metrics.csv'}")
            return EvaluationResult(epoch, step, rows, self._grids(suite, epoch_folder), rate * world)

    def _grids(self, suite: Sequence[EvalPrompt], folder: Path) -> dict[tuple[str, str], list[tuple[Path, str]]]:
        """The first ``grid_images`` images of each (class, prompt type), with their prompts."""
        grids: dict[tuple[str, str], list[tuple[Path, str]]] = {}
        for prompt in suite:
            grid = grids.setdefault((prompt.key, prompt.prompt_type), [])
            if len(grid) < self.grid_images:
                grid.append((image_path(folder, prompt), prompt.prompt))
        return grids


def gather(records: list[Record], world: int) -> list[Record]:
    """Every rank's records, on every rank (DDP); the records themselves when alone."""
    if world == 1 or not dist.is_available() or not dist.is_initialized():
        return records
    out: list[list[Record] | None] = [None] * world
    dist.all_gather_object(out, records)
    return [r for part in out for r in (part or [])]
