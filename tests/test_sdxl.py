"""The SDXL family's base model: the tiny SDXL built from config, loaded through the same code as real SDXL, and its
UNet in the LDM (compvis) layout that single files and the UIs' adapter keys use."""

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_fit import RECIPES, WITHOUT_EVALUATION, fit
from transformers import CLIPTextModelWithProjection

import lycoris
from lycoflow.data import HierarchicalDataModule, load_rgb, to_tensor
from lycoflow.evaluation.sampling import Sampler, sample
from lycoflow.lightning_cli import run_lightning
from lycoflow.models import BaseModelError, Components, Pretrained
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import EOS, TinySD, TinySDXL, tiny_sdxl_components
from lycoflow.tools.convert import UNET_PREFIX, save_single_file, unet_to_ldm
from lycoflow.tools.generate import generate
from lycoflow.tools.merge import merge
from lycoris.targeting import lycoris_name


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


def test_an_sdxl_folder_is_recognised_and_loads_in_diffusers_too(tiny_sdxl_folder, tmp_path):
    built, loaded = tiny_sdxl_components(seed=0), Pretrained(str(tiny_sdxl_folder)).load()
    assert loaded.is_sdxl and isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    # Without model_index.json the second encoder's folder says it.
    (tiny_sdxl_folder / "model_index.json").rename(tmp_path / "index")
    try:
        assert Pretrained(str(tiny_sdxl_folder)).load().is_sdxl
    finally:
        (tmp_path / "index").rename(tiny_sdxl_folder / "model_index.json")
    # diffusers' own SDXL pipeline reads the folder and runs.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert TinySDXL(folder=str(tiny_sdxl_folder)).load().is_sdxl


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


