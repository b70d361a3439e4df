"""Adapter tools: ``lycoflow generate`` (images from a base model with adapter files), ``lycoflow merge`` (bake
adapters into a model file) and ``lycoflow extract`` (an SVD LoRA/LoCon of a fine-tuned model's difference).

Each command is a typed function (`generate`, `merge`, `extract`) and a ``main_<name>(argv)`` entry. The
entries raise `argparse.ArgumentError` for a malformed command line and `ValueError`, `FileNotFoundError` or
`BaseModelError` for values the user can fix, with a message naming the argument or file; `lycoflow.cli.main`
prints them as one line.

Adapter files are named ``FILE[:WEIGHT]`` on the command line (weight 1 when omitted) and are read with
`lycoris.load_file`: any algorithm, ours or another trainer's (kohya, the LyCORIS library).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import diffusers
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, SchedulerMixin, StableDiffusionPipeline
from torch import Tensor
from tqdm.auto import tqdm

import lycoris
from lycoris.functional import kernel_size
from lycoris.targeting import lycoris_name, matches, supported_layers

from . import __version__
from .cache import atomic_path
from .convert import save_single_file
from .evaluation import save_png
from .generation import Parts, Sampler
from .generation import generate as sample
from .models import Components, Pretrained
from .module import DTYPES, DType, cast_frozen

Adapters = Sequence[tuple[str | os.PathLike, float]]


# -- shared ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser that raises on a bad command line instead of exiting, so that the lycoflow command
    reports it in one line (and a caller in Python can catch it)."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def _parser(name: str, description: str, examples: str) -> _Parser:
    return _Parser(prog=f"lycoflow {name}", description=description, epilog=f"examples:\n{examples}",
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_base_and_adapters(parser: argparse.ArgumentParser, several: str) -> None:
    """``--base`` and the repeatable ``--adapter FILE[:WEIGHT]`` of generate and merge."""
    parser.add_argument("--base", required=True, metavar="PATH_OR_HUB_ID",
                        help="base model: Hub id, diffusers folder or single-file .safetensors checkpoint")
    parser.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help=f"adapter file and its weight (default 1); {several}")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="DIR_OR_HUB_ID",
                        help="for a single-file model: the diffusers folder or Hub id of the same architecture whose "
                             "configs describe it (needed offline)")


def _help(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Print the help when asked; checked before parsing, so that it works without the required options."""
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        return True
    return False


