"""Diffusers Stable Diffusion 1.x and SDXL parts → one original (CompVis/LDM, SGM) single-file checkpoint.

The single-file layout is the one of ``v1-5-pruned-emaonly.safetensors`` and of most SD 1.x checkpoints on
Civitai and the Hub: one flat state dict whose keys are the module paths of the original LDM code,

- ``model.diffusion_model.*``: the UNet (``openaimodel.UNetModel``: ``time_embed``, ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``out``);
- ``first_stage_model.*``: the VAE (``encoder``/``decoder`` with ``down``/``mid``/``up``, ``quant_conv``,
  ``post_quant_conv``);
- ``cond_stage_model.transformer.text_model.*``: the CLIP text encoder (transformers' own names).

SDXL's (``sd_xl_base_1.0.safetensors``, and Pony, Illustrious, NoobAI ...) has the same UNet and VAE layouts and
its two text encoders under ``conditioner.embedders``: ``0.transformer.text_model.*`` (CLIP-L, transformers'
names) and ``1.model.*`` (CLIP-G in OpenCLIP's layout: ``transformer.resblocks.N`` with q, k and v fused into
``attn.in_proj_weight``, ``positional_embedding``, ``ln_final``, ``text_projection`` stored transposed). A
v-prediction SDXL carries an empty ``v_pred`` tensor, a zero-terminal-SNR one ``ztsnr``: the markers ComfyUI
reads (``comfy/supported_models.py`` ``SDXL.model_type``) and `lycoflow.models.Pretrained` reads back.

AUTOMATIC1111, ComfyUI, kohya's scripts and diffusers' ``from_single_file`` read it. diffusers converts in
the other direction only (``diffusers.loaders.single_file_utils``); this is the way back, used to write
merged models and single-file test fixtures. The mapping is derived from the modules themselves (how many
blocks, resnets per block, where attention sits), so any SD 1.x-shaped model converts, the tiny one included;
a parameter with no place in the layout raises instead of being dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lycoris.compvis import alias, ldm_path, unet_ldm_names

from ..cache import atomic_path
from ..models import V_PRED_MARKER, ZTSNR_MARKER, Components

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX, OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."

#: diffusers ResnetBlock2D parameter → LDM ResnetBlock (VAE) names.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
#: diffusers Attention (VAE mid block) → LDM AttnBlock, whose projections are 1×1 convs.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_TOP = ("embeddings", "encoder", "final_layer_norm")
#: transformers' CLIP encoder layer → OpenCLIP's residual block (q, k, v are fused apart from these).
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _vae_names(vae: AutoencoderKL) -> dict[str, str]:
    """diffusers module path → LDM module path (relative to ``first_stage_model.``)."""
    names = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}
    names |= {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            alias(names, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if block.downsamplers:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    # LDM numbers the decoder's levels by resolution, so its up.0 is the last level applied: reversed order.
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j in range(len(block.resnets)):
            alias(names, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if block.upsamplers:
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    for side in ("encoder", "decoder"):
        mid = getattr(vae, side).mid_block
        for j in range(len(mid.resnets)):
            alias(names, f"{side}.mid_block.resnets.{j}", f"{side}.mid.block_{j + 1}", _VAE_RESNET)
        for j in range(len(mid.attentions)):
            alias(names, f"{side}.mid_block.attentions.{j}", f"{side}.mid.attn_{j + 1}", _VAE_ATTENTION)
    return names


def _rename(state: dict[str, Tensor], names: dict[str, str], prefix: str, part: str) -> dict[str, Tensor]:
    """Move every parameter to its LDM name by its longest mapped module path; refuse any left without one."""
    out = {}
    for key, tensor in state.items():
        name = ldm_path(names, key.rsplit(".", 1)[0])  # the parameter's own name is never a mapped module
        if name is None:
            raise ValueError(f"{part} parameter {key!r} has no place in a single-file checkpoint")
        out[f"{prefix}{name}.{key.rsplit('.', 1)[1]}"] = tensor
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, Tensor]:
    """The UNet's parameters under ``model.diffusion_model.`` LDM names."""
    return _rename(unet.state_dict(), unet_ldm_names(unet), UNET_PREFIX, "UNet")


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, Tensor]:
    """The VAE's parameters under ``first_stage_model.`` LDM names, attention projections as 1×1 convs."""
    state = _rename(vae.state_dict(), _vae_names(vae), VAE_PREFIX, "VAE")
    # Only the attention projections are 2-D (Linear in diffusers); LDM stores them as (out, in, 1, 1) convs.
    return {key: t[:, :, None, None] if t.ndim == 2 else t for key, t in state.items()}