def test_sampling_the_tiny_sdxl_gives_diffusers_own_sdxl_pipeline_images(tiny_sdxl_folder):
    """Conditioning as SDXL's: both encoders' penultimate states side by side, the second's pooled projection, the
    size numbers (64, 64, 0, 0, 64, 64); same noise, scheduler and guidance as `StableDiffusionXLPipeline`."""
    parts = Pretrained(str(tiny_sdxl_folder)).load()
    prompts, seeds = ["a red circle on a white background", "a blue square"], [3, 4]
    sampler = Sampler(scheduler=DDIMScheduler, steps=5, guidance_scale=4.0, resolution=64)
    ours = sample(parts, prompts, seeds, sampler)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    theirs = pipe(prompts, negative_prompt=["", ""], num_inference_steps=5, guidance_scale=4.0, height=64, width=64,
                  latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    states, pooled = parts.encode_prompt(prompts)
    assert states.shape == (2, 77, 32 + 48) and pooled.shape == (2, 32)
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
    assert "lora_unet_label_emb_0_0" in names and "lora_unet_label_emb_0_2" in names  # full: the text-time one too
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


def test_an_sdxl_adapter_file_generates_and_merges(tiny_sdxl_folder, tmp_path):
    """A LoRA on the tiny SDXL's UNet and both text encoders, saved under kohya's SDXL names (``lora_unet_`` LDM
    paths, ``lora_te1_``, ``lora_te2_``): `lycoflow generate` draws with it what the attached model draws, and
    `lycoflow merge` bakes it into an SDXL diffusers folder and an SDXL single file that draw the same."""
    parts = Pretrained(str(tiny_sdxl_folder)).load()
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

    rows = generate(str(tiny_sdxl_folder), prompts, tmp_path / "gen", adapters=[(file, 1.0)], sampler=sampler,
                    device="cpu", progress=False)
    drawn = torch.stack([(to_tensor(load_rgb(tmp_path / "gen" / r["file"])) + 1) / 2 for r in rows])
    torch.testing.assert_close(drawn, attached, atol=1 / 255 + 1e-4, rtol=0)  # 8-bit PNGs

    out, changed = merge(str(tiny_sdxl_folder), adapters=[(file, 1.0)], out_diffusers=tmp_path / "merged",
                         dtype="float32")
    assert set(changed) == {"lora_unet", "lora_te1", "lora_te2"} and all(changed.values())
    merged = Pretrained(str(out)).load()
    assert merged.is_sdxl
    torch.testing.assert_close(sample(merged, prompts, [0, 1], sampler), attached, atol=1e-4, rtol=0)
    # And into one SDXL single file, the kind A1111 and ComfyUI load.
    single, _ = merge(str(tiny_sdxl_folder), adapters=[(file, 1.0)], out_file=tmp_path / "merged.safetensors",
                      dtype="float32")
    assert "conditioner.embedders.1.model.text_projection" in load_file(single)
    merged = Pretrained(str(single), config=str(tiny_sdxl_folder)).load()
    torch.testing.assert_close(sample(merged, prompts, [0, 1], sampler), attached, atol=1e-4, rtol=0)


# -- fitting SDXL ------------------------------------------------------------------------------------------------
OVERLAY = "recipes/sdxl.yaml"
QUICK = ("--model.lr=1e-3", "--model.warmup_steps=0", "--trainer.logger=false", WITHOUT_EVALUATION)


# The default run instantiates the quickstart's algorithm; the slow run (CI) every recipe.
@pytest.mark.parametrize("recipe", [r if r.stem == "lokr" else pytest.param(r, marks=pytest.mark.slow)
                                    for r in RECIPES], ids=lambda p: p.stem)
def test_every_recipe_with_the_sdxl_overlay_instantiates_on_the_tiny_sdxl(recipe, tiny_sdxl):
    cli = run_lightning(["fit", str(recipe), OVERLAY, *tiny_sdxl, "--trainer.logger=false"], run=False)
    model = cli.model
    assert isinstance(model.base_source, TinySDXL) and model.base_version == "sdxl_base_v1-0"
    assert set(model.networks) == {"lora_unet", "lora_te1", "lora_te2"}
    assert all(len(net.adapters()) for net in model.networks.values())
    # The overlay's memory settings, and the recipe's algorithm kept.
    assert model.unet.dtype == model.text_encoder_2.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    assert model.unet.is_gradient_checkpointing and model.text_encoder_2.is_gradient_checkpointing
    assert f"lycoris.{type(model.adapter).__name__}" == yaml.safe_load(recipe.read_text())["model"]["adapter"][
        "class_path"]
    data = cli.config["fit"]["data"]["init_args"] if "fit" in cli.config else cli.config["data"]["init_args"]
    assert (data["min_bucket_resolution"], data["max_bucket_resolution"], data["bucket_step"]) == (512, 2048, 64)


def sdxl_inputs(parts):
    """A fixed batch through the model's SDXL conditioning: text states, pooled text, UNet output."""
    gen = torch.Generator().manual_seed(7)
    latents, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700])
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64], [80, 64, 8, 0, 64, 64]])
    with torch.no_grad():
        states, pooled = parts.encode_prompt(["zqx star, red", "a photo"])
        out = parts.unet(latents, t, **parts.unet_conditioning(states, pooled, sizes)).sample
    return states, pooled, out


def te_table(prefix, layers=2):
    """Every adapted text-encoder layer's file name under attn-mlp, written out: kohya's SDXL spelling."""
    return {f"{prefix}_text_model_encoder_layers_{i}_{m}" for i in range(layers) for m in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}


@pytest.mark.parametrize("name", ["lora", "lokr"])
def test_fit_on_the_tiny_sdxl_writes_a_file_that_reproduces_the_trained_unet_and_both_text_encoders(
        name, tiny_sdxl, tmp_path):
    run = tmp_path / name
    cli = fit(f"recipes/{name}.yaml", [OVERLAY, *tiny_sdxl], run, "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--model.weight_dtype=float32",
              *QUICK)
    model = cli.model.eval()
    path = run / "adapters" / "epoch=1.safetensors"
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # sd-scripts' SDXL metadata
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == ("False", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    layers = {k.partition(".")[0] for k in keys}
    assert {k for k in layers if k.startswith("lora_te1_")} == te_table("lora_te1")
    assert {k for k in layers if k.startswith("lora_te2_")} == te_table("lora_te2")
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in layers  # LDM names for SDXL's UNet
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in layers)

    trained = sdxl_inputs(model.components)
    length = {"max_token_length": model.max_token_length}  # the recipes' 150
    base = sdxl_inputs(replace(tiny_sdxl_components(seed=0), **length))
    for got, was in zip(trained, base):  # training moved the UNet and both encoders (the pooled text: CLIP-G)
        assert (got - was).abs().max() > 1e-5
    exact = model.save_adapter(tmp_path / "exact.safetensors", dtype="float32")
    for file, tol in ((exact, 1e-5), (path, 2e-3)):
        fresh = replace(TinySDXL(folder=str(model.base_source.folder)).load(), **length)
        networks = lycoris.load_file(file, fresh.adaptable())
        assert set(networks) == {"lora_unet", "lora_te1", "lora_te2"}
        for got, want in zip(sdxl_inputs(fresh), trained):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.slow  # 30 s: the SD 1.x resume tests cover the same machinery by default
