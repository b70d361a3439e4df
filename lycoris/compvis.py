"""diffusers UNet module paths → the original (CompVis/LDM) ones: ``down_blocks.1.attentions.0`` →
``input_blocks.4.1``, ``add_embedding.linear_1`` → ``label_emb.0.0``.

LDM's ``openaimodel.UNetModel`` keeps the down and up paths as flat lists of blocks; single-file checkpoints and
the SDXL adapter files that kohya's sd-scripts writes (and ComfyUI, A1111 and Forge read) use its names. The map is
derived from the modules themselves (how many blocks, resnets per block, where attention sits), so any
UNet2DConditionModel of the SD family converts, the tiny ones included.
"""

from __future__ import annotations

from torch import nn

#: diffusers ResnetBlock2D parameter → LDM ResBlock names.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def alias(names: dict[str, str], module: str, ldm: str, children: dict[str, str]) -> None:
    for child, ldm_child in children.items():
        names[f"{module}.{child}"] = f"{ldm}.{ldm_child}"


def unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path → LDM module path (relative to ``model.diffusion_model.``)."""
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's text-time embedding (pooled text + size/crop numbers) is LDM's label_emb.
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    # LDM keeps the down path as one flat list: each resnet (with its attention, if the block has any)
    # is one input block, each downsampler another.
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            alias(names, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET)
            if j < len(attentions):
                names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    # The middle block alternates resnet, attention, resnet.
    for j in range(len(unet.mid_block.resnets)):
        alias(names, f"mid_block.resnets.{j}", f"middle_block.{2 * j}", UNET_RESNET)
    for j in range(len(unet.mid_block.attentions)):
        names[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    # Up path: one output block per resnet; the upsampler joins the block's last one, after its attention.
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            alias(names, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET)
            if j < len(attentions):
                names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if block.upsamplers:
            names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attentions else 1}.conv"
    return names


def ldm_path(names: dict[str, str], path: str) -> str | None:
    """``path`` (a module or parameter) under its longest mapped module prefix's LDM name; None if none maps."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in names:
            return ".".join([names[module], *parts[cut:]])
    return None
