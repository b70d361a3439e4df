"""Measuring a checkpoint (paper §4.2): generate the suite's images, reduce each to what the metrics need, and
compute the metrics of each (concept, prompt type).

:func:`measure_shard` generates one rank's share of the suite with the adapters on, saves the images, and
reduces each saved image to a :class:`Record` (its DINOv2 embedding, its CLIP image–text cosine, its style loss
against the base model's image of the same prompt and seed); :func:`metric_values` turns all ranks' records into
the values of every metric of :data:`lycoflow.metrics.METRICS`, each computed by its entry of
:data:`COMPUTATIONS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lycoris import Network

from ..metrics import METRICS
from ..metrics.encoders import ImageEmbedder, StyleFeatures, TextImageEmbedder
from ..metrics.functional import (
    gram_distances,
    gram_matrices,
    image_similarity,
    paired_cosines,
    squared_centroid_distance,
    vendi_score,
)
from ..models import Components
from .images import base_image_path, image_path, load_png, save_png
from .prompts import EvalPrompt
from .protocol import Protocol
from .sampling import Sampler, adapters_off, sample


@dataclass
class MetricEncoders:
    """The three encoders the metrics measure with."""

    image: ImageEmbedder  # fidelity, diversity
    text_image: TextImageEmbedder  # controllability
    style: StyleFeatures  # base-model preservation


@dataclass
class Record:
    """What one generated image contributes to the metrics."""

    index: int  # into the suite
    embedding: Tensor  # DINOv2 (fidelity, diversity)
    text_similarity: float  # CLIP image vs its prompt's evaluation text (controllability)
    style_loss: float | None  # vs the base model's image of the same prompt and seed (base-model preservation)


def batches(items: Sequence, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def generate_images(components: Components, prompts: Sequence[EvalPrompt], sampler: Sampler, paths: Sequence[Path],
                    description: str, show: bool) -> float:
    """Generate and save every prompt's image whose file is missing; returns images/s (0 when none)."""
    todo = [(p, path) for p, path in zip(prompts, paths) if not path.is_file()]
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=description, unit="img", disable=not show or not todo,
              dynamic_ncols=True) as bar:
        for chunk in batches(todo, sampler.batch_size):
            images = sample(components, [p.prompt for p, _ in chunk], [p.seed for p, _ in chunk], sampler)
            for image, (_, path) in zip(images, chunk):
                save_png(image, path)
            bar.update(len(chunk))
    return len(todo) / (time.perf_counter() - start) if todo else 0.0


@torch.no_grad()
def measure_shard(components: Components, networks: Sequence[Network], suite: Sequence[EvalPrompt],
                  indices: Sequence[int], sampler: Sampler, encoders: MetricEncoders, folder: Path, base_folder: Path,
                  style_loss_types: Sequence[str], show: bool = True) -> tuple[list[Record], float]:
    """Generate, save and measure the images ``indices`` of ``suite``; returns their records and images/s."""
    mine = [suite[i] for i in indices]
    paths = [image_path(folder, p) for p in mine]
    for path in paths:  # this checkpoint's images are always new: a file left by a crashed attempt is redone
        path.unlink(missing_ok=True)
    rate = generate_images(components, mine, sampler, paths, "generating", show)
    styled = [(p, base_image_path(base_folder, p)) for p in mine if p.prompt_type in style_loss_types]
    if styled:
        with adapters_off(networks):
            generate_images(components, [p for p, _ in styled], sampler, [path for _, path in styled],
                            "base-model images (once per run)", show)
    base_of = dict(styled)
    records = []
    device = next(components.unet.parameters()).device
    with torch.autocast(device.type, enabled=False):  # measured in the encoders' own precision, whatever trains
        for chunk in batches(list(zip(indices, mine, paths)), sampler.batch_size):
            records.extend(_measure(chunk, encoders, base_of, device))
    return records, rate


def _grams(encoder: StyleFeatures, images: Tensor) -> Tensor:
    return gram_matrices(encoder.feature_maps(images))