def test_resume_on_the_tiny_sdxl_continues_exactly(tiny_sdxl, tmp_path, caplog):
    common = ("recipes/tiny.yaml", [OVERLAY, *tiny_sdxl])
    opts = ("--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--trainer.logger=false", "--data.init_args.caption_dropout=0.3", "--data.init_args.flip=true",
            "--data.init_args.center_crop=false", "--model.weight_dtype=float32")
    straight = fit(*common, tmp_path / "straight", *opts)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(*common, tmp_path / "resumed", *opts, "--trainer.callbacks+=test_fit.Crash")
    caplog.clear()
    resumed = fit(*common, tmp_path / "resumed", *opts, "--ckpt_path=last")
    assert "Restored all states from the checkpoint" in caplog.text
    assert resumed.trainer.global_step == straight.trainer.global_step == 9
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert a.keys() == b.keys() and any(k.startswith("networks.lora_te2.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_each_part_takes_its_own_strategy_and_rate(tiny_sdxl_folder):
    model = DiffusionFinetune(TinySDXL(folder=str(tiny_sdxl_folder)), lycoris.LoKr(factor=4, preset="attn-only"),
                              text_encoder_adapter=lycoris.LoRA(dim=2), text_encoder_2_adapter=lycoris.LoHa(dim=2),
                              lr=1e-3, text_encoder_lr=1e-4, text_encoder_2_lr=1e-5)
    kinds = {prefix: {type(a).__name__ for a in net.adapters()} for prefix, net in model.networks.items()}
    assert kinds == {"lora_unet": {"LoKrAdapter"}, "lora_te1": {"LoRAAdapter"}, "lora_te2": {"LoHaAdapter"}}
    rates = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert rates == {"unet": 1e-3, "text_encoder": 1e-4, "text_encoder_2": 1e-5}
    # Unset, the second encoder follows the first.
    model = DiffusionFinetune(TinySDXL(folder=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2), text_encoder_lr=1e-4)
    assert {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}["text_encoder_2"] == 1e-4
    frozen = DiffusionFinetune(TinySDXL(folder=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2), train_text_encoder=False)
    assert set(frozen.networks) == {"lora_unet"}


def test_the_text_cache_holds_both_encoders_states_and_the_pooled_text(tiny_sdxl_folder, tiny_sd_folder,
                                                                       synthetic_root, tmp_path):
    from lycoflow.data.synthetic import SyntheticConcepts

    model = DiffusionFinetune(TinySDXL(folder=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2), train_text_encoder=False)
    dm = SyntheticConcepts(root=str(synthetic_root), resolution=64, batch_size=4, num_workers=0,
                           cache_text_encoder_outputs=True, cache_dir=str(tmp_path))
    dm.setup("fit")
    dm.cache_encodings(model)
    batch = next(iter(dm.train_dataloader()))
    want = model.text_conditioning(batch["caption"])
    assert batch["encoder_hidden_states"].shape[1:] == (77, 80) and batch["text_embeds"].shape[1:] == (32,)
    for key in ("encoder_hidden_states", "text_embeds"):
        torch.testing.assert_close(batch[key], want[key], atol=1e-6, rtol=1e-5)
    # The loss reads the cached conditioning as it would the encoders'.
    uncached = {k: v for k, v in batch.items() if k not in want}
    torch.testing.assert_close(model.denoising_loss(batch, model._generator(0, 0)),
                               model.denoising_loss(uncached, model._generator(0, 0)))
    sd1 = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=2), train_text_encoder=False)
    # SD 1.x's text-cache key is what it was before SDXL (measured on the commit before), so its entries stay found.
    assert sd1.text_identity() == "eb2e40b9cf3dbcfdc34fbf78a1ef51ca76c598b05dcce4241c83381c6f5280e7"
    assert model.text_identity() != sd1.text_identity()


