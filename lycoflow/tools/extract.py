"""``lycoflow extract``: a LoRA/LoCon file from a fine-tuned model and its base, by SVD of their difference.

The maths is lycoris' (`lycoris.extract`); this is the command: the models, the file and its metadata, the
messages.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lycoris
from lycoris.targeting import Preset, file_namer

from .. import __version__
from ..models import DTYPES, DType
from .options import add_parameters, command_parser, default_device, help_requested, load_base, refuse_existing


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


def extract(
    base: str,
    tuned: str,
    out: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    conv_rank: int | None = None,
    preset: Preset = "attn-mlp",
    min_diff: float = 1e-6,
    dtype: DType = "float16",
    config: str | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Extracted:
    """Extract a LoRA/LoCon adapter file from a fine-tuned model by SVD of its difference from the base model.

    Every Linear/Conv layer of the UNet and the text encoder that ``preset`` adapts is factored as
    ΔW ≈ up·down with up = U√Σ and down = √ΣVᵀ, the kernel flattened for convolutions (LoCon: down
    [r, in, k, k], up [out, r, 1, 1]), and alpha = rank (scale 1). Give ``rank`` (a fixed rank) or ``energy``
    (per layer, the smallest rank whose σ² hold that share of Σσ²); either is capped by the layer's own bound
    min(out, in·k·k). Layers whose largest |ΔW| is at most ``min_diff`` are skipped. The file has
    `lycoris.save_file`'s keys (``lora_unet_*``, ``lora_te_text_model_*``; SDXL: ``lora_unet_<LDM path>``,
    ``lora_te1_*``, ``lora_te2_*``) and kohya metadata.

    Args:
        base: the base model: Hub id, diffusers folder or single-file .safetensors checkpoint.
        tuned: the fine-tuned model, of the same architecture as the base.
        out: the .safetensors adapter file to write.
        rank: fixed rank of every layer (of k×k convolutions: the conv rank, when given).
        energy: instead of a fixed rank: per layer, the smallest rank keeping this share of Σσ², in (0, 1].
        conv_rank: fixed rank of k×k convolutions (preset full; 0 leaves them out); default: as the other layers.
        preset: the layers to extract (only ``full`` has k×k convolutions).
        min_diff: layers whose largest |ΔW| is at most this count as unchanged and are skipped (0: only
            identical ones).
        dtype: dtype of the written factors.
        config: for single-file models: the diffusers folder or Hub id of the same architecture whose configs
            describe them (needed offline).
        device: where the SVDs run; default: cuda when available, else cpu.
        progress: show a progress bar.
        overwrite: replace ``out`` if it exists (otherwise an existing file is an error).
    """
    out = Path(out)
    _check_extract(rank, energy, conv_rank, preset, min_diff, out, dtype)
    refuse_existing(out, "--out", overwrite)
    base_parts, tuned_parts = load_base(base, config), load_base(tuned, config)
    target = torch.device(device or default_device())
    tuned_models = tuned_parts.adaptable()
    # (file prefix, layer pair) of every layer to extract.
    todo: list[tuple[str, lycoris.LayerPair]] = []
    uncovered: list[str] = []
    for prefix, model in base_parts.adaptable().items():
        other = tuned_models[prefix]
        odd = lycoris.mismatched_tensors(model, other)
        if odd:
            raise ValueError(f"--tuned {tuned} has another architecture than --base ({prefix}: e.g. {odd[:3]} "
                             "differ): extract needs the fine-tune of that very base model")
        pairs = lycoris.layer_pairs(model, other, lycoris.PRESETS[preset], convolutions=conv_rank != 0)
        covered = {f"{pair.raw}.weight" for pair in pairs}
        uncovered += [f"{prefix}:{key}" for key in lycoris.changed_tensors(model, other, min_diff, covered)]
        todo += [(prefix, pair) for pair in pairs]

    adapters: dict[str, dict[str, lycoris.Adapter]] = {prefix: {} for prefix in tuned_models}
    namers = {prefix: file_namer(model, prefix) for prefix, model in base_parts.adaptable().items()}
    spatial_names: set[str] = set()
    residual = total = 0.0
    skipped = 0
    for prefix, pair in tqdm(todo, desc="extracting", unit="layer", disable=not progress, dynamic_ncols=True):
        layer = lycoris.extract_layer(pair, rank=rank, energy=energy, conv_rank=conv_rank, min_diff=min_diff,
                                      dtype=DTYPES[dtype], device=target)
        residual += layer.residual
        total += layer.total
        if layer.adapter is None:
            skipped += 1
            continue
        name = namers[prefix](pair.path)
        adapters[prefix][name] = layer.adapter
        if pair.spatial:
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
    comment = (f"extracted by lycoflow extract from {tuned} against {base} ({rule}"
               f"{'' if conv_rank is None else f', conv rank {conv_rank}'}): {len(ranks)} layers, "
               f"relative Frobenius error {error:.4g}")
    # Each layer's alpha is its rank (scale 1); with --energy the ranks vary and these are the largest.
    metadata = lycoris.kohya_metadata(args, linear_dim or conv_dim, None, base_parts.version, out.stem,
                                      comment=comment, v_parameterization=base_parts.v_prediction,
                                      zero_terminal_snr=base_parts.zero_terminal_snr)
    path = lycoris.save_file(out, networks, metadata=metadata | {"lycoflow_version": __version__},
                             dtype=DTYPES[dtype])
    return Extracted(path, ranks, skipped, error, uncovered)


EXAMPLES = """\
  lycoflow extract --base stable-diffusion-v1-5/stable-diffusion-v1-5 --tuned ./dreambooth-sd15 --rank 32 \\
      --out extracted.safetensors
  lycoflow extract --base ./sd15 --tuned finetune.safetensors --config ./sd15 --energy 0.9 --preset full \\
      --conv-rank 16 --out extracted.safetensors   # LoCon: the k×k convolutions too, at rank 16

The relative Frobenius error printed at the end says how much of the difference the file misses: raise --rank
or --energy (or use --preset full) to lower it."""


def main(argv: list[str]) -> int:
    """``lycoflow extract``: `extract`'s parameters as options."""
    parser = command_parser("extract", extract, EXAMPLES)
    add_parameters(parser, extract, skip={"progress"})
    if help_requested(parser, argv):
        return 0
    result = extract(**vars(parser.parse_args(argv)))
    ranks = sorted(result.ranks.values())
    print(f"lycoflow extract: wrote {result.path}: {len(ranks)} layer(s) extracted (rank {ranks[0]}–{ranks[-1]}), "
          f"{result.skipped} unchanged layer(s) skipped, relative Frobenius error {result.relative_error:.4g}")
    if result.uncovered:
        print(f"note: {len(result.uncovered)} changed tensor(s) are outside the extracted layers' weights and not in "
              f"the file (e.g. {', '.join(result.uncovered[:3])}); --preset full covers more", file=sys.stderr)
    return 0
