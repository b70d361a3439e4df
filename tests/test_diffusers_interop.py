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


DIFFUSERS_DORA = ("diffusers drops every dora_scale key of an SD 1.x file ('a DoRA checkpoint that is not compatible "
                  "in Diffusers at the moment'; loaders/lora_pipeline.py StableDiffusionLoraLoaderMixin."
                  "lora_state_dict) and runs the plain LoRA, in either orientation")


@pytest.mark.parametrize(("name", "strategy"), [
    ("lora", lycoris.LoRA(dim=4, alpha=2, preset="attn-mlp")),
    # 3x3 resnet convs too; not the block norms `full` also trains: diffusers refuses w_norm/b_norm keys.
    ("locon", lycoris.LoRA(dim=4, alpha=2, conv_dim=2, conv_alpha=1, preset="full", train_norm=False)),
    *[pytest.param(name, strategy, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=DIFFUSERS_DORA))
      for name, strategy in [
          ("dora", lycoris.LoRA(dim=4, alpha=2, weight_decompose=True, preset="attn-mlp")),
          ("dora_on_output", lycoris.LoRA(dim=4, alpha=2, weight_decompose=True, dora_on_output=True,
                                          preset="attn-mlp"))]],
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


@pytest.mark.parametrize("strategy", [
    cls(preset="attn-mlp", **kw) for cls, kw in [
        (lycoris.LoHa, {}), (lycoris.LoKr, {"factor": 4, "dim": 10000}), (lycoris.GLoRA, {}), (lycoris.OFT, {}),
        (lycoris.BOFT, {}), (lycoris.IA3, {}), (lycoris.Full, {})]
], ids=lambda s: type(s).__name__)
@torch.no_grad()
def test_diffusers_refuses_the_other_algorithms(tmp_path, strategy):
    """SD 1.x's load_lora_weights converts lora_down/lora_up keys only (loaders/lora_conversion_utils.py
    _convert_non_diffusers_lora_to_diffusers): any other file is refused with an error, never loaded wrong."""
    pipe = tiny_pipeline(tmp_path)
    net = strategy.apply(copy.deepcopy(pipe.unet), "lora_unet")
    for p in net.parameters():
        p.add_(0.05)
    lycoris.save_file(tmp_path / "other.safetensors", {"lora_unet": net})
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        pipe.load_lora_weights(str(tmp_path), weight_name="other.safetensors")