def pipeline_parts(pipe):
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                      text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)


@pytest.mark.parametrize("strategy", [
    lycoris.LoRA(dim=4, alpha=2, preset="attn-mlp"),
    # The resnets' 3x3 convs, the up/down samplers and add_embedding too; not the block norms full also trains
    # (diffusers refuses w_norm/b_norm keys).
    lycoris.LoRA(dim=4, alpha=2, conv_dim=2, conv_alpha=1, preset="full", train_norm=False),
], ids=["lora", "locon"])
@torch.no_grad()
def test_an_sdxl_lora_file_loads_in_diffusers_and_diffusers_own_file_loads_back(strategy, tiny_sdxl_folder, tmp_path):
    """Our kohya-spelled SDXL file in diffusers' StableDiffusionXLPipeline.load_lora_weights gives our UNet and both
    encoders' outputs; the PEFT-format file diffusers then writes (its own spelling and alpha metadata), and the same
    file in SimpleTuner's ``lycoris_`` spelling (CLIP-L as ``lora_te_``), load here to the same model."""
    from peft.utils import get_peft_model_state_dict

    parts = TinySDXL(folder=str(tiny_sdxl_folder)).load()
    base = sdxl_inputs(parts)
    nets = {prefix: strategy.apply(module, prefix) for prefix, module in parts.adaptable().items()}
    gen = torch.Generator().manual_seed(1)
    for net in nets.values():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ours = sdxl_inputs(parts)
    for got, was in zip(ours, base):
        assert (got - was).abs().max() > 1e-3
    file = lycoris.save_file(tmp_path / "xl.safetensors", nets)
    if strategy.conv_dim:
        assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in load_file(file)  # A1111 misses its diffusers name

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    pipe.load_lora_weights(str(file))
    for got, want in zip(sdxl_inputs(pipeline_parts(pipe)), ours):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    layers = {part: get_peft_model_state_dict(getattr(pipe, part), adapter_name="default_0")
              for part in ("unet", "text_encoder", "text_encoder_2")}
    settings = {part: getattr(pipe, part).peft_config["default_0"].to_dict() for part in layers}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft", **{f"{part}_lora_layers": v for part, v in layers.items()},
        **{f"{part}_lora_adapter_metadata": v for part, v in settings.items()})
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    written = load_file(peft_file)
    assert any(k.startswith("unet.down_blocks.") and k.endswith(".lora_A.weight") for k in written)
    assert any(k.startswith("text_encoder_2.") for k in written)
    # SimpleTuner's LyCORIS spelling: the UNet's diffusers paths after "lycoris_"; and CLIP-L as SD 1.x's lora_te_.
    to_diffusers = {lycoris_name("lora_unet", ldm): lycoris_name("lycoris", d)
                    for d, ldm in _ldm_truth(parts.unet).items()}
    respelled = {f"{to_diffusers.get(k.split('.')[0], k.split('.')[0])}.{k.split('.', 1)[1]}".replace(
        "lora_te1_", "lora_te_"): v for k, v in load_file(file).items()}
    assert any(k.startswith("lycoris_up_blocks_0_upsamplers_0_conv") for k in respelled) == bool(strategy.conv_dim)
    save_file(respelled, tmp_path / "lycoris-names.safetensors")
    for spelling in (peft_file, tmp_path / "lycoris-names.safetensors"):
        fresh = TinySDXL(folder=str(tiny_sdxl_folder)).load()
        assert set(lycoris.load_file(spelling, fresh.adaptable())) == {"lora_unet", "lora_te1", "lora_te2"}
        for got, want in zip(sdxl_inputs(fresh), ours):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- single files ------------------------------------------------------------------------------------------------