def _measure(chunk: list[tuple[int, EvalPrompt, Path]], encoders: MetricEncoders, base_of: dict[EvalPrompt, Path],
             device: torch.device) -> list[Record]:
    """One batch of saved images → their records."""
    images = torch.stack([load_png(path) for _, _, path in chunk]).to(device)
    embeddings = encoders.image.embed_images(images).float().cpu()
    image_clip = encoders.text_image.embed_images(images).float()
    text_clip = encoders.text_image.embed_texts([p.text for _, p, _ in chunk]).float()
    similarity = paired_cosines(image_clip, text_clip).cpu()
    style: list[float | None] = [None] * len(chunk)
    wanted = [k for k, (_, p, _) in enumerate(chunk) if p in base_of]
    if wanted:
        base = torch.stack([load_png(base_of[chunk[k][1]]) for k in wanted]).to(device)
        for k, value in zip(wanted, gram_distances(_grams(encoders.style, images[wanted]),
                                                   _grams(encoders.style, base)).cpu().tolist()):
            style[k] = value
    return [Record(index, embeddings[k], float(similarity[k]), style[k]) for k, (index, _, _) in enumerate(chunk)]


@torch.no_grad()
def reference_embeddings(encoder: ImageEmbedder, images: Callable[[int], Tensor], count: int, batch_size: int,
                         device: torch.device) -> Tensor:
    """The embeddings of ``count`` dataset images (``images(i)``: [3, h, w] in [0, 1])."""
    out = []
    with torch.autocast(device.type, enabled=False):  # as the generated images are measured
        for start in range(0, count, batch_size):
            batch = torch.stack([images(i) for i in range(start, min(count, start + batch_size))]).to(device)
            out.append(encoder.embed_images(batch).float().cpu())
    return torch.cat(out)


@dataclass
class ConceptImages:
    """The measured images of one (concept, prompt type), in suite order, its dataset images' embeddings, and
    whether its diversity is scored per prompt (else over all its images at once)."""

    prompts: list[EvalPrompt]
    records: list[Record]
    reference: Tensor
    vendi_per_prompt: bool = True

    @cached_property
    def embeddings(self) -> Tensor:
        return torch.stack([r.embedding for r in self.records])


def _vendi(group: ConceptImages) -> float:
    """Diversity of the images of each prompt, averaged over the prompts; or of all the images, pooled."""
    if not group.vendi_per_prompt:
        return float(vendi_score(group.embeddings))
    ids = torch.tensor([p.prompt_id for p in group.prompts])
    return float(np.mean([float(vendi_score(group.embeddings[ids == i])) for i in ids.unique().tolist()]))


def _style_loss(group: ConceptImages) -> float | None:
    losses = [r.style_loss for r in group.records if r.style_loss is not None]
    return float(np.mean(losses)) if losses else None


#: How each metric of `lycoflow.metrics.METRICS` (by name) is computed from one (concept, prompt type)'s images;
#: None where it does not apply (no style loss for prompt types without base images).
COMPUTATIONS: dict[str, Callable[[ConceptImages], float | None]] = {
    "image_similarity": lambda group: float(image_similarity(group.embeddings, group.reference)),
    "squared_centroid_distance": lambda group: float(squared_centroid_distance(group.embeddings, group.reference)),
    "text_image_similarity": lambda group: float(np.mean([r.text_similarity for r in group.records])),
    "vendi_score": _vendi,
    "style_loss": _style_loss,
}


@dataclass
class ConceptValues:
    """The metric values of one (concept, prompt type)."""

    prompt: EvalPrompt  # its first prompt: which concept and prompt type
    values: dict[str, float]  # metric name → value, in the order of `lycoflow.metrics.METRICS`


def metric_values(suite: Sequence[EvalPrompt], records: Iterable[Record], references: dict[str, Tensor],
                  protocol: Protocol) -> list[ConceptValues]:
    """The protocol's metrics of every (concept, prompt type) over its images (``references``: dataset embeddings
    by concept key), in the order of the suite."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in sorted(records, key=lambda r: r.index):
        prompt = suite[record.index]
        groups.setdefault((prompt.key, prompt.prompt_type), []).append(record)
    out = []
    for (key, prompt_type), group in groups.items():
        images = ConceptImages([suite[r.index] for r in group], group, references[key],
                               prompt_type in protocol.vendi_per_prompt)
        values = {spec.name: COMPUTATIONS[spec.name](images) for spec in METRICS
                  if protocol.measures(prompt_type, spec.name)}
        out.append(ConceptValues(images.prompts[0], {name: v for name, v in values.items() if v is not None}))
    return out
