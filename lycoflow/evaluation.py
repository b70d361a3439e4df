"""The evaluation of a checkpoint (paper §4–§5.2, DESIGN §6): generate the prompt suite, measure, tabulate.

:func:`measure_shard` generates one rank's share of the suite with the adapters on, saves the images, and
reduces each image to what the metrics need (its DINOv2 embedding, its CLIP image–text cosine, its style loss
against the base model's image of the same prompt and seed); :func:`metric_rows` turns all ranks' records
into the metrics table. Images are measured as saved (8-bit), so re-measuring the files gives the same values.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from lycoris import Network

from .cache import atomic_path
from .generation import Parts, Sampler, generate
from .metrics import functional as F
from .metrics.encoders import ImageEmbedder, StyleFeatures, TextImageEmbedder
from .prompts import EvalPrompt

METRICS = ("image_similarity", "squared_centroid_distance", "text_image_similarity", "vendi_score", "style_loss")
COLUMNS = ("run", "config", "seed", "epoch", "step", "category", "class", "subclass", "prompt_type", "metric",
           "value")


@dataclass
class Record:
    """What one generated image contributes to the metrics."""

    index: int  # into the suite
    embedding: Tensor  # DINOv2 (fidelity, diversity)
    text_similarity: float  # CLIP image vs its prompt's evaluation text (controllability)
    style_loss: float | None  # vs the base model's image of the same prompt and seed (base-model preservation)


@dataclass
class Encoders:
    image: ImageEmbedder
    text_image: TextImageEmbedder
    style: StyleFeatures


def quantize(images: Tensor) -> Tensor:
    """[0, 1] floats → what an 8-bit PNG holds, back as floats."""
    return (images * 255).round() / 255


def to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def load_png(path: Path) -> Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_png(image: Tensor, path: Path) -> None:
    """Atomically: a crash never leaves a truncated image that a later run would take for a finished one."""
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def image_path(folder: Path, prompt: EvalPrompt) -> Path:
    """``folder/<prompt type>/<category>/<class>[/<subclass>]/<index>.png``."""
    return folder / prompt.prompt_type / prompt.key / f"{prompt.index:04d}.png"


def base_image_path(folder: Path, prompt: EvalPrompt) -> Path:
    """The base model's image, named by its prompt and seed too: a changed suite never reuses a stale file."""
    tag = hashlib.sha256(f"{prompt.prompt}\n{prompt.seed}".encode()).hexdigest()[:12]
    return folder / prompt.prompt_type / prompt.key / f"{prompt.index:04d}-{tag}.png"