def test_an_sdxl_single_file_has_sgm_layout_and_loads_back_as_sdxl(tiny_sdxl_folder, tmp_path):
    """The tiny SDXL written as one checkpoint in sd_xl_base_1.0.safetensors' layout (CLIP-G in OpenCLIP's names, q/k/v
    fused, projection transposed) is read as SDXL from its keys, every weight back, epsilon-prediction."""
    parts = Pretrained(str(tiny_sdxl_folder)).load()
    file = save_single_file(tmp_path / "xl.safetensors", parts)
    state = load_file(file)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    g = "conditioner.embedders.1.model."
    assert state[f"{g}transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert state[f"{g}text_projection"].shape == (48, 32) and state[f"{g}positional_embedding"].shape == (77, 48)
    assert f"{g}transformer.resblocks.0.mlp.c_fc.weight" in state and f"{g}ln_final.bias" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state and "v_pred" not in state
    assert sum(len(getattr(parts, p).state_dict()) for p in ("unet", "vae", "text_encoder", "text_encoder_2")) == \
        len(state) + 2 * 4  # per CLIP-G layer, the six q, k, v weights and biases are two fused tensors

    single = Pretrained(str(file), config=str(tiny_sdxl_folder)).load()
    assert single.is_sdxl and single.version == "sdxl_base_v1-0"
    assert single.scheduler.config.prediction_type == "epsilon"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(parts, name).state_dict(), getattr(single, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    for got, want in zip(sdxl_inputs(single), sdxl_inputs(parts)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_v_prediction_and_zero_terminal_snr_markers_round_trip_and_train(tiny_sdxl_folder, tiny_sd_folder, tmp_path,
                                                                         monkeypatch):
    parts = Pretrained(str(tiny_sdxl_folder)).load()
    vpred = replace(parts, scheduler=type(parts.scheduler).from_config(
        parts.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True))
    file = save_single_file(tmp_path / "noob.safetensors", vpred)
    state = load_file(file)
    assert state["v_pred"].numel() == 0 and state["ztsnr"].numel() == 0  # ComfyUI's markers: empty tensors
    single = Pretrained(str(file), config=str(tiny_sdxl_folder)).load()
    config = single.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    model = DiffusionFinetune(Pretrained(str(file), config=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2))
    assert model.prediction_type == "v_prediction" and model.noise_scheduler.alphas_cumprod[-1] < 1e-6
    meta = model.adapter_metadata("noob-lora")
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"], meta["modelspec.prediction_type"]) == (
        "True", "True", "v")
    batch = {"pixel_values": torch.zeros(2, 3, 64, 64), "caption": ["a red star", ""],
             "add_time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    assert torch.isfinite(model.denoising_loss(batch, model._generator(0, 0)))
    # min-SNR weighting stays finite at the last step, whose SNR is 0.
    weighted = DiffusionFinetune(Pretrained(str(file), config=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2),
                                 min_snr_gamma=5.0)
    last = weighted.noise_scheduler.config.num_train_timesteps - 1
    with monkeypatch.context() as patch:  # every sample's timestep drawn at the last step
        patch.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, last, device=kw.get("device")))
        assert torch.isfinite(weighted.denoising_loss(batch, weighted._generator(0, 0)))
    # The overrides win over the markers; epsilon on a zero-terminal-SNR schedule is refused.
    plain = DiffusionFinetune(Pretrained(str(file), config=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2),
                              prediction_type="epsilon", zero_terminal_snr=False)
    assert plain.prediction_type == "epsilon" and plain.noise_scheduler.alphas_cumprod[-1] > 1e-4
    with pytest.raises(ValueError, match="zero-terminal-SNR schedule needs model.prediction_type=v_prediction"):
        DiffusionFinetune(Pretrained(str(file), config=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2),
                          prediction_type="epsilon")
    # An SD 1.x file's v_pred key means nothing to ComfyUI, nor here: the file loads as it always did.
    sd1 = Pretrained(str(tiny_sd_folder)).load()
    save_file({**load_file(save_single_file(tmp_path / "sd1.safetensors", sd1)), "v_pred": torch.tensor([])},
              tmp_path / "sd1-marked.safetensors")
    assert not Pretrained(str(tmp_path / "sd1-marked.safetensors"), config=str(tiny_sd_folder)).load().v_prediction


def test_an_sdxl_refiner_file_is_refused_by_name(tmp_path):
    file = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8)}, file)
    with pytest.raises(BaseModelError, match="is an SDXL refiner checkpoint"):
        Pretrained(str(file)).load()


