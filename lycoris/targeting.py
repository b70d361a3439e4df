"""Which layers an adapter targets, and the canonical names they carry in files.

Presets are the paper's "trained layers" hyperparameter, written as glob patterns over the canonical
dotted module paths of a diffusers UNet and a CLIP text encoder. A preset also names the GroupNorm/LayerNorm
layers inside the blocks it adapts; those get a `lycoris.NormAdapter` only where the strategy trains norms
(``train_norm``, on by default for ``full`` only: `lycoris.Strategy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatchcase
from itertools import chain
from typing import Literal

from torch import nn

from .compvis import ldm_path, unet_ldm_names
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
# SDXL's text-time embedding (``add_embedding``, LDM's ``label_emb``) is its second timestep-like embedding: full
# reaches it as it reaches ``time_embedding`` (the LyCORIS library's full does not, naming neither in SDXL's LDM
# spelling; ComfyUI and A1111 place ``lora_unet_label_emb_0_*``). SD 1.x/2.x have no such layer.
_REST = (
    "*resnets.*.conv1", "*resnets.*.conv2", "*resnets.*.conv_shortcut", "*resnets.*.time_emb_proj",
    "*samplers.*.conv", "conv_in", "conv_out", "time_embedding.*", "add_embedding.*",
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


def is_sdxl_unet(module: nn.Module) -> bool:
    """SDXL's UNet (and its derivatives'): the one with the text-time additional embedding."""
    return getattr(getattr(module, "config", None), "addition_embed_type", None) == "text_time"


def file_namer(module: nn.Module, prefix: str) -> Callable[[str], str]:
    """The adapter-file name of each of ``module``'s layers, by its canonical path: ``<prefix>_<path with _>``.

    An SDXL UNet's layers are named by their LDM (compvis) paths, ``lora_unet_input_blocks_4_1_transformer_blocks_
    0_attn1_to_q``: what kohya's sd-scripts (and the LyCORIS library through it) writes for SDXL, and the one
    spelling ComfyUI, A1111 and Forge all map (A1111 misses some diffusers-named SDXL layers: the first up
    level's upsampler, ``add_embedding``). Everything else keeps its canonical path, as SD 1.x/2.x files always did.
    """
    if not is_sdxl_unet(module):
        return lambda path: lycoris_name(prefix, path)
    names = unet_ldm_names(module)

    def name(path: str) -> str:
        ldm = ldm_path(names, path)
        if ldm is None:
            raise ValueError(f"{path}: an SDXL UNet layer with no LDM name (an unknown block?)")
        return lycoris_name(prefix, ldm)
    return name


def layers_by_name(module: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Module]]:
    """File name → (canonical path, layer), under the name `file_namer` writes, the canonical and the raw path
    spelling (an SDXL file in diffusers names loads too)."""
    namer = file_namer(module, prefix)
    table: dict[str, tuple[str, nn.Module]] = {}
    for raw, canon, layer in chain(supported_layers(module), norm_layers(module)):
        table[namer(canon)] = (canon, layer)
        table.setdefault(lycoris_name(prefix, canon), (canon, layer))
        table.setdefault(lycoris_name(prefix, raw), (canon, layer))
    return table