def text_encoder_to_ldm(text_encoder: CLIPTextModel, prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """The CLIP text encoder's parameters under ``prefix`` (SD 1.x: ``cond_stage_model.transformer.text_model.``)."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        # transformers 5 flattened CLIPTextModel (no ``text_model.`` level); older versions keep it.
        name = key.removeprefix("text_model.")
        if name.split(".")[0] not in _CLIP_TOP:
            raise ValueError(f"text encoder parameter {key!r} has no place in a single-file checkpoint")
        out[prefix + name] = tensor
    return out


def open_clip_to_ldm(text_encoder: CLIPTextModelWithProjection) -> dict[str, Tensor]:
    """SDXL's second text encoder in OpenCLIP's layout under ``conditioner.embedders.1.model.`` (the inverse of
    diffusers' ``convert_open_clip_checkpoint``)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in text_encoder.state_dict().items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":  # Linear (embed, width) → OpenCLIP's (width, embed) matrix
            out[OPEN_CLIP_PREFIX + "text_projection"] = tensor.T
            continue
        if name in _OPEN_CLIP_TOP:
            out[OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP[name]] = tensor
            continue
        layer, _, rest = name.removeprefix("encoder.layers.").partition(".")
        module, _, param = rest.rpartition(".")
        if not name.startswith("encoder.layers.") or module not in (*_OPEN_CLIP_LAYER, *(
                f"self_attn.{p}_proj" for p in "qkv")):
            raise ValueError(f"second text encoder parameter {key!r} has no place in an SDXL single-file checkpoint")
        if module in _OPEN_CLIP_LAYER:
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        else:
            qkv.setdefault((layer, param), {})[module[len("self_attn.")]] = tensor
    for (layer, param), parts in qkv.items():
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    return out


def to_ldm_state_dict(parts: Components) -> dict[str, Tensor]:
    """The model as one single-file state dict: SD 1.x's LDM layout, or SDXL's with both encoders and, for a
    v-prediction / zero-terminal-SNR schedule, its markers.

    The tensors are the modules' own (views, not copies), so bake or remove adapters before converting.
    """
    state = {**unet_to_ldm(parts.unet), **vae_to_ldm(parts.vae)}
    if parts.text_encoder_2 is None:
        return state | text_encoder_to_ldm(parts.text_encoder)
    state |= text_encoder_to_ldm(parts.text_encoder, SDXL_CLIP_PREFIX) | open_clip_to_ldm(parts.text_encoder_2)
    if parts.v_prediction:  # ComfyUI reads ztsnr only beside v_pred, as lycoflow.models.Pretrained does
        state[V_PRED_MARKER] = torch.tensor([])
        if parts.zero_terminal_snr:
            state[ZTSNR_MARKER] = torch.tensor([])
    return state


def save_single_file(path: str | os.PathLike, parts: Components, dtype: torch.dtype | None = None) -> Path:
    """Write the model as one single-file ``.safetensors`` checkpoint (`to_ldm_state_dict`), atomically.

    Args:
        path: the file to write; its folder is created if missing.
        parts: the model (SD 1.x or SDXL).
        dtype: cast floating-point tensors to this (e.g. ``torch.float16``, as most shared checkpoints);
            default: keep each tensor's dtype.

    Returns:
        ``path``.
    """
    path = Path(path)
    state = {}
    for key, tensor in to_ldm_state_dict(parts).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()  # safetensors refuses strided views (e.g. a transposed parameter)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
