"""Evaluation cost: generation images/s, metric throughput, and the share of a checkpoint's evaluation spent outside
generation.

- ``checkpoint``: ``Evaluator.evaluate`` as the Evaluation callback runs it at a saved epoch, on the quickstart's
  tiny model (LoKr attached) and data set (7 classes), with the tiny untrained encoders: ``--images`` per class
  and prompt type (train, trigger, alter, style), ``--steps`` DDIM steps with CFG 7 at ``--resolution``, batches
  of ``--batch-size``. Timed: the whole call, and inside it the generation (the sampling loop and writing the
  PNGs, for the checkpoint's images and the base model's style-prompt images). Printed: images/s of generation,
  and **outside generation / total**: what the encoders, the dataset embeddings (first evaluation of a run
  only), the metrics, metrics.csv and the file reads cost on top. Two evaluations run: the first (a run's
  first: base images and dataset embeddings are made) and the second (every later epoch); both are printed.
- ``metrics``: the functional metrics on random embeddings of DINOv2-L's width (1024) and VGG19's Gram size:
  values per second for the sizes one (class, prompt type) of the paper has (100 generated images, 100 dataset
  images, 10 prompts).

    python benchmarks/eval.py [--images N] [--steps N] [--resolution R] [--batch-size B] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lycoris
from lycoflow.data import SyntheticConcepts
from lycoflow.evaluation import Evaluator, measuring
from lycoflow.evaluation.sampling import Sampler
from lycoflow.metrics.encoders import TinyCLIP, TinyDINOv2, TinyVGG19
from lycoflow.metrics.functional import (
    image_similarity,
    squared_centroid_distance,
    style_loss,
    text_image_similarity,
    vendi_score,
)
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD


class GenerationTimer:
    """Wraps ``lycoflow.evaluation.measuring.generate_images`` (what ``measure_shard`` calls) and adds up its
    time."""

    def __init__(self) -> None:
        self.seconds, self.images = 0.0, 0
        self.original = measuring.generate_images

    def __call__(self, parts: Any, prompts: Any, sampler: Any, paths: Any, *args: Any) -> float:
        start = time.perf_counter()
        todo = sum(1 for path in paths if not Path(path).is_file())
        rate = self.original(parts, prompts, sampler, paths, *args)
        self.seconds += time.perf_counter() - start
        self.images += todo
        return rate


def measure_checkpoint(images: int, steps: int, resolution: int, batch_size: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    model = DiffusionFinetune(TinySD(seed=0), lycoris.LoKr(factor=8, dim=10000, alpha=1)).to(device).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        data = SyntheticConcepts(resolution=64, batch_size=8)
        data.setup("fit")
    evaluator = Evaluator(
        images=images, sampler=Sampler(steps=steps, resolution=resolution, batch_size=batch_size),
        image_encoder=TinyDINOv2(), text_image_encoder=TinyCLIP(), style_encoder=TinyVGG19())
    timer = GenerationTimer()
    measuring.generate_images = timer
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="lycoflow-bench-") as tmp:
            for epoch in (1, 2):
                timer.seconds, timer.images = 0.0, 0
                start = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):  # progress bars and the untrained-encoder note
                    result = evaluator.evaluate(model.components, list(model.networks.values()), data, Path(tmp),
                                                epoch=epoch, step=epoch, run="bench", config="bench", seed=0)
                if device == "cuda":
                    torch.cuda.synchronize()
                total = time.perf_counter() - start
                results.append({"epoch": epoch, "total_s": total, "generation_s": timer.seconds,
                                "generated": timer.images, "values": len(result.rows)})
    finally:
        measuring.generate_images = timer.original
    return results


def print_checkpoint(results: list[dict], images: int, steps: int, resolution: int) -> None:
    print(f"checkpoint: quickstart model + LoKr, 7 classes × 4 prompt types × {images} images, DDIM {steps} steps, "
          f"CFG 7, {resolution}², tiny encoders")
    for r, what in zip(results, ("first (base images, dataset embeddings)", "later epochs")):
        outside = r["total_s"] - r["generation_s"]
        print(f"  {what:<40} {r['generated']:>4} images generated at {r['generated'] / r['generation_s']:6.1f} "
              f"images/s; total {r['total_s']:6.2f} s, outside generation {outside:5.2f} s = "
              f"{outside / r['total_s']:.1%}", flush=True)


def time_per_call(fn: Any, rounds: int = 20) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_metrics(device: str) -> dict[str, float]:
    g = torch.Generator(device).manual_seed(0)
    generated, reference = (torch.randn(100, 1024, generator=g, device=device) for _ in range(2))
    text = torch.randn(100, 768, generator=g, device=device)
    image_clip = torch.randn(100, 768, generator=g, device=device)
    grams = [torch.randn(100, 64 * 64 + 128 * 128 + 256 * 256 + 2 * 512 * 512, generator=g, device=device)
             for _ in range(2)]
    prompts = torch.arange(100, device=device) % 10
    cases = {
        "image_similarity (100 vs 100)": lambda: image_similarity(generated, reference),
        "squared_centroid_distance": lambda: squared_centroid_distance(generated, reference),
        "text_image_similarity (100 pairs)": lambda: text_image_similarity(image_clip, text),
        "vendi_score (10 prompts × 10)": lambda: [vendi_score(generated[prompts == p]) for p in range(10)],
        "style_loss (100 pairs of VGG19 Grams)": lambda: style_loss(*grams),
    }
    return {name: 1 / time_per_call(fn) for name, fn in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=28)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device {args.device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    results = measure_checkpoint(args.images, args.steps, args.resolution, args.batch_size, args.device)
    print_checkpoint(results, args.images, args.steps, args.resolution)
    print("metrics (functional, one (class, prompt type) of the paper's size): calls/s")
    for name, rate in measure_metrics(args.device).items():
        print(f"  {name:<40} {rate:10.0f}")


if __name__ == "__main__":
    main()