def parse_adapter(spec: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` → (file, weight). The text after the last colon is a weight only if it is a number, so
    paths with colons (``C:\\loras\\a.safetensors``) still work."""
    path, colon, weight = spec.rpartition(":")
    if colon and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


def _check_adapters(adapters: Adapters, required: bool) -> list[tuple[Path, float]]:
    """Fail before loading a multi-GB model: every file exists and every weight is a finite number."""
    checked = [(Path(path), float(weight)) for path, weight in adapters]
    if required and not checked:
        raise ValueError("name at least one adapter file: --adapter FILE[:WEIGHT]")
    for path, weight in checked:
        if not path.is_file():
            raise FileNotFoundError(f"adapter file not found: {path} (--adapter FILE[:WEIGHT], e.g. "
                                    f"--adapter {path.name}:0.8)")
        if not math.isfinite(weight):
            raise ValueError(f"--adapter {path}: weight {weight} is not a finite number")
    return checked


def _networks_of(parts: Components) -> dict[str, torch.nn.Module]:
    """File prefix → model, as lycoflow names adapter files (``lora_unet_*``, ``lora_te_*``)."""
    return {"lora_unet": parts.unet, "lora_te": parts.text_encoder}


def _load(path: str, config: str | None) -> Components:
    return Pretrained(path, config=config).load()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename: a reader (or a crash) never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# -- generate -------------------------------------------------------------------------------------------
def scheduler_class(name: str) -> type[SchedulerMixin]:
    """``diffusers.DDIMScheduler`` (or ``DDIMScheduler``, or ``package.module.Class``) → the class."""
    module, _, attribute = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "diffusers"), attribute)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"--scheduler {name}: not a diffusers scheduler class; e.g. diffusers.DDIMScheduler, "
                         "diffusers.EulerDiscreteScheduler, diffusers.DPMSolverMultistepScheduler")
    return cls


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (--prompts FILE: one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt: write one prompt per line")
    return prompts


def generate(
    base: str,
    prompts: Sequence[str],
    out: str | os.PathLike,
    adapters: Adapters = (),
    seed: int = 0,
    images_per_prompt: int = 1,
    sampler: Sampler | None = None,
    device: str | None = None,
    config: str | None = None,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Generate images from a base model with adapter files applied, as PNGs plus an index.

    Image ``j`` of prompt ``i`` gets seed ``seed + i * images_per_prompt + j``: every image has its own seed,
    and its starting noise depends on that seed alone (not on the batch it lands in), so one image can be
    regenerated alone. Files are ``<i>-<j>-<seed>.png``; ``index.csv`` and ``prompts.json`` list each file's
    prompt, seed and the adapters with their weights (``prompts.json`` also the sampler's settings).

    The first adapter file is attached in-process (`lycoris.load_file`), so weight 0 gives exactly the base
    model. Further files stack: they are baked into the weights first (`lycoris.merge_into`), because a layer
    holds one attached adapter at a time.

    Args:
        base: Hub id, diffusers folder or single-file checkpoint of the base model.
        prompts: the prompts.
        out: folder for the images and the index (created).
        adapters: (adapter file, weight) pairs.
        seed: the first image's seed.
        images_per_prompt: images per prompt.
        sampler: scheduler, steps, guidance, resolution, batch size; default: DDIM, 25 steps, CFG 7, 512².
        device: where to run; default: cuda when available, else cpu.
        config: for a single-file base: the diffusers folder or Hub id describing its architecture.
        progress: show a progress bar.

    Returns:
        The rows of ``index.csv``: file, prompt_index, image_index, seed, prompt, adapters.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt: --prompt TEXT or --prompts FILE")
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt {images_per_prompt} must be >= 1")
    if seed < 0:
        raise ValueError(f"--seed {seed} must be >= 0")
    files = _check_adapters(adapters, required=False)
    sampler = sampler or Sampler()
    out = Path(out)
    parts = _load(base, config)
    target = torch.device(device or _default_device())
    # On the device before the adapters are made: they are created on their layer's device.
    for model in (parts.unet, parts.vae, parts.text_encoder):
        model.to(target).eval()
    if len(files) > 1:
        lycoris.merge_into(_networks_of(parts), files[1:])
    if files:
        for network in lycoris.load_file(files[0][0], _networks_of(parts), multiplier=files[0][1]).values():
            network.eval()

    described = ";".join(f"{path}:{weight:g}" for path, weight in files)
    jobs = [(i, j, prompt, seed + i * images_per_prompt + j)
            for i, prompt in enumerate(prompts) for j in range(images_per_prompt)]
    rows = [{"file": f"{i}-{j}-{s}.png", "prompt_index": i, "image_index": j, "seed": s, "prompt": prompt,
             "adapters": described} for i, j, prompt, s in jobs]
    out.mkdir(parents=True, exist_ok=True)
    parts_for_sampling = Parts(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(parts.scheduler.config))
    with tqdm(total=len(rows), desc="generating", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), sampler.batch_size):
            batch = rows[start:start + sampler.batch_size]
            images = sample(parts_for_sampling, [r["prompt"] for r in batch], [r["seed"] for r in batch], sampler)
            for image, row in zip(images, batch):
                save_png(image, out / row["file"])
            bar.update(len(batch))

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "index.csv", table.getvalue())
    index = {"base": base, "adapters": [{"file": str(path), "weight": weight} for path, weight in files],
             "sampler": sampler.describe(), "seed": seed, "images_per_prompt": images_per_prompt,
             "images": [{k: v for k, v in row.items() if k != "adapters"} for row in rows]}
    _write_atomic(out / "prompts.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return rows


GENERATE_EXAMPLES = """\
  lycoflow generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter runs/lokr/adapters/epoch=10.safetensors --prompt "zqx star, yellow" --images-per-prompt 4 \\
      --out images/
  lycoflow generate --base model.safetensors --config stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter style.safetensors:0.6 --adapter subject.safetensors:0.8 --prompts prompts.txt --out images/
  lycoflow generate --base ./my-sd15 --adapter a.safetensors:0 --prompt "a cat" --out base-images/  # base model

Image j of prompt i gets seed SEED + i * N + j (N: --images-per-prompt) and is written as <i>-<j>-<seed>.png;
index.csv and prompts.json list every file's prompt, seed and the adapters with their weights."""


def main_generate(argv: list[str]) -> int:
    """``lycoflow generate``: images from a base model with adapter files applied."""
    parser = _parser("generate", "Generate images from a base model with LyCORIS/LoRA adapter files applied.",
                     GENERATE_EXAMPLES)
    _add_base_and_adapters(parser, "repeat to stack several")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for more")
    parser.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line (instead of --prompt)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the first image (default 0)")
    parser.add_argument("--images-per-prompt", type=int, default=1, metavar="N", help="default 1")
    parser.add_argument("--steps", type=int, default=25, metavar="N", help="denoising steps (default 25)")
    parser.add_argument("--guidance", type=float, default=7.0, metavar="SCALE",
                        help="classifier-free guidance scale (default 7; 1 turns it off)")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT", help="default: empty")
    parser.add_argument("--resolution", type=int, default=512, metavar="PX",
                        help="side of the square images (default 512)")
    parser.add_argument("--scheduler", default="diffusers.DDIMScheduler", metavar="CLASS",
                        help="diffusers scheduler class (default diffusers.DDIMScheduler)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per UNet call (default 8)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the images and the index")
    _add_model_options(parser)
    if _help(parser, argv):
        return 0
    args = parser.parse_args(argv)
    if args.prompt and args.prompts:
        raise ValueError("give prompts with --prompt TEXT or --prompts FILE, not both")
    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    sampler = Sampler(scheduler=scheduler_class(args.scheduler), steps=args.steps, guidance_scale=args.guidance,
                      resolution=args.resolution, negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    rows = generate(args.base, prompts, args.out, [parse_adapter(a) for a in args.adapter], seed=args.seed,
                    images_per_prompt=args.images_per_prompt, sampler=sampler, device=args.device,
                    config=args.config)
    print(f"lycoflow generate: wrote {len(rows)} image(s), index.csv and prompts.json to {args.out}")
    return 0


# -- merge ----------------------------------------------------------------------------------------------
def _check_outputs(out_diffusers: str | os.PathLike | None, out_file: str | os.PathLike | None) -> None:
    if (out_diffusers is None) == (out_file is None):
        raise ValueError("give exactly one output: --out-diffusers DIR (a diffusers folder) or --out-file "
                         "FILE.safetensors (one file for A1111/ComfyUI)")
    if out_file is not None and Path(out_file).suffix.lower() != ".safetensors":
        raise ValueError(f"--out-file {out_file}: name a .safetensors file")
    if out_diffusers is not None and Path(out_diffusers).exists() and (
            not Path(out_diffusers).is_dir() or any(Path(out_diffusers).iterdir())):
        raise ValueError(f"--out-diffusers {out_diffusers} already exists and is not empty: name a new folder "
                         "(or delete it first)")


def _pipeline_scheduler(base: str, scheduler: SchedulerMixin) -> SchedulerMixin:
    """The base model's own scheduler class, with its settings.

    `Pretrained` reads a folder's scheduler as DDPM (training needs only the noise schedule); a saved pipeline
    should sample with the class its model_index.json names (PNDM for SD 1.5). A single file's scheduler is
    already diffusers' choice for it.
    """
    if type(scheduler) is not DDPMScheduler:
        return scheduler
    try:
        library, name = DiffusionPipeline.load_config(base).get("scheduler") or (None, None)
    except (OSError, ValueError):  # a folder without model_index.json, a file: keep what was read
        return scheduler
    cls = getattr(diffusers, name, None) if library == "diffusers" and isinstance(name, str) else None
    return cls.from_config(scheduler.config) if isinstance(cls, type) and issubclass(cls, SchedulerMixin) \
        else scheduler


def _save_diffusers(parts: Components, scheduler: SchedulerMixin, out: Path) -> None:
    """Save as a diffusers folder written beside the target and renamed into place."""
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.is_dir():  # checked empty before the model was loaded; os.replace cannot replace a folder
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(
    base: str,
    adapters: Adapters,
    out_diffusers: str | os.PathLike | None = None,
    out_file: str | os.PathLike | None = None,
    dtype: DType = "float16",
    config: str | None = None,
) -> tuple[Path, dict[str, int]]:
    """Bake adapter files into a base model and save it as a diffusers folder or an LDM single file.

    The files are baked one after another, each at its weight (`lycoris.merge_into`); the result runs at the
    base model's cost and needs no adapter support. Give exactly one of ``out_diffusers`` and ``out_file``.

    Args:
        base: Hub id, diffusers folder or single-file checkpoint of the base model.
        adapters: (adapter file, weight) pairs.
        out_diffusers: a new folder: ``StableDiffusionPipeline.save_pretrained`` layout (safetensors).
        out_file: a ``.safetensors`` single-file checkpoint (original LDM layout, SD 1.x), the file A1111 and
            ComfyUI load.
        dtype: the saved weights' dtype (merging itself runs in the loaded precision).
        config: for a single-file base: the diffusers folder or Hub id describing its architecture.

    Returns:
        The path written, and the number of layers changed per file prefix (``lora_unet``, ``lora_te``).
    """
    _check_outputs(out_diffusers, out_file)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    files = _check_adapters(adapters, required=True)
    parts = _load(base, config)
    if out_file is not None and parts.version != "sd_v1":
        raise ValueError(f"--out-file writes the SD 1.x single-file layout, but {base} is {parts.version}: use "
                         "--out-diffusers")
    changed = lycoris.merge_into(_networks_of(parts), files)
    if out_file is not None:
        return save_single_file(out_file, parts.unet, parts.vae, parts.text_encoder, dtype=DTYPES[dtype]), changed
    for model in (parts.unet, parts.vae, parts.text_encoder):
        cast_frozen(model, DTYPES[dtype])
    out = Path(out_diffusers)
    _save_diffusers(parts, _pipeline_scheduler(base, parts.scheduler), out)
    return out, changed


MERGE_EXAMPLES = """\
  lycoflow merge --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter runs/lokr/adapters/epoch=10.safetensors --out-file merged.safetensors   # for A1111/ComfyUI
  lycoflow merge --base ./my-sd15 --adapter style.safetensors:0.6 --adapter subject.safetensors:0.8 \\
      --out-diffusers merged-sd15/ --dtype float32"""


def main_merge(argv: list[str]) -> int:
    """``lycoflow merge``: bake adapter files into a base model."""
    parser = _parser("merge", "Bake LyCORIS/LoRA adapter files into a base model and save the merged model.",
                     MERGE_EXAMPLES)
    _add_base_and_adapters(parser, "repeat to bake several, in order")
    parser.add_argument("--out-diffusers", metavar="DIR", help="write a diffusers folder (a new folder)")
    parser.add_argument("--out-file", metavar="FILE.safetensors",
                        help="write one SD 1.x single-file checkpoint (A1111, ComfyUI)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES),
                        help="dtype of the saved weights (default float16, as shared checkpoints)")
    _add_model_options(parser)
    if _help(parser, argv):
        return 0
    args = parser.parse_args(argv)
    path, changed = merge(args.base, [parse_adapter(a) for a in args.adapter], out_diffusers=args.out_diffusers,
                          out_file=args.out_file, dtype=args.dtype, config=args.config)
    print(f"lycoflow merge: baked {len(args.adapter)} file(s) ({changed.get('lora_unet', 0)} UNet and "
          f"{changed.get('lora_te', 0)} text-encoder adapter layers); wrote {path}")
    return 0


# -- extract --------------------------------------------------------------------------------------------
@dataclass
class Extracted:
    """What `extract` wrote and how well it reproduces the fine-tune.

    Attributes:
        path: the adapter file.
        ranks: LyCORIS layer name → rank written.
        skipped: selected layers left out because they did not change (largest |ΔW| at most ``min_diff``).
        relative_error: ‖ΔW − ΔW_file‖_F / ‖ΔW‖_F over every selected layer (skipped ones included), with the
            factors as written (``dtype``).
        uncovered: changed tensors that no selected layer's weight holds (biases, norms, embeddings, layers
            outside the preset): a LoRA cannot carry them.
    """

    path: Path
    ranks: dict[str, int]
    skipped: int
    relative_error: float
    uncovered: list[str]


def _factors(matrix: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor]:
    """(up [out, r], down [r, in]) = (U√Σ, √Σ Vᵀ) of the truncated SVD: at ``rank``, or at the smallest rank whose
    leading σ² hold ``energy`` of Σσ²; never above the matrix's own rank bound."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        power = s.square()
        kept = power.cumsum(0) / power.sum()
        rank = int((kept < energy).sum()) + 1
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _check_extract(rank: int | None, energy: float | None, conv_rank: int | None, preset: str, min_diff: float,
                   out: Path, dtype: str) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of --rank R (a fixed rank) or --energy E (the smallest rank keeping "
                         "that share of each layer's squared singular values, e.g. 0.9)")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank {rank} must be >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"--energy {energy} must be in (0, 1], e.g. 0.9")
    if conv_rank is not None and conv_rank < 0:
        raise ValueError(f"--conv-rank {conv_rank} must be >= 0 (0 leaves k×k convolutions out)")
    if preset not in lycoris.PRESETS:
        raise ValueError(f"--preset {preset}: choose one of {', '.join(lycoris.PRESETS)}")
    if not min_diff >= 0:  # written so that NaN fails too
        raise ValueError(f"--min-diff {min_diff} must be >= 0")
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"--out {out}: name a .safetensors file")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")


def _changed_elsewhere(prefix: str, base: torch.nn.Module, tuned: torch.nn.Module, covered: set[str],
                       min_diff: float, tuned_name: str) -> list[str]:
    """The tensors of ``tuned`` that differ from ``base`` outside ``covered``; refuses another architecture."""
    ours, theirs = base.state_dict(), tuned.state_dict()
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        odd = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k].shape != theirs[k].shape]
        raise ValueError(f"--tuned {tuned_name} has another architecture than --base ({prefix}: e.g. {odd[:3]} "
                         "differ): extract needs the fine-tune of that very base model")
    return [f"{prefix}:{key}" for key, value in ours.items()
            if key not in covered and (theirs[key].float() - value.float()).abs().max() > min_diff]


@torch.no_grad()
def extract(
    base: str,
    tuned: str,
    out: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    conv_rank: int | None = None,
    preset: str = "attn-mlp",
    min_diff: float = 1e-6,
    dtype: DType = "float16",
    config: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Extracted:
    """Extract a LoRA/LoCon file from a fine-tuned model: the truncated SVD of each layer's ΔW = W_tuned − W_base.

    Every Linear/Conv layer of the UNet and the text encoder that ``preset`` adapts is factored as
    ΔW ≈ up·down with up = U√Σ and down = √ΣVᵀ, the kernel flattened for convolutions (LoCon: down
    [r, in, k, k], up [out, r, 1, 1]), and alpha = rank (scale 1). Give ``rank`` (a fixed rank) or ``energy``
    (per layer, the smallest rank whose σ² hold that share of Σσ²); either is capped by the layer's own bound
    min(out, in·k·k). Layers whose largest |ΔW| is at most ``min_diff`` are skipped. The file has
    `lycoris.save_file`'s keys (``lora_unet_*``, ``lora_te_text_model_*``) and kohya metadata.

    Args:
        base: the base model (Hub id, diffusers folder or single file).
        tuned: the fine-tuned model, of the same architecture.
        out: the ``.safetensors`` file to write.
        rank: fixed rank of every layer (k×k convolutions: ``conv_rank`` when given).
        energy: share of Σσ² to keep per layer, in (0, 1].
        conv_rank: fixed rank of k×k convolutions (0 leaves them out); None: as the other layers.
        preset: the layers to extract (``attn-only``, ``attn-mlp``, ``full``; only ``full`` has k×k convolutions).
        min_diff: layers whose largest |ΔW| is at most this count as unchanged (0: only identical ones).
        dtype: dtype of the written factors.
        config: for single-file models: the diffusers folder or Hub id describing their architecture.
        device: where the SVDs run; default: cuda when available, else cpu.
        progress: show a progress bar.
    """
    out = Path(out)
    _check_extract(rank, energy, conv_rank, preset, min_diff, out, dtype)
    base_parts, tuned_parts = _load(base, config), _load(tuned, config)
    target = torch.device(device or _default_device())
    patterns = lycoris.PRESETS[preset]
    models = [("lora_unet", base_parts.unet, tuned_parts.unet),
              ("lora_te", base_parts.text_encoder, tuned_parts.text_encoder)]
    # (prefix, raw path, canonical path, base layer, tuned layer, k×k?) of every layer to extract.
    todo = []
    uncovered: list[str] = []
    for prefix, model, other in models:
        layers = dict(other.named_modules())
        chosen = []
        for raw, path, layer in supported_layers(model):
            spatial = any(k > 1 for k in kernel_size(layer))
            if matches(path, patterns) and not (spatial and conv_rank == 0):
                chosen.append((prefix, raw, path, layer, layers[raw], spatial))
        uncovered += _changed_elsewhere(prefix, model, other, {f"{raw}.weight" for _, raw, *_ in chosen}, min_diff,
                                        tuned)
        todo += chosen

    adapters: dict[str, dict[str, lycoris.Adapter]] = {prefix: {} for prefix, _, _ in models}
    spatial_names: set[str] = set()
    residual = total = 0.0
    skipped = 0
    for prefix, _, path, layer, other, spatial in tqdm(todo, desc="extracting", unit="layer", disable=not progress,
                                                       dynamic_ncols=True):
        delta = other.weight.to(target, torch.float32) - layer.weight.to(target, torch.float32)
        matrix = delta.flatten(1)
        total += float(matrix.square().sum())
        if float(matrix.abs().max()) <= min_diff:
            skipped += 1
            residual += float(matrix.square().sum())
            continue
        fixed = conv_rank if spatial and conv_rank is not None else rank
        up, down = _factors(matrix, fixed, None if fixed is not None else energy)
        # Rounded as the file will hold them, so the reported error is the file's.
        up, down = up.to(DTYPES[dtype]).float(), down.to(DTYPES[dtype]).float()
        residual += float((matrix - up @ down).square().sum())
        adapter = lycoris.LoRAAdapter(layer, dim=up.shape[1], alpha=up.shape[1])
        adapter.lora_up.weight.copy_(up.reshape(adapter.lora_up.weight.shape))
        adapter.lora_down.weight.copy_(down.reshape(adapter.lora_down.weight.shape))
        name = lycoris_name(prefix, path)
        adapters[prefix][name] = adapter
        if spatial:
            spatial_names.add(name)

    ranks = {name: adapter.dim for group in adapters.values() for name, adapter in group.items()}
    if not ranks:
        raise ValueError(f"--tuned {tuned} does not differ from --base {base} in any layer of preset {preset} "
                         f"(largest |ΔW| at most --min-diff {min_diff:g}): nothing to extract")
    networks = {prefix: lycoris.Network(group, prefix) for prefix, group in adapters.items() if group}
    linear_dim = max((r for n, r in ranks.items() if n not in spatial_names), default=0)
    conv_dim = max((r for n, r in ranks.items() if n in spatial_names), default=0)
    args: dict[str, object] = {"algo": "locon" if conv_dim else "lora", "preset": preset}
    if conv_dim:
        args |= {"conv_dim": conv_dim, "conv_alpha": conv_dim}
    error = math.sqrt(residual / total) if total else 0.0
    rule = f"rank {rank}" if rank is not None else f"energy {energy:g}"
    metadata = {
        "ss_base_model_version": base_parts.version,
        "ss_network_module": "lycoris.kohya",
        # Each layer's alpha is its rank (scale 1); with --energy the ranks vary and these are the largest.
        "ss_network_dim": str(linear_dim or conv_dim),
        "ss_network_alpha": str(linear_dim or conv_dim),
        "ss_network_args": json.dumps(args),
        "ss_output_name": out.stem,
        "ss_training_comment": f"extracted by lycoflow extract from {tuned} against {base} ({rule}"
                               f"{'' if conv_rank is None else f', conv rank {conv_rank}'}): {len(ranks)} layers, "
                               f"relative Frobenius error {error:.4g}",
        "lycoflow_version": __version__,
    }
    path = lycoris.save_file(out, networks, metadata=metadata, dtype=DTYPES[dtype])
    return Extracted(path, ranks, skipped, error, uncovered)


EXTRACT_EXAMPLES = """\
  lycoflow extract --base stable-diffusion-v1-5/stable-diffusion-v1-5 --tuned ./dreambooth-sd15 --rank 32 \\
      --out extracted.safetensors
  lycoflow extract --base ./sd15 --tuned finetune.safetensors --config ./sd15 --energy 0.9 --preset full \\
      --conv-rank 16 --out extracted.safetensors   # LoCon: the k×k convolutions too, at rank 16

The relative Frobenius error printed at the end says how much of the difference the file misses: raise --rank
or --energy (or use --preset full) to lower it."""


def main_extract(argv: list[str]) -> int:
    """``lycoflow extract``: a LoRA/LoCon file from a fine-tuned model and its base."""
    parser = _parser("extract", "Extract a LoRA/LoCon adapter file from a fine-tuned model by SVD of its difference "
                     "from the base model.", EXTRACT_EXAMPLES)
    parser.add_argument("--base", required=True, metavar="PATH_OR_HUB_ID", help="the base model")
    parser.add_argument("--tuned", required=True, metavar="PATH_OR_HUB_ID",
                        help="the fine-tuned model (same architecture as --base)")
    parser.add_argument("--rank", type=int, metavar="R", help="fixed rank of every layer")
    parser.add_argument("--energy", type=float, metavar="E",
                        help="instead of --rank: per layer, the smallest rank keeping this share of Σσ² (0 < E <= 1)")
    parser.add_argument("--conv-rank", type=int, metavar="R",
                        help="fixed rank of k×k convolutions (--preset full; 0 leaves them out; default: as --rank "
                             "or --energy)")
    parser.add_argument("--preset", default="attn-mlp", choices=list(lycoris.PRESETS),
                        help="layers to extract (default attn-mlp)")
    parser.add_argument("--min-diff", type=float, default=1e-6, metavar="D",
                        help="layers whose largest |ΔW| is at most this are skipped (default 1e-6)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES),
                        help="dtype of the written factors (default float16)")
    parser.add_argument("--device", help="where the SVDs run; default: cuda when available, else cpu")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the adapter file to write")
    _add_model_options(parser)
    if _help(parser, argv):
        return 0
    args = parser.parse_args(argv)
    result = extract(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy, conv_rank=args.conv_rank,
                     preset=args.preset, min_diff=args.min_diff, dtype=args.dtype, config=args.config,
                     device=args.device)
    ranks = sorted(result.ranks.values())
    print(f"lycoflow extract: wrote {result.path}: {len(ranks)} layer(s) extracted (rank {ranks[0]}–{ranks[-1]}), "
          f"{result.skipped} unchanged layer(s) skipped, relative Frobenius error {result.relative_error:.4g}")
    if result.uncovered:
        print(f"note: {len(result.uncovered)} changed tensor(s) are outside the extracted layers' weights and not in "
              f"the file (e.g. {', '.join(result.uncovered[:3])}); --preset full covers more", file=sys.stderr)
    return 0