def test_extract_against_an_sdxl_base_gives_back_the_merged_lora(tiny_sdxl_folder, tmp_path):
    """A rank-4 LoRA merged into the tiny SDXL (UNet and both encoders), extracted at rank 4 against the base: a file
    in SDXL's names that reproduces the merged model."""
    from lycoflow.tools.extract import extract

    parts = Pretrained(str(tiny_sdxl_folder)).load()
    torch.manual_seed(0)
    networks = {prefix: lycoris.LoRA(dim=4, preset="attn-mlp").apply(model, prefix=prefix)
                for prefix, model in parts.adaptable().items()}
    for net in networks.values():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
    file = lycoris.save_file(tmp_path / "xl.safetensors", networks)
    tuned, _ = merge(str(tiny_sdxl_folder), adapters=[(file, 1.0)], out_diffusers=tmp_path / "tuned", dtype="float32")
    result = extract(str(tiny_sdxl_folder), str(tuned), tmp_path / "extracted.safetensors", rank=4,
                     preset="attn-mlp", dtype="float32", device="cpu", progress=False)
    assert result.relative_error < 1e-4 and not result.uncovered
    with safe_open(result.path, "pt") as f:
        layers, meta = {k.partition(".")[0] for k in list(f.keys())}, f.metadata()
    assert layers == {k.partition(".")[0] for k in load_file(file)}  # the same names: LDM UNet, lora_te1/te2
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.prediction_type"] == "epsilon"
    fresh = Pretrained(str(tiny_sdxl_folder)).load()
    lycoris.load_file(result.path, fresh.adaptable())
    for got, want in zip(sdxl_inputs(fresh), sdxl_inputs(Pretrained(str(tuned)).load())):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_evaluation_runs_on_an_sdxl_fit_at_the_bases_own_size(tiny_sdxl_folder, synthetic_root, tmp_path):
    """The Evaluation callback on a tiny-SDXL fit: images at the base's native size (the tiny SDXL's 64², not the
    data's 32²) and the metrics of every class, with no resolution given."""
    import lightning as L

    from callbacks import AdapterExport, Evaluation
    from lycoflow.data import SyntheticConcepts
    from lycoflow.evaluation import GenericProtocol
    from lycoflow.metrics.encoders import TinyCLIP, TinyDINOv2, TinyVGG19

    run = tmp_path / "run"
    model = DiffusionFinetune(TinySDXL(folder=str(tiny_sdxl_folder)), lycoris.LoRA(dim=2))
    data = SyntheticConcepts(root=str(synthetic_root), resolution=32, batch_size=8)
    evaluation = Evaluation(images=1, protocol=GenericProtocol(prompt_types=["trigger"]),
                            sampler=Sampler(steps=2, batch_size=16), image_encoder=TinyDINOv2(),
                            text_image_encoder=TinyCLIP(), style_encoder=TinyVGG19())
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=run,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=0,
                        callbacks=[AdapterExport(every_n_epochs=1), evaluation])
    trainer.fit(model, datamodule=data)
    images = sorted((run / "eval" / "epoch=1").rglob("*.png"))
    assert len(images) == len(data.concepts) and Image.open(images[0]).size == (64, 64)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == {c.class_name for c in data.concepts}
    assert all(math.isfinite(float(r["value"])) for r in rows)


