"""``lycoflow generate``: images from a base model with adapter files applied, as PNGs plus an index."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

import lycoris

from ..cache import atomic_path
from ..evaluation import sampling
from ..evaluation.images import save_png
from ..evaluation.sampling import Sampler
from ..models import MaxTokenLength
from .options import (
    SPELLINGS,
    Adapters,
    add_parameters,
    checked_adapters,
    command_parser,
    default_device,
    help_requested,
    import_object,
    load_base,
    reading_algorithms,
)


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """``diffusers.DDIMScheduler`` (or ``DDIMScheduler``, or ``package.module.Class``) → the class."""
    try:
        cls = import_object(name, default_module="diffusers")
    except ValueError:
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


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename: a reader (or a crash) never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _refuse_existing(out: Path, names: list[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: name a folder for the images")
    taken = [name for name in names if (out / name).exists()]
    if taken and not overwrite:
        shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise ValueError(f"--out {out} already holds {shown}: pass --overwrite to replace them, or name another "
                         "folder")


def generate(
    base: str,
    prompts: Sequence[str],
    out: str | os.PathLike,
    adapters: Adapters = (),
    seed: int = 0,
    images_per_prompt: int = 1,
    sampler: Sampler | None = None,
    max_token_length: MaxTokenLength = 75,
    device: str | None = None,
    config: str | None = None,
    progress: bool = True,
    algorithms: Sequence[str | lycoris.Algorithm] = (),
    overwrite: bool = False,
) -> list[dict[str, object]]:
    """Generate images from a base model with LyCORIS/LoRA adapter files applied.

    Image ``j`` of prompt ``i`` gets seed ``seed + i * images_per_prompt + j``: every image has its own seed,
    and its starting noise depends on that seed alone (not on the batch it lands in), so one image can be
    regenerated alone. Files are ``<i>-<j>-<seed>.png``; ``index.csv`` and ``prompts.json`` list each file's
    prompt, seed and the adapters with their weights (``prompts.json`` also the sampler's settings).

    The first adapter file is attached in-process (`lycoris.load_file`), so weight 0 gives exactly the base
    model. Further files stack: they are baked into the weights first (`lycoris.merge_into`), because a layer
    holds one attached adapter at a time.

    Args:
        base: the base model: Hub id, diffusers folder or single-file .safetensors checkpoint.
        prompts: the prompts: one per ``--prompt`` on the command line (or ``--prompts FILE``, one per line).
        out: folder for the images and the index (created).
        adapters: adapter files, each with its weight: ``FILE[:WEIGHT]`` on the command line (weight 1 when
            omitted), the option repeated to stack several.
        seed: seed of the first image.
        images_per_prompt: images per prompt.
        sampler: scheduler, steps, guidance, resolution, batch size; default: DDIM, 25 steps, CFG 7, the base's own
            size (512² for SD 1.5, 1024² for SDXL).
        max_token_length: prompt tokens the text encoder reads: 75 (CLIP's context), or 150/225 in chunks of 75
            as kohya's ``max_token_length`` (use what the adapter was trained with: the paper's recipes say 150).
        device: where to run; default: cuda when available, else cpu.
        config: for a single-file base: the diffusers folder or Hub id of the same architecture whose configs
            describe it (needed offline).
        progress: show a progress bar.
        algorithms: algorithms of your own that the files may hold, tried before lycoris' own: `lycoris.Strategy`
            or `lycoris.Adapter` classes, or their import paths ``module.Class`` (the option repeated for more).
        overwrite: replace images, ``index.csv`` and ``prompts.json`` of the same names already in ``out``
            (otherwise it is an error, before anything is loaded).

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
    files = checked_adapters(adapters, required=False)
    readers = reading_algorithms(algorithms)
    sampler = sampler or Sampler()
    out = Path(out)
    jobs = [(i, j, prompt, seed + i * images_per_prompt + j)
            for i, prompt in enumerate(prompts) for j in range(images_per_prompt)]
    _refuse_existing(out, [f"{i}-{j}-{s}.png" for i, j, _, s in jobs] + ["index.csv", "prompts.json"], overwrite)
    parts = replace(load_base(base, config), max_token_length=max_token_length)
    target = torch.device(device or default_device())
    # On the device before the adapters are made: they are created on their layer's device.
    for model in parts.modules():
        model.to(target).eval()
    if len(files) > 1:
        lycoris.merge_into(parts.adaptable(), files[1:], algorithms=readers)
    if files:
        networks = lycoris.load_file(files[0][0], parts.adaptable(), multiplier=files[0][1], algorithms=readers)
        for network in networks.values():
            network.eval()

    described = ";".join(f"{path}:{weight:g}" for path, weight in files)
    rows = [{"file": f"{i}-{j}-{s}.png", "prompt_index": i, "image_index": j, "seed": s, "prompt": prompt,
             "adapters": described} for i, j, prompt, s in jobs]
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(rows), desc="generating", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), sampler.batch_size):
            batch = rows[start:start + sampler.batch_size]
            images = sampling.sample(parts, [r["prompt"] for r in batch], [r["seed"] for r in batch], sampler)
            for image, row in zip(images, batch):
                save_png(image, out / row["file"])
            bar.update(len(batch))

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "index.csv", table.getvalue())
    index = {"base": base, "adapters": [{"file": str(path), "weight": weight} for path, weight in files],
             "sampler": sampler.describe(parts),
             "max_token_length": max_token_length, "seed": seed, "images_per_prompt": images_per_prompt,
             "images": [{k: v for k, v in row.items() if k != "adapters"} for row in rows]}
    _write_atomic(out / "prompts.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return rows


EXAMPLES = """\
  lycoflow generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter runs/lokr/adapters/epoch=10.safetensors --prompt "zqx star, yellow" --images-per-prompt 4 \\
      --out images/
  lycoflow generate --base model.safetensors --config stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter style.safetensors:0.6 --adapter subject.safetensors:0.8 --prompts prompts.txt --out images/
  lycoflow generate --base ./my-sd15 --adapter a.safetensors:0 --prompt "a cat" --out base-images/  # base model
  lycoflow generate --base ./my-sd15 --algorithm my_algos.ScaledDiff --adapter mine.safetensors --prompt "a cat" \\
      --out images/   # a file of your own algorithm (my_algos.py on PYTHONPATH)

Image j of prompt i gets seed SEED + i * N + j (N: --images-per-prompt) and is written as <i>-<j>-<seed>.png;
index.csv and prompts.json list every file's prompt, seed and the adapters with their weights."""

#: The prompts come one per --prompt (none when only --prompts FILE names them); the sampler's guidance scale
#: is --guidance, and its scheduler class is named by import path.
_SPELLINGS = {**SPELLINGS, "prompts": {"flags": ("--prompt",), "action": "append", "type": str, "metavar": "TEXT",
                                       "required": False}}
_SAMPLER_SPELLINGS = {"guidance_scale": {"flags": ("--guidance",)}, "scheduler": {"type": str, "metavar": "CLASS"}}


def main(argv: list[str]) -> int:
    """``lycoflow generate``: `generate`'s parameters, and `Sampler`'s, as options."""
    parser = command_parser("generate", generate, EXAMPLES)
    add_parameters(parser, generate, skip={"sampler", "progress"}, spellings=_SPELLINGS)
    parser.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                        help="a text file of prompts, one per line (instead of --prompt)")
    sampler_options = add_parameters(parser, Sampler, spellings=_SAMPLER_SPELLINGS)
    if help_requested(parser, argv):
        return 0
    given = vars(parser.parse_args(argv))
    prompts_file = given.pop("prompts_file")
    if prompts_file is not None:
        if "prompts" in given:
            raise ValueError("give prompts with --prompt TEXT or --prompts FILE, not both")
        given["prompts"] = read_prompts(prompts_file)
    settings = {name: given.pop(name) for name in sampler_options if name in given}
    if "scheduler" in settings:
        settings["scheduler"] = scheduler_class(settings["scheduler"])
    # Without --prompt or --prompts, generate says what is missing.
    rows = generate(**{"prompts": [], **given}, sampler=Sampler(**settings))
    print(f"lycoflow generate: wrote {len(rows)} image(s), index.csv and prompts.json to {given['out']}")
    return 0
