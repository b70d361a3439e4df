"""Which layers an adapter targets, and the canonical names they carry in files.

Presets are the paper's "trained layers" hyperparameter, written as glob patterns over the canonical
dotted module paths of a diffusers UNet and a CLIP text encoder. A preset also names the GroupNorm/LayerNorm
layers inside the blocks it adapts; those get a `lycoris.NormAdapter` only where the strategy trains norms
(``train_norm``, on by default for ``full`` only: `lycoris.Strategy`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from itertools import chain
from typing import Literal

from torch import nn

from .functional import is_norm, is_supported

Preset = Literal["attn-only", "attn-mlp", "full"]

_ATTN = (
    "*.to_q", "*.to_k", "*.to_v", "*.to_out.0",  # diffusers Attention
    "*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.out_proj",  # CLIP
)
_MLP = (
    "*.ff.net.0.proj", "*.ff.net.2",  # diffusers FeedForward (GEGLU in, Linear out)
    "*attentions.*.proj_in", "*attentions.*.proj_out",  # Transformer2DModel in/out projections
    "*.mlp.fc1", "*.mlp.fc2",  # CLIP
)
_REST = (
    "*resnets.*.conv1", "*resnets.*.conv2", "*resnets.*.conv_shortcut", "*resnets.*.time_emb_proj",
    "*samplers.*.conv", "conv_in", "conv_out", "time_embedding.*",
)
# The norms the LyCORIS library's train_norm reaches on SD: those inside the Transformer2DModel and ResnetBlock2D
# modules its presets target. They are also the only ones both UIs place: ComfyUI maps no CLIP norm by its
# kohya name (comfy/lora.py model_lora_keys_clip knows six layer kinds), A1111 has no name rule for conv_norm_out
# or final_layer_norm (extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis).
_TRANSFORMER_NORMS = ("*attentions.*.norm", "*attentions.*.transformer_blocks.*.norm[123]")
_RESNET_NORMS = ("*resnets.*.norm1", "*resnets.*.norm2")

PRESETS: dict[str, tuple[str, ...]] = {
    "attn-only": _ATTN,
    "attn-mlp": _ATTN + _MLP + _TRANSFORMER_NORMS,
    "full": _ATTN + _MLP + _TRANSFORMER_NORMS + _REST + _RESNET_NORMS,
}


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)


def canonical_root(module: nn.Module) -> str:
    """The path prefix the ecosystem expects for ``module``'s layers.

    transformers 5 dropped the ``text_model.`` level of CLIPTextModel; A1111 and ComfyUI still look up
    ``lora_te_text_model_encoder_...``, so it is put back in names (and accepted either way on load).
    """
    if type(module).__name__.startswith("CLIPTextModel") and not hasattr(module, "text_model"):
        return "text_model."
    return ""


def supported_layers(module: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(raw dotted path, canonical dotted path, layer) for every layer an adapter can wrap."""
    root = canonical_root(module)
    for path, layer in module.named_modules():
        if path and is_supported(layer):
            yield path, root + path, layer


def norm_layers(module: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(raw dotted path, canonical dotted path, layer) for every norm layer a `lycoris.NormAdapter` can wrap."""
    root = canonical_root(module)
    for path, layer in module.named_modules():
        if path and is_norm(layer):
            yield path, root + path, layer


def lycoris_name(prefix: str, canonical_path: str) -> str:
    return f"{prefix}_{canonical_path.replace('.', '_')}"


def layers_by_name(module: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Module]]:
    """File name → (canonical path, layer), under both the canonical and the raw path spelling."""
    table: dict[str, tuple[str, nn.Module]] = {}
    for raw, canon, layer in chain(supported_layers(module), norm_layers(module)):
        table[lycoris_name(prefix, canon)] = (canon, layer)
        table.setdefault(lycoris_name(prefix, raw), (canon, layer))
    return table
