"""Data loading: samples/s with and without the latent cache, and the loader's share of a quickstart step.

- ``cache``: a generated set of ``--images`` (2,000) drawings of the quickstart's concepts (its 9 classes
  drawn again and again, 64–160 px source images), trained at ``--resolution`` (128) in batches of 8, one
  worker-less loader in this process. What is timed per sample is what the training step gets latents by:
  *uncached*: the loader (decode, EXIF, resize, crop, flip, caption) plus the VAE's encode of its batch;
  *cached*: the loader reading each posterior from the cache plus the latent draw. The VAE is TinySD's
  (``--vae tiny``; the quickstart's) or SD 1.5's architecture with random weights (``--vae sd15``; what a real
  run pays, seconds per image on a CPU: use a GPU or few ``--images``). Also printed: the one-off time to fill
  the cache. Each way is run ``--rounds`` times, alternating; the medians are printed.
- ``share``: the quickstart recipe's data module (``SyntheticConcepts``, 128², batch 8) against its training
  step (``denoising_loss``, backward, AdamW step of the recipe's LoKr): the median time to take a batch from
  the loader, the median step, and loader / (loader + step), the fraction of a step the loader would cost if
  nothing overlapped them (with ``num_workers`` > 0 it overlaps; 0 is the recipe's setting).

    python benchmarks/data.py [--parts cache share] [--images N] [--resolution R] [--vae tiny|sd15]
                              [--rounds N] [--steps N] [--device cpu|cuda] [--json PATH]

The generated set stays in ``<lycoflow cache>/benchmarks`` for the next run; the latent cache is a fresh
temporary folder every run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts, not a package
import train_step  # noqa: E402

from lycoflow.cache import cache_dir  # noqa: E402
from lycoflow.data import HierarchicalDataModule  # noqa: E402
from lycoflow.data.synthetic import CONCEPTS, render  # noqa: E402

BATCH = 8


def generated_set(images: int) -> Path:
    """``images`` drawings cycling through the quickstart's concepts, written once (atomically) and reused."""
    root = cache_dir() / "benchmarks" / f"drawings-{images}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    for i in range(images):
        spec = CONCEPTS[i % len(CONCEPTS)]
        image, tags = render(spec, i // len(CONCEPTS), seed=1)
        folder = tmp / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(", ".join(tags))
    os.replace(tmp, root)
    return root


def vae_encoders(kind: str, device: str) -> Any:
    """An object with the latent methods of the data module's EncodingModel, around TinySD's or SD 1.5's VAE."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from lycoflow.data.encodings import module_digest
    from lycoflow.tiny import tiny_vae

    torch.manual_seed(0)
    # diffusers' AutoencoderKL defaults are one block; SD's VAE is four, 128→512 channels, 2 layers each.
    vae = tiny_vae(seed=0) if kind == "tiny" else AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
    vae = vae.to(device).eval().requires_grad_(False)

    class EncodingModel:
        def latent_identity(self) -> str:
            return module_digest(vae, dict(vae.config))

        @torch.no_grad()
        def latent_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
            return vae.encode(pixels.to(device)).latent_dist.parameters

        def sample(self, parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return DiagonalGaussianDistribution(parameters.to(device)).sample(generator)

    return EncodingModel()


def time_epoch(dm: HierarchicalDataModule, latents: Any, device: str) -> tuple[float, int]:
    """Seconds for one pass over the loader, getting every batch's latents; and the samples seen."""
    generator = torch.Generator(device).manual_seed(0)
    start, samples = time.perf_counter(), 0
    for batch in dm.train_dataloader():
        parameters = batch["latent_parameters"] if "latent_parameters" in batch else \
            latents.latent_parameters(batch["pixel_values"])
        latents.sample(parameters, generator)
        samples += len(batch["caption"])
    return time.perf_counter() - start, samples


def measure_cache(images: int, resolution: int, vae: str, device: str, rounds: int) -> dict[str, Any]:
    root = generated_set(images)
    encoders = vae_encoders(vae, device)
    options = {"resolution": resolution, "batch_size": BATCH, "flip": True, "balance": "none", "seed": 0}
    with tempfile.TemporaryDirectory(prefix="lycoflow-bench-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        plain = HierarchicalDataModule(str(root), **options)
        cached = HierarchicalDataModule(str(root), cache_latents=True, cache_dir=tmp, **options)
        plain.setup("fit")
        cached.setup("fit")
        start = time.perf_counter()
        cached.cache_encodings(encoders)
        fill_s = time.perf_counter() - start
        entries = sum(1 for _ in Path(tmp).rglob("*.safetensors"))  # identical drawings share an entry
        times: dict[str, list[float]] = {"uncached": [], "cached": []}
        for r in range(rounds):
            for name, dm in (("uncached", plain), ("cached", cached))[:: 1 if r % 2 == 0 else -1]:
                dm.sampler.set_epoch(r)
                seconds, samples = time_epoch(dm, encoders, device)
                times[name].append(samples / seconds)
    return {"images": images, "resolution": resolution, "vae": vae, "fill_s": fill_s, "samples_per_s": times,
            "entries": entries}


def print_cache(raw: dict[str, Any]) -> None:
    rates = {name: statistics.median(values) for name, values in raw["samples_per_s"].items()}
    print(f"cache: {raw['images']} generated images at {raw['resolution']}², batches of {BATCH}, VAE {raw['vae']}, "
          f"rounds: {len(raw['samples_per_s']['cached'])}")
    print(f"  fill the cache once: {raw['entries']} entries (both flips, identical images once) in "
          f"{raw['fill_s']:.1f} s ({raw['entries'] / raw['fill_s']:.0f} entries/s)")
    print(f"  {'uncached':<10}{rates['uncached']:>9.0f} samples/s   (loader + VAE encode)")
    print(f"  {'cached':<10}{rates['cached']:>9.0f} samples/s   (loader reading posteriors + latent draw)")
    print(f"  cached / uncached: {rates['cached'] / rates['uncached']:.2f}x", flush=True)


def measure_share(steps: int, device: str) -> dict[str, Any]:
    """The quickstart's loader vs its training step, on the recipe's own model and data module."""
    with tempfile.TemporaryDirectory(prefix="lycoflow-bench-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        cli = train_step.quickstart_cli(Path(tmp), device, False, 1, [])
        model, data = cli.model.to(device), cli.datamodule
        data.setup("fit")
        optimizers = model.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        loads, computes = [], []
        iterator, epoch = iter(data.train_dataloader()), 0
        for i in range(steps + 2):  # the first two: allocations and first-touch, untimed
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                epoch += 1
                data.sampler.set_epoch(epoch)
                iterator = iter(data.train_dataloader())
                start, batch = time.perf_counter(), next(iterator)
            loaded = time.perf_counter()
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = model.denoising_loss(batch, model._generator(epoch, i))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                loads.append(loaded - start)
                computes.append(time.perf_counter() - loaded)
    return {"load_s": loads, "step_s": computes, "batch_size": len(batch["caption"])}


def print_share(raw: dict[str, Any]) -> None:
    load, step = statistics.median(raw["load_s"]), statistics.median(raw["step_s"])
    print(f"share: recipes/tiny.yaml, batches of {raw['batch_size']}, {len(raw['load_s'])} steps")
    print(f"  loader {load * 1e3:.1f} ms/batch, training step {step * 1e3:.0f} ms, "
          f"loader / (loader + step): {load / (load + step):.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("cache", "share"), default=["cache", "share"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--vae", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the raw timings here")
    args = parser.parse_args()
    train_step.quiet_libraries()
    print(f"device {args.device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    raw: dict[str, Any] = {}
    if "cache" in args.parts:
        raw["cache"] = measure_cache(args.images, args.resolution, args.vae, args.device, args.rounds)
        print_cache(raw["cache"])
    if "share" in args.parts:
        raw["share"] = measure_share(args.steps, args.device)
        print_share(raw["share"])
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
