"""``lycoflow merge``: adapter files baked into a base model, saved as a diffusers folder or one checkpoint file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import diffusers
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

import lycoris

from ..models import DTYPES, UNET_PREFIX, Components, DType, cast_frozen
from .convert import save_single_file
from .options import (
    Adapters,
    add_parameters,
    checked_adapters,
    command_parser,
    help_requested,
    load_base,
    reading_algorithms,
    refuse_existing,
)


def _check_outputs(out_diffusers: str | os.PathLike | None, out_file: str | os.PathLike | None,
                   overwrite: bool) -> None:
    if (out_diffusers is None) == (out_file is None):
        raise ValueError("give exactly one output: --out-diffusers DIR (a diffusers folder) or --out-file "
                         "FILE.safetensors (one file for A1111/ComfyUI)")
    if out_file is not None and Path(out_file).suffix.lower() != ".safetensors":
        raise ValueError(f"--out-file {out_file}: name a .safetensors file")
    if out_file is not None:
        refuse_existing(out_file, "--out-file", overwrite)
    if out_diffusers is not None and Path(out_diffusers).exists() and (
            not Path(out_diffusers).is_dir() or any(Path(out_diffusers).iterdir())):
        # Replacing a folder would delete what the user keeps in it: not even with --overwrite.
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
    if parts.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                         text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                                         unet=parts.unet, scheduler=scheduler)
    else:
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
    adapters: Adapters = (),
    out_diffusers: str | os.PathLike | None = None,
    out_file: str | os.PathLike | None = None,
    dtype: DType = "float16",
    config: str | None = None,
    algorithms: Sequence[str | lycoris.Algorithm] = (),
    overwrite: bool = False,
) -> tuple[Path, dict[str, int]]:
    """Bake LyCORIS/LoRA adapter files into a base model and save the merged model.

    The files are baked one after another, each at its weight (`lycoris.merge_into`); the result runs at the
    base model's cost and needs no adapter support. Give exactly one of ``out_diffusers`` and ``out_file``.

    Args:
        base: the base model: Hub id, diffusers folder or single-file .safetensors checkpoint.
        adapters: adapter files, each with its weight, at least one: ``FILE[:WEIGHT]`` on the command line
            (weight 1 when omitted), the option repeated to bake several, in order.
        out_diffusers: write a diffusers folder (a new folder): ``StableDiffusionPipeline.save_pretrained``
            layout, safetensors.
        out_file: write one single-file .safetensors checkpoint (SD 1.x's original LDM layout, or SDXL's with
            its v-prediction / zero-terminal-SNR markers), the file A1111 and ComfyUI load.
        dtype: dtype of the saved weights (merging itself runs in the loaded precision).
        config: for a single-file base: the diffusers folder or Hub id of the same architecture whose configs
            describe it (needed offline).
        algorithms: algorithms of your own that the files may hold, tried before lycoris' own: `lycoris.Strategy`
            or `lycoris.Adapter` classes, or their import paths ``module.Class`` (the option repeated for more).
        overwrite: replace an existing ``out_file`` (otherwise it is an error, before anything is loaded).

    Returns:
        The path written, and the number of layers changed per file prefix (``lora_unet``, ``lora_te``; SDXL:
        ``lora_te1``, ``lora_te2``).
    """
    _check_outputs(out_diffusers, out_file, overwrite)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    files = checked_adapters(adapters, required=True)
    readers = reading_algorithms(algorithms)
    parts = load_base(base, config)
    if out_file is not None and parts.version not in ("sd_v1", "sdxl_base_v1-0"):
        raise ValueError(f"--out-file writes the SD 1.x and SDXL single-file layouts, but {base} is "
                         f"{parts.version}: use --out-diffusers")
    changed = lycoris.merge_into(parts.adaptable(), files, algorithms=readers)
    if out_file is not None:
        return save_single_file(out_file, parts, dtype=DTYPES[dtype]), changed
    for model in parts.modules():
        cast_frozen(model, DTYPES[dtype])
    out = Path(out_diffusers)
    _save_diffusers(parts, _pipeline_scheduler(base, parts.scheduler), out)
    return out, changed


EXAMPLES = """\
  lycoflow merge --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter runs/lokr/adapters/epoch=10.safetensors --out-file merged.safetensors   # for A1111/ComfyUI
  lycoflow merge --base ./my-sd15 --adapter style.safetensors:0.6 --adapter subject.safetensors:0.8 \\
      --out-diffusers merged-sd15/ --dtype float32
  lycoflow merge --base ./my-sd15 --algorithm my_algos.ScaledDiff --adapter mine.safetensors \\
      --out-file merged.safetensors   # a file of your own algorithm (my_algos.py on PYTHONPATH)"""


def main(argv: list[str]) -> int:
    """``lycoflow merge``: `merge`'s parameters as options."""
    parser = command_parser("merge", merge, EXAMPLES)
    add_parameters(parser, merge)
    if help_requested(parser, argv):
        return 0
    given = vars(parser.parse_args(argv))
    path, changed = merge(**given)
    text = sum(n for prefix, n in changed.items() if prefix != UNET_PREFIX)  # one text encoder, or SDXL's two
    print(f"lycoflow merge: baked {len(given.get('adapters', []))} file(s) ({changed.get(UNET_PREFIX, 0)} UNet and "
          f"{text} text-encoder adapter layers); wrote {path}")
    return 0
