"""The SDXL family's base model: the tiny SDXL built from config, loaded through the same code as real SDXL, and its
UNet in the LDM (compvis) layout that single files and the UIs' adapter keys use."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection

import lycoris
from lycoflow.data import HierarchicalDataModule, load_rgb, to_tensor
from lycoflow.evaluation.sampling import Sampler, sample
from lycoflow.models import Pretrained
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import EOS, TinySD, TinySDXL, save_tiny_sdxl, tiny_sdxl_components
from lycoflow.tools.convert import UNET_PREFIX, unet_to_ldm
from lycoflow.tools.generate import generate
from lycoflow.tools.merge import merge
from lycoris.targeting import lycoris_name


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


def _coordinate_images(root, sizes):
    """Images whose red channel is each pixel's x and green its y: a crop's corner can be read off its pixels."""
    (root / "c" / "k").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)).save(root / "c" / "k" / f"{i}.png")
    return root


@pytest.mark.parametrize("bucketing", [False, True])
def test_each_samples_size_conditioning_is_its_true_size_and_crop(tmp_path, tiny_sd_folder, bucketing):
    """Per sample and draw: the original (h, w) is the file's, the target the trained pixels', and the crop's
    top-left, read back from the trained pixels of coordinate-coded images (mirrored or not), is the one given,
    in the image resized to cover the target (rounded: within 1.5 px); cached latents (centre crops) get the
    centre crop's numbers."""
    sizes = [(200, 120), (120, 200), (160, 160), (250, 100)]
    root = _coordinate_images(tmp_path / "data", sizes)
    options = {"resolution": 64, "batch_size": 1, "caption_dropout": 0.0, "flip": True, "seed": 0,
               "bucketing": bucketing, "min_bucket_resolution": 32, "max_bucket_resolution": 128, "bucket_step": 32}
    dm = HierarchicalDataModule(str(root), center_crop=False, **options)
    dm.setup("fit")
    seen = set()
    for index, image in enumerate(dm.dataset.samples):
        w, h = image.size
        for seed in range(8):
            item = dm.dataset[(index, seed)]
            numbers, pixels = item["add_time_ids"].tolist(), (item["pixel_values"] + 1) * 127.5
            th, tw = pixels.shape[1:]
            assert numbers[0:2] == [h, w] and numbers[4:] == [th, tw]
            scale = max(tw / w, th / h)  # the image resized to cover the target
            flipped = bool(pixels[0, 0, 0] > pixels[0, 0, -1])
            top = float(pixels[1, 0, 0]) * scale
            left = (w - float(pixels[0, 0, 0]) - 1) * scale if flipped else float(pixels[0, 0, 0]) * scale
            assert abs(numbers[2] - top) <= 1.5 and abs(numbers[3] - left) <= 1.5, (image.size, seed, numbers)
            seen.add((flipped, numbers[2] + numbers[3] > 0))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}  # mirrored, cropped, both, neither

    centred = HierarchicalDataModule(str(root), center_crop=True, **options)
    centred.setup("fit")
    cached = HierarchicalDataModule(str(root), center_crop=True, cache_latents=True, cache_dir=str(tmp_path / "cache"),
                                    **options)
    cached.setup("fit")
    cached.cache_encodings(DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4),
                                             train_text_encoder=True))
    for index in range(len(sizes)):
        for seed in range(4):
            a, b = centred.dataset[(index, seed)], cached.dataset[(index, seed)]
            assert "latent_parameters" in b and torch.equal(a["add_time_ids"], b["add_time_ids"])



def test_fitting_an_sdxl_base_is_refused_with_a_message_not_a_traceback(sdxl_folder):
    with pytest.raises(ValueError, match="is an SDXL model: lycoflow samples from SDXL but does not fine-tune it yet"):
        DiffusionFinetune(TinySDXL(folder=str(sdxl_folder)), lycoris.LoRA(dim=4))


def _ldm_truth(unet) -> dict[str, str]:
    """diffusers layer path → its LDM path, read off diffusers' own LDM → diffusers conversion (which tensor went
    where), not from lycoflow's map."""
    ldm = unet_to_ldm(unet)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    source = {id(tensor): key for key, tensor in ldm.items()}
    return {key.removesuffix(".weight"): source[id(back[key])][len(UNET_PREFIX):].removesuffix(".weight")
            for key in back if key.endswith(".weight")}


