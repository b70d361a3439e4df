"""Tiny Stable-Diffusion-1.x-architecture parts built from config under a fixed seed.

Same module layout and names as SD 1.5 (so presets, file keys and loaders behave as on the real model),
with a few thousand times fewer parameters: what tests, the demo and benchmarks run on without a network.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A (32, 64)-channel UNet2DConditionModel with SD 1.x blocks (cross-attention, 1×1 conv proj_in)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, vocab_size: int = 1000) -> CLIPTextModel:
    """A 2-layer CLIP text encoder (transformers' CLIPTextModel, as in SD 1.x)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)
