"""Files we write load in diffusers (`StableDiffusionPipeline.load_lora_weights`, kohya-key converter + peft)
and give the same outputs as our wrapped model."""

import copy
import json

import pytest
import torch

import lycoris
from lycoflow.tiny import tiny_text_encoder, tiny_unet

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")


def tiny_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(),
        tokenizer=CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")),
        unet=tiny_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


@pytest.mark.parametrize(("name", "strategy"), [
    ("lora", lycoris.LoRA(dim=4, alpha=2, preset="attn-mlp")),
    ("locon", lycoris.LoRA(dim=4, alpha=2, conv_dim=2, conv_alpha=1, preset="full")),  # 3x3 resnet convs too
])
@torch.no_grad()
def test_our_file_loads_in_diffusers_with_identical_outputs(tmp_path, name, strategy):
    pipe = tiny_pipeline(tmp_path)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    nets = {"lora_unet": strategy.apply(unet, "lora_unet"), "lora_te": strategy.apply(text_encoder, "lora_te")}
    gen = torch.Generator().manual_seed(1)
    for net in nets.values():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    if name == "locon":
        assert any(a.name.endswith("resnets_0_conv1") for a in nets["lora_unet"].adapters())
    lycoris.save_file(tmp_path / f"{name}.safetensors", nets)

    latents, text = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 7, 32, generator=gen)
    t = torch.tensor([10])
    ids = torch.tensor([[0, 2, 3, 1]])
    base_unet = pipe.unet(latents, t, encoder_hidden_states=text).sample
    base_te = pipe.text_encoder(ids).last_hidden_state
    ours_unet = unet(latents, t, encoder_hidden_states=text).sample
    ours_te = text_encoder(ids).last_hidden_state
    assert (ours_unet - base_unet).abs().max() > 1e-3 and (ours_te - base_te).abs().max() > 1e-3

    pipe.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors")
    torch.testing.assert_close(pipe.unet(latents, t, encoder_hidden_states=text).sample, ours_unet,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ours_te, atol=1e-5, rtol=1e-5)

    # Strength: diffusers' fused lora_scale equals our multiplier.
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    nets["lora_unet"].multiplier = 0.5
    torch.testing.assert_close(pipe.unet(latents, t, encoder_hidden_states=text).sample,
                               unet(latents, t, encoder_hidden_states=text).sample, atol=1e-5, rtol=1e-5)