def test_sdxl_unet_adapters_are_named_by_their_ldm_paths_and_load_in_either_spelling(tmp_path):
    """Every adapted layer of the tiny SDXL UNet (preset full, norms too) is written as ``lora_unet_<LDM path>``,
    the spelling kohya's sd-scripts writes for SDXL; a file in diffusers names loads to the same weights."""
    unet = tiny_sdxl_components(seed=0).unet
    truth = _ldm_truth(unet)
    torch.manual_seed(0)
    net = lycoris.LoRA(dim=4, preset="full", train_norm=True).apply(unet, prefix="lora_unet")
    paths = {lycoris_name("lora_unet", diffusers): ldm for diffusers, ldm in truth.items()}
    names = dict(net.named_children())
    assert len(names) > 100
    assert "lora_unet_output_blocks_2_2_conv" in names and "lora_unet_time_embed_0" in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    by_ldm = {lycoris_name("lora_unet", ldm) for ldm in paths.values()}
    assert set(names) <= by_ldm, sorted(set(names) - by_ldm)[:5]
    for adapter in names.values():  # something to compare: the up factors start at zero
        for p in adapter.parameters():
            torch.nn.init.normal_(p)
    file = lycoris.save_file(tmp_path / "xl.safetensors", {"lora_unet": net})
    written = load_file(file)
    assert all(k.split(".")[0] in by_ldm for k in written)
    net.remove()

    ldm_to_diffusers = {lycoris_name("lora_unet", ldm): lycoris_name("lora_unet", d) for d, ldm in truth.items()}
    save_file({f"{ldm_to_diffusers[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in written.items()},
              tmp_path / "diffusers-names.safetensors")
    for spelling in ("xl.safetensors", "diffusers-names.safetensors"):
        fresh = tiny_sdxl_components(seed=0).unet
        loaded = lycoris.load_file(tmp_path / spelling, {"lora_unet": fresh})["lora_unet"]
        assert set(dict(loaded.named_children())) == set(names), spelling
        again = lycoris.save_file(tmp_path / f"again-{spelling}", {"lora_unet": loaded})
        got = load_file(again)
        assert got.keys() == written.keys() and all(torch.equal(got[k], written[k]) for k in written), spelling
        loaded.remove()


def test_sd1_adapter_names_stay_diffusers_paths():
    from lycoflow.tiny import tiny_unet

    net = lycoris.LoRA(dim=4, preset="full").apply(tiny_unet(seed=0), prefix="lora_unet")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in dict(net.named_children())
    assert not any("input_blocks" in name for name, _ in net.named_children())


def test_an_sdxl_adapter_file_generates_and_merges(sdxl_folder, tmp_path):
    """A LoRA on the tiny SDXL's UNet and both text encoders, saved under kohya's SDXL names (``lora_unet_`` LDM
    paths, ``lora_te1_``, ``lora_te2_``): `lycoflow generate` draws with it what the attached model draws, and
    `lycoflow merge` bakes it into an SDXL diffusers folder that draws the same."""
    parts = Pretrained(str(sdxl_folder)).load()
    torch.manual_seed(0)
    networks = {prefix: lycoris.LoRA(dim=4).apply(model, prefix=prefix) for prefix, model in parts.adaptable().items()}
    for net in networks.values():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
    file = lycoris.save_file(tmp_path / "xl.safetensors", networks)
    prefixes = {"_".join(key.split("_")[:2]) for key in load_file(file)}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    sampler = Sampler(scheduler=DDIMScheduler, steps=3, guidance_scale=4.0, resolution=64)
    prompts = ["a red circle", "a blue square"]
    attached = sample(parts, prompts, [0, 1], sampler)
    for net in networks.values():
        net.remove()
    plain = sample(parts, prompts, [0, 1], sampler)
    assert (attached - plain).abs().max() > 0.05  # the adapter changes the images

    rows = generate(str(sdxl_folder), prompts, tmp_path / "gen", adapters=[(file, 1.0)], sampler=sampler,
                    device="cpu", progress=False)
    drawn = torch.stack([(to_tensor(load_rgb(tmp_path / "gen" / r["file"])) + 1) / 2 for r in rows])
    torch.testing.assert_close(drawn, attached, atol=1 / 255 + 1e-4, rtol=0)  # 8-bit PNGs

    out, changed = merge(str(sdxl_folder), adapters=[(file, 1.0)], out_diffusers=tmp_path / "merged", dtype="float32")
    assert set(changed) == {"lora_unet", "lora_te1", "lora_te2"} and all(changed.values())
    merged = Pretrained(str(out)).load()
    assert merged.is_sdxl
    torch.testing.assert_close(sample(merged, prompts, [0, 1], sampler), attached, atol=1e-4, rtol=0)
