"""The tiny SD-1.x-architecture models the LyCORIS-library fixtures were made on (tests/fixtures/lycoris_lib/sd_tiny*/),
rebuilt deterministically. Imports neither ``lycoris`` package: the fixtures' generator scripts import it beside the
LyCORIS library (whose import package is also called ``lycoris``), the tests beside ours."""

from __future__ import annotations

import math
import zlib

import torch


def reinit_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter a pure function of its name, as when the fixtures were made (so that neither torch's
    default initialisation nor the order modules are built in matters): u ~ U(-1, 1) from a CPU generator
    seeded with crc32(name); matrices/kernels u/sqrt(fan_in), biases 0.1u, norm weights 1 + 0.1u."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            u = torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1
            if p.dim() >= 2:
                p.copy_(u / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * u)
            else:
                p.copy_(1 + 0.1 * u)
    return model


def build_models():
    """(UNet2DConditionModel, CLIPTextModel), SD 1.x block layout and module names, channels (32, 64), a 2-layer
    32-wide text encoder, in eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    return reinit_(unet).eval(), reinit_(te).eval()
