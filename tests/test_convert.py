"""lycoflow.tools.convert: a tiny SD 1.x model written as an LDM single file loads back through diffusers unchanged."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file
from torch import nn

from lycoflow.tiny import save_tiny_sd, tiny_components, tiny_unet
from lycoflow.tools.convert import save_single_file, text_encoder_to_ldm, unet_to_ldm


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny model's parts, its single file, and the pipeline diffusers loads from that file."""
    tmp = tmp_path_factory.mktemp("convert")
    folder = save_tiny_sd(tmp / "tiny-sd", seed=0)  # only its configs are read: the weights come from the file
    parts = tiny_components(seed=0)
    file = save_single_file(tmp / "out" / "tiny.safetensors", parts)
    pipe = StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False,
    )
    return parts, file, pipe


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_every_weight_loads_back(model, part):
    parts, _, pipe = model
    original, loaded = getattr(parts, part).state_dict(), getattr(pipe, part).state_dict()
    assert loaded.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(loaded[key], tensor), key


@torch.no_grad()
def test_outputs_match(model):
    parts, _, pipe = model
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 700])
    torch.testing.assert_close(pipe.unet(latents, t, cond).sample, parts.unet(latents, t, cond).sample,
                               atol=1e-5, rtol=0)

    image = torch.randn(1, 3, 32, 32, generator=g)
    torch.testing.assert_close(pipe.vae.encode(image).latent_dist.parameters,
                               parts.vae.encode(image).latent_dist.parameters, atol=1e-5, rtol=0)
    z = torch.randn(1, 4, 4, 4, generator=g)
    torch.testing.assert_close(pipe.vae.decode(z).sample, parts.vae.decode(z).sample, atol=1e-5, rtol=0)

    ids = torch.randint(0, len(parts.tokenizer), (2, 12), generator=g)
    ours, theirs = pipe.text_encoder(ids), parts.text_encoder(ids)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=0)


def test_layout_is_ldm_sd_v1(model):
    parts, file, _ = model
    state = load_file(file)
    assert {key.split(".")[0] for key in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for key in state)
    n_params = sum(len(getattr(parts, p).state_dict()) for p in ("unet", "vae", "text_encoder"))
    assert len(state) == n_params == 208 + 184 + 36
    assert infer_diffusers_model_type(state) == "v1"


def test_sd15_key_names(model):
    """Names (and the VAE attention's 1×1-conv shapes) as in v1-5-pruned-emaonly.safetensors."""
    state = load_file(model[1])
    for key in [
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.middle_block.0.emb_layers.1.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after a block without attention
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.norm3.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.block_2.conv2.weight",
        "first_stage_model.encoder.norm_out.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.norm.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in state, key
    for side in ("encoder", "decoder"):
        for proj in ("q", "k", "v", "proj_out"):
            assert state[f"first_stage_model.{side}.mid.attn_1.{proj}.weight"].shape == (32, 32, 1, 1)
    # The decoder's highest-resolution level (diffusers' last up block) is LDM's up.0: 16 → 8 channels.
    assert state["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)


def test_dtype_and_no_leftovers(model, tmp_path):
    parts = model[0]
    file = save_single_file(tmp_path / "half.safetensors", parts, dtype=torch.float16)
    assert {t.dtype for t in load_file(file).values()} == {torch.float16}
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]


def test_text_model_level_either_way(model):
    """transformers < 5 nests CLIPTextModel's parameters under ``text_model.``; the file's names are the same."""
    text_encoder = model[0].text_encoder
    nested = nn.Module()
    nested.text_model = text_encoder
    assert text_encoder_to_ldm(nested).keys() == text_encoder_to_ldm(text_encoder).keys()


def test_unplaceable_parameter_raises():
    """A parameter the layout has no name for (e.g. an adapter not baked in) is an error, not silently dropped."""
    unet = tiny_unet(seed=0)
    unet.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="'extra'"):
        unet_to_ldm(unet)
