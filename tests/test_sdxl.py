"""The SDXL family's base model: the tiny SDXL built from config, loaded through the same code as real SDXL, and its
UNet in the LDM (compvis) layout that single files and the UIs' adapter keys use."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from transformers import CLIPTextModelWithProjection

from lycoflow.models import Pretrained
from lycoflow.tiny import EOS, TinySDXL, save_tiny_sdxl, tiny_sdxl_components
from lycoflow.tools.convert import UNET_PREFIX, unet_to_ldm


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


def test_the_tiny_sdxl_has_sdxls_layout():
    parts = tiny_sdxl_components(seed=0)
    assert parts.is_sdxl and parts.version == "sdxl_base_v1-0"
    config = parts.unet.config
    assert config.addition_embed_type == "text_time" and config.use_linear_projection
    assert config.cross_attention_dim == parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + \
        parts.text_encoder_2.config.projection_dim
    assert not hasattr(parts.unet.down_blocks[0], "attentions")  # SDXL's first level has no attention
    assert len(parts.unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
    # The real CLIP tokenizer twice: the first pads with the end token, the second with "!" (SDXL's tokenizer_2).
    ids = parts.tokenizer("a photo of a cat", padding="max_length", max_length=10).input_ids
    ids_2 = parts.tokenizer_2("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert ids[:7] == ids_2[:7] == [49406, 320, 1125, 539, 320, 2368, EOS]
    assert ids[7:] == [EOS] * 3 and ids_2[7:] == [0] * 3
    assert parts.vae.config.scaling_factor == 0.13025
    assert not torch.equal(parts.text_encoder.get_input_embeddings().weight,
                           parts.text_encoder_2.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="both text_encoder_2 and tokenizer_2"):
        type(parts)(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler,
                    text_encoder_2=parts.text_encoder_2)


def test_an_sdxl_folder_is_recognised_and_loads_in_diffusers_too(sdxl_folder, tmp_path):
    built, loaded = tiny_sdxl_components(seed=0), Pretrained(str(sdxl_folder)).load()
    assert loaded.is_sdxl and isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    # Without model_index.json the second encoder's folder says it.
    (sdxl_folder / "model_index.json").rename(tmp_path / "index")
    try:
        assert Pretrained(str(sdxl_folder)).load().is_sdxl
    finally:
        (tmp_path / "index").rename(sdxl_folder / "model_index.json")
    # diffusers' own SDXL pipeline reads the folder and runs.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert TinySDXL(folder=str(sdxl_folder)).load().is_sdxl


def test_the_sdxl_unet_converts_to_ldm_names_that_diffusers_reads_back():
    """Every parameter gets its LDM name (``label_emb.0.0`` for the text-time embedding, two resnets and multi-layer
    transformers per level), and diffusers' own LDM → diffusers conversion gives back the same state dict."""
    unet = tiny_sdxl_components(seed=0).unet
    ldm = unet_to_ldm(unet)
    assert f"{UNET_PREFIX}label_emb.0.0.weight" in ldm and f"{UNET_PREFIX}label_emb.0.2.weight" in ldm
    assert f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    assert f"{UNET_PREFIX}input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in ldm
    # SDXL's first up level has attention, so its upsampler follows it: output_blocks.2.2 (A1111's diffusers-name
    # rule puts it at SD 1.x's output_blocks.2.1).
    assert f"{UNET_PREFIX}output_blocks.2.2.conv.weight" in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    state = unet.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sampling_the_tiny_sdxl_gives_diffusers_own_sdxl_pipeline_images(sdxl_folder):
    """Conditioning as SDXL's: both encoders' penultimate states side by side, the second's pooled projection, the
    size numbers (64, 64, 0, 0, 64, 64); same noise, scheduler and guidance as `StableDiffusionXLPipeline`."""
    from diffusers import DDIMScheduler

    from lycoflow.evaluation.sampling import Sampler, sample

    parts = Pretrained(str(sdxl_folder)).load()
    prompts, seeds = ["a red circle on a white background", "a blue square"], [3, 4]
    sampler = Sampler(scheduler=DDIMScheduler, steps=5, guidance_scale=4.0, resolution=64)
    ours = sample(parts, prompts, seeds, sampler)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    theirs = pipe(prompts, negative_prompt=["", ""], num_inference_steps=5, guidance_scale=4.0, height=64, width=64,
                  latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    states, pooled = parts.encode_prompt(prompts)
    assert states.shape == (2, 77, 64) and pooled.shape == (2, 32)
    with pytest.raises(ValueError, match="pooled text and the six size numbers"):
        parts.unet_conditioning(states, pooled, None)