def test_an_sdxl_hub_id_loads_from_the_hugging_face_cache_offline(tiny_sdxl_folder, tmp_path):
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"  # huggingface_hub's layout: refs/main -> snapshots/<commit>
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_sdxl_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = Pretrained("someone/tiny-sdxl", cache_dir=str(tmp_path / "hub")).load()
    assert cached.is_sdxl
    for got, want in zip(sdxl_inputs(cached), sdxl_inputs(Pretrained(str(tiny_sdxl_folder)).load())):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_long_captions_on_sdxl_are_both_encoders_chunks_and_the_first_chunks_pooled_text(tiny_sdxl_folder):
    """kohya's max_token_length on SDXL: each encoder reads 75-token chunks (the second padding with "!"), their
    states joined; the pooled text is the first chunk's. A short caption's first chunk is its 75-token encoding."""
    parts = Pretrained(str(tiny_sdxl_folder)).load()
    long = replace(parts, max_token_length=150)
    caption = ", ".join(f"tag{i}" for i in range(30))  # about 120 tokens: two chunks, the second padded
    with torch.no_grad():
        states, pooled = long.encode_prompt([caption, "zqx star, red"])
        short_states, short_pooled = parts.encode_prompt([caption, "zqx star, red"])
    assert states.shape == (2, 152, 32 + 48) and pooled.shape == (2, 32)
    # Both: the first 75 tokens' pooled state (to float rounding: the encoders ran on 4 sequences, not 2).
    torch.testing.assert_close(pooled, short_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[:, :76], short_states[:, :76], atol=1e-5, rtol=1e-5)
    assert (states[0, 76:] - states[1, 76:]).abs().max() > 1e-3  # the long caption's second chunk is read
    ids_2 = long.tokenize([caption], long.tokenizer_2)
    assert ids_2.shape == (1, 2, 77) and (ids_2[0, 1] == 0).any()  # CLIP-G's chunks pad with "!" (id 0)


def test_the_overlays_memory_settings_train_on_the_tiny_sdxl(tiny_sdxl, tmp_path):
    """bf16 frozen weights, gradient checkpointing of the UNet and both encoders, bf16 mixed precision: the
    overlay as a GPU run uses it, here on the CPU (which runs bf16 autocast too)."""
    cli = fit("recipes/lokr.yaml", [OVERLAY, *tiny_sdxl], tmp_path / "run", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--trainer.precision=bf16-mixed",
              *QUICK)
    model = cli.model
    assert model.unet.dtype == torch.bfloat16 and model.unet.is_gradient_checkpointing
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in model.networks.parameters())  # adapters train in float32
    # Every adapter starts at ΔW = 0: the second encoder's moved, trained through its checkpointed layers.
    assert max(d.abs().max() for d in model.networks["lora_te2"].delta_weights().values()) > 0


def test_peft_rslora_alphas_and_dora_files(tmp_path):
    """A PEFT file's rsLoRA scale α/√r is kept (kohya's alpha α·√r); a PEFT DoRA file is refused by name."""
    unet = tiny_sdxl_components(seed=0).unet
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    width = dict(unet.named_modules())[layer].in_features
    down, up = torch.randn(4, width), torch.randn(width, 4)
    settings = {"unet.lora_alpha": 8, "unet.r": 4, "unet.use_rslora": True}
    save_file({f"unet.{layer}.lora_A.weight": down, f"unet.{layer}.lora_B.weight": up}, tmp_path / "rs.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(settings)})
    (adapter,) = lycoris.load_file(tmp_path / "rs.safetensors", {"lora_unet": unet})["lora_unet"].adapters()
    torch.testing.assert_close(adapter.delta_weight(), up @ down * (8 / 4 ** 0.5))
    save_file({f"unet.{layer}.lora_A.weight": down, f"unet.{layer}.lora_B.weight": up,
               f"unet.{layer}.lora_magnitude_vector": torch.ones(width)}, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match=r"dora.safetensors: unet\..*lora_magnitude_vector: a diffusers/PEFT DoRA"):
        lycoris.load_file(tmp_path / "dora.safetensors", {"lora_unet": tiny_sdxl_components(seed=0).unet})


@pytest.mark.parametrize(("sample_size", "levels", "side"), [(64, 4, 512), (96, 4, 768), (128, 4, 1024), (16, 3, 64)],
                         ids=["sd15", "sd2-768-v", "sdxl", "toy"])
def test_the_native_resolution_is_the_unets_latent_size_times_the_vaes_downsampling(sample_size, levels, side):
    """SD 1.5's, SD 2.1-v's and SDXL's published configs (unet/config.json sample_size; vae block_out_channels), and
    a 4× VAE as the toy base's."""
    from types import SimpleNamespace

    from lycoflow.evaluation.sampling import native_resolution

    channels = [128, 256, 512, 512][:levels]
    parts = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
                            vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=channels)))
    assert native_resolution(parts) == side