def sampler_folder(sampler: Sampler, base_model: str) -> str:
    """Base images depend on the base model (a digest of its weights) and the sampler's settings: one folder per
    pair, so a reused run folder never takes another model's images for this one's."""
    return hashlib.sha256(json.dumps([base_model, sampler.describe()], sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def adapters_off(networks: Iterable[Network]):
    """The base model: every network at multiplier 0, restored after."""
    networks = list(networks)
    saved = [net.multiplier for net in networks]
    try:
        for net in networks:
            net.multiplier = 0.0
        yield
    finally:
        for net, value in zip(networks, saved):
            net.multiplier = value


def batches(items: Sequence[EvalPrompt], size: int) -> Iterable[list[EvalPrompt]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def generate_images(parts: Parts, prompts: Sequence[EvalPrompt], sampler: Sampler, paths: Sequence[Path],
                    description: str, show: bool) -> float:
    """Generate and save every prompt's image whose file is missing; returns images/s (0 when none)."""
    todo = [(p, path) for p, path in zip(prompts, paths) if not path.is_file()]
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=description, unit="img", disable=not show or not todo,
              dynamic_ncols=True) as bar:
        for i in range(0, len(todo), sampler.batch_size):
            chunk = todo[i:i + sampler.batch_size]
            images = generate(parts, [p.prompt for p, _ in chunk], [p.seed for p, _ in chunk], sampler)
            for image, (_, path) in zip(images, chunk):
                save_png(image, path)
            bar.update(len(chunk))
    return len(todo) / (time.perf_counter() - start) if todo else 0.0


def gram_matrices(encoder: StyleFeatures, images: Tensor) -> Tensor:
    return F.gram_matrices(encoder.feature_maps(images))


@torch.no_grad()
def measure_shard(parts: Parts, networks: Sequence[Network], suite: Sequence[EvalPrompt], indices: Sequence[int],
                  sampler: Sampler, encoders: Encoders, folder: Path, base_folder: Path,
                  style_loss_types: Sequence[str], show: bool = True) -> tuple[list[Record], float]:
    """Generate, save and measure the images ``indices`` of ``suite``; returns their records and images/s."""
    mine = [suite[i] for i in indices]
    paths = [image_path(folder, p) for p in mine]
    for path in paths:  # this checkpoint's images are always new: a file left by a crashed attempt is redone
        path.unlink(missing_ok=True)
    rate = generate_images(parts, mine, sampler, paths, "generating", show)
    styled = [(p, base_image_path(base_folder, p)) for p in mine if p.prompt_type in style_loss_types]
    if styled:
        with adapters_off(networks):
            generate_images(parts, [p for p, _ in styled], sampler, [path for _, path in styled],
                            "base-model images (once per run)", show)
    base_of = dict(styled)
    records = []
    device = next(parts.unet.parameters()).device
    with torch.autocast(device.type, enabled=False):  # measured in the encoders' own precision, whatever trains
        for chunk in batches(list(zip(indices, mine, paths)), sampler.batch_size):
            records.extend(_measure(chunk, encoders, base_of, device))
    return records, rate


def _measure(chunk: list[tuple[int, EvalPrompt, Path]], encoders: Encoders, base_of: dict[EvalPrompt, Path],
             device: torch.device) -> list[Record]:
    """One batch of saved images → their records."""
    images = torch.stack([load_png(path) for _, _, path in chunk]).to(device)
    embeddings = encoders.image.embed_images(images).float().cpu()
    image_clip = encoders.text_image.embed_images(images).float()
    text_clip = encoders.text_image.embed_texts([p.text for _, p, _ in chunk]).float()
    similarity = F.paired_cosines(image_clip, text_clip).cpu()
    style: list[float | None] = [None] * len(chunk)
    wanted = [k for k, (_, p, _) in enumerate(chunk) if p in base_of]
    if wanted:
        base = torch.stack([load_png(base_of[chunk[k][1]]) for k in wanted]).to(device)
        ours = gram_matrices(encoders.style, images[wanted])
        theirs = gram_matrices(encoders.style, base)
        for k, value in zip(wanted, F.gram_distances(ours, theirs).cpu().tolist()):
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


def metric_rows(suite: Sequence[EvalPrompt], records: Iterable[Record], references: dict[str, Tensor],
                context: dict[str, object]) -> list[dict[str, object]]:
    """One row per (concept, prompt type, metric): the values of DESIGN §6 over the concept's images."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in sorted(records, key=lambda r: r.index):
        prompt = suite[record.index]
        groups.setdefault((prompt.key, prompt.prompt_type), []).append(record)
    rows = []
    for (key, prompt_type), group in groups.items():
        first = suite[group[0].index]
        generated = torch.stack([r.embedding for r in group])
        values = {
            "image_similarity": F.image_similarity(generated, references[key]),
            "squared_centroid_distance": F.squared_centroid_distance(generated, references[key]),
            "text_image_similarity": float(np.mean([r.text_similarity for r in group])),
            "vendi_score": _vendi_per_prompt(generated, [suite[r.index].prompt_id for r in group]),
        }
        losses = [r.style_loss for r in group if r.style_loss is not None]
        if losses:
            values["style_loss"] = float(np.mean(losses))
        for metric, value in values.items():
            rows.append({**context, "category": first.category, "class": first.class_name,
                         "subclass": first.subclass, "prompt_type": prompt_type, "metric": metric,
                         "value": float(value)})
    return rows


def _vendi_per_prompt(embeddings: Tensor, prompt_ids: Sequence[int]) -> float:
    """Diversity of the images of each prompt, averaged over the prompts."""
    ids = torch.tensor(prompt_ids)
    return float(np.mean([float(F.vendi_score(embeddings[ids == i])) for i in ids.unique().tolist()]))


def write_metrics(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Add ``rows`` to the CSV table at ``path``, replacing earlier rows of the same run and epoch (a resumed
    run re-evaluating an epoch), atomically."""
    kept: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            done = {(str(r["run"]), str(r["epoch"])) for r in rows}
            kept = [r for r in csv.DictReader(f) if (r["run"], r["epoch"]) not in done]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows(rows)
