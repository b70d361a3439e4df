"""lycoflow generate / merge / extract on the tiny model: adapter files applied, baked and extracted give the models
they must, and mistakes are reported by name before any model is loaded."""

import argparse
import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lycoris
from lycoflow import tools
from lycoflow.evaluation import load_png, quantize
from lycoflow.evaluation.sampling import Sampler, sample
from lycoflow.models import BaseModelError, Pretrained
from lycoflow.tools import extract, main_extract, main_generate, main_merge, merge, parse_adapter
from lycoflow.tools.convert import save_single_file

PROMPTS = ["zqx star, yellow", "a red ring"]
FAST = ["--steps", "2", "--resolution", "32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a 2-core machine a second intra-op thread only adds waiting. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_adapter(folder: Path, path: Path, strategy: lycoris.Strategy, seed: int) -> Path:
    """An adapter file for the tiny model, its parameters off the zero init so that it changes the model."""
    parts = Pretrained(str(folder)).load()
    networks = {"lora_unet": strategy.apply(parts.unet, prefix="lora_unet"),
                "lora_te": strategy.apply(parts.text_encoder, prefix="lora_te")}
    torch.manual_seed(seed)
    with torch.no_grad():
        for network in networks.values():
            for p in network.parameters():
                p.normal_(std=0.1)
    return lycoris.save_file(path, networks)


@pytest.fixture(scope="module")
def lora(tiny_sd_folder, tmp_path_factory):
    return make_adapter(tiny_sd_folder, tmp_path_factory.mktemp("adapters") / "lora.safetensors",
                        lycoris.LoRA(dim=4, preset="attn-mlp"), seed=1)


@pytest.fixture(scope="module")
def locon(tiny_sd_folder, tmp_path_factory):
    """A second file on the same layers and more (convolutions): stacking it with `lora` overlaps."""
    return make_adapter(tiny_sd_folder, tmp_path_factory.mktemp("adapters") / "locon.safetensors",
                        lycoris.LoRA(dim=2, preset="full"), seed=2)


@torch.no_grad()
def outputs(parts) -> dict[str, torch.Tensor]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    ids = parts.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return {"unet": parts.unet(latents, torch.tensor([10, 700]), cond).sample,
            "text_encoder": parts.text_encoder(ids).last_hidden_state}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- generate -------------------------------------------------------------------------------------------
def test_generate_weight_zero_is_the_base_model_and_one_is_not(tiny_sd_folder, lora, tmp_path):
    common = ["--base", str(tiny_sd_folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "5",
              "--images-per-prompt", "2", "--batch-size", "3", "--device", "cpu", *FAST]
    for name, adapter in (("base", []), ("zero", ["--adapter", f"{lora}:0"]), ("one", ["--adapter", str(lora)])):
        assert main_generate([*common, *adapter, "--out", str(tmp_path / name)]) == 0

    # Image j of prompt i has seed 5 + 2i + j.
    names = ["0-0-5.png", "0-1-6.png", "1-0-7.png", "1-1-8.png"]
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == names
    base, zero, one = ([load_png(tmp_path / run / n) for n in names] for run in ("base", "zero", "one"))
    for a, b in zip(base, zero):
        assert torch.equal(a, b)
    assert min(float((a - b).abs().max()) for a, b in zip(base, one)) > 0.05

    rows = read_csv(tmp_path / "one" / "index.csv")
    assert [(r["file"], r["prompt"], int(r["seed"])) for r in rows] == \
        [(n, PROMPTS[i // 2], 5 + i) for i, n in enumerate(names)]
    assert rows[0]["adapters"] == f"{lora}:1"
    index = json.loads((tmp_path / "zero" / "prompts.json").read_text())
    assert index["adapters"] == [{"file": str(lora), "weight": 0.0}]
    assert [(x["file"], x["prompt_index"], x["image_index"], x["seed"]) for x in index["images"]] == \
        [(n, i // 2, i % 2, 5 + i) for i, n in enumerate(names)]
    assert index["sampler"]["steps"] == 2 and index["sampler"]["scheduler"] == "DDIMScheduler"

    # Same names again into the same folder: refused before loading, nothing touched, unless --overwrite.
    before = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    with pytest.raises(ValueError, match=r"already holds 0-0-5\.png, 0-1-6\.png, 1-0-7\.png and 3 more: pass "
                                         r"--overwrite"):
        main_generate([*common, "--adapter", f"{lora}:0", "--out", str(tmp_path / "one")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()} == before
    assert main_generate([*common, "--adapter", f"{lora}:0", "--out", str(tmp_path / "one"), "--overwrite"]) == 0
    assert load_png(tmp_path / "one" / names[0]).equal(zero[0])


def test_generate_equals_the_file_loaded_by_hand(tiny_sd_folder, lora, tmp_path):
    sampler = Sampler(steps=2, resolution=32, guidance_scale=5.0, batch_size=4)
    seeds = [3, 4, 5, 6]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    rows = tools.generate(str(tiny_sd_folder), PROMPTS, tmp_path, [(lora, 0.7)], seed=3, images_per_prompt=2,
                          sampler=sampler, device="cpu", progress=False)
    assert [r["seed"] for r in rows] == seeds

    parts = Pretrained(str(tiny_sd_folder)).load()
    lycoris.load_file(lora, {"lora_unet": parts.unet, "lora_te": parts.text_encoder}, multiplier=0.7)
    expected = quantize(sample(parts, prompts, seeds, sampler))
    ours = torch.stack([load_png(tmp_path / r["file"]) for r in rows])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_generate_stacks_files_as_merging_them_does(tiny_sd_folder, lora, locon, tmp_path):
    merged, _ = merge(str(tiny_sd_folder), [(lora, 1.0), (locon, 0.5)], out_diffusers=tmp_path / "merged",
                      dtype="float32")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    common = ["--prompts", str(prompts_file), "--guidance", "1", "--device", "cpu", *FAST]
    main_generate(["--base", str(merged), *common, "--out", str(tmp_path / "baked")])
    main_generate(["--base", str(tiny_sd_folder), "--adapter", str(lora), "--adapter", f"{locon}:0.5", *common,
                   "--out", str(tmp_path / "stacked")])
    for name in ("0-0-0.png", "1-0-1.png"):
        # The same model up to float rounding (adapter beside the weights vs in them): 8-bit values may tip over.
        torch.testing.assert_close(load_png(tmp_path / "stacked" / name), load_png(tmp_path / "baked" / name),
                                   atol=2 / 255, rtol=0)


# -- merge ----------------------------------------------------------------------------------------------
def test_merged_model_equals_the_base_with_the_adapter_attached(tiny_sd_folder, lora, tmp_path):
    folder, changed = merge(str(tiny_sd_folder), [(lora, 0.7)], out_diffusers=tmp_path / "diffusers",
                            dtype="float32")
    assert changed["lora_unet"] > 0 and changed["lora_te"] > 0
    assert main_merge(["--base", str(tiny_sd_folder), "--adapter", f"{lora}:0.7", "--out-file",
                       str(tmp_path / "merged.safetensors"), "--dtype", "float32"]) == 0

    attached = Pretrained(str(tiny_sd_folder)).load()
    lycoris.load_file(lora, {"lora_unet": attached.unet, "lora_te": attached.text_encoder}, multiplier=0.7)
    expected = outputs(attached)
    for merged in (Pretrained(str(folder)).load(),
                   Pretrained(str(tmp_path / "merged.safetensors"), config=str(tiny_sd_folder)).load()):
        for key, value in outputs(merged).items():
            torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=0, msg=key)
    # The saved pipeline samples with the base model's scheduler class, not the DDPM that training reads.
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_merge_adds_each_file_at_its_weight(tiny_sd_folder, lora, locon, tmp_path):
    folder, _ = merge(str(tiny_sd_folder), [(lora, 1.0), (locon, -0.5)], out_diffusers=tmp_path / "m",
                      dtype="float32")
    merged = Pretrained(str(folder)).load()
    base = Pretrained(str(tiny_sd_folder)).load()
    deltas = []
    for path in (lora, locon):
        parts = Pretrained(str(tiny_sd_folder)).load()
        nets = lycoris.load_file(path, {"lora_unet": parts.unet, "lora_te": parts.text_encoder})
        deltas.append(nets["lora_unet"].delta_weights())
    layers = dict(base.unet.named_modules())
    merged_layers = dict(merged.unet.named_modules())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # in both files
    key = f"lora_unet_{name.replace('.', '_')}"
    expected = layers[name].weight + deltas[0][key] - 0.5 * deltas[1][key]
    torch.testing.assert_close(merged_layers[name].weight, expected, atol=1e-6, rtol=0)
    conv = "down_blocks.0.resnets.0.conv1"  # in the second only
    expected = layers[conv].weight - 0.5 * deltas[1][f"lora_unet_{conv.replace('.', '_')}"]
    torch.testing.assert_close(merged_layers[conv].weight, expected, atol=1e-6, rtol=0)


# -- a user's algorithm ---------------------------------------------------------------------------------

def test_generate_and_merge_read_a_users_algorithm_by_import_path(tiny_sd_folder, tmp_path, readme_examples):
    algos = importlib.import_module("my_algos")  # the README's worked example
    file = make_adapter(tiny_sd_folder, tmp_path / "scaled.safetensors", algos.ScaledDiff(preset="attn-only"), seed=3)
    common = ["--base", str(tiny_sd_folder), "--adapter", f"{file}:0.5"]
    merged_file = ["--out-file", str(tmp_path / "merged.safetensors"), "--dtype", "float32"]
    with pytest.raises(ValueError, match=r"no known algorithm has the keys \['s', 'sdiff'\]"):
        main_merge([*common, *merged_file])
    mine = ["--algorithm", "my_algos.ScaledDiff"]
    assert main_merge([*common, *mine, *merged_file]) == 0
    assert main_generate([*common, *mine, "--prompt", PROMPTS[0], "--device", "cpu", *FAST,
                          "--out", str(tmp_path / "images")]) == 0

    attached = Pretrained(str(tiny_sd_folder)).load()
    lycoris.load_file(file, attached.adaptable(), multiplier=0.5, algorithms=[algos.ScaledDiff])
    expected = outputs(attached)
    merged = Pretrained(str(tmp_path / "merged.safetensors"), config=str(tiny_sd_folder)).load()
    for key, value in outputs(merged).items():
        torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=0, msg=key)
    image = quantize(sample(attached, PROMPTS[:1], [0], Sampler(steps=2, resolution=32)))[0]
    torch.testing.assert_close(load_png(tmp_path / "images" / "0-0-0.png"), image, atol=1e-6, rtol=0)


# -- extract --------------------------------------------------------------------------------------------
#: Layers the "fine-tune" changes by an exactly rank-2 ΔW with singular values (2, 1), and by a full-rank one.
LOW_RANK = {"lora_unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                          "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"],
            "lora_te": ["encoder.layers.0.self_attn.k_proj"]}
FULL_RANK = {"lora_unet": ["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "up_blocks.0.resnets.0.conv1"],
             "lora_te": ["encoder.layers.1.mlp.fc1"]}


def file_name(prefix: str, path: str) -> str:
    return f"{prefix}_{'text_model_' if prefix == 'lora_te' else ''}{path.replace('.', '_')}"


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


@pytest.fixture(scope="module")
def tuned(tiny_sd_folder, tmp_path_factory):
    """A "fine-tune" of the tiny model as a single file, and each changed layer's ΔW (flattened to 2-D)."""
    parts = Pretrained(str(tiny_sd_folder)).load()
    models = {"lora_unet": parts.unet, "lora_te": parts.text_encoder}
    g = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for prefix, paths in [*LOW_RANK.items(), *FULL_RANK.items()]:
            layers = dict(models[prefix].named_modules())
            for path in paths:
                weight = layers[path].weight
                out_dim, in_dim = weight.shape[0], weight[0].numel()
                if path in LOW_RANK[prefix]:
                    delta = orthonormal(out_dim, 2, g) @ torch.diag(torch.tensor([2.0, 1.0])) \
                        @ orthonormal(in_dim, 2, g).T * 0.1
                else:
                    delta = torch.randn(out_dim, in_dim, generator=g) * 0.02
                weight.add_(delta.reshape(weight.shape))
                deltas[file_name(prefix, path)] = delta
        parts.unet.conv_norm_out.weight.add_(0.1)  # no LoRA carries a norm: reported as uncovered
    file = save_single_file(tmp_path_factory.mktemp("tuned") / "tuned.safetensors", parts)
    return file, deltas


def expected_rank(delta: torch.Tensor, energy: float) -> int:
    power = torch.linalg.svdvals(delta.double()).square()
    return next(k + 1 for k in range(power.numel()) if power[: k + 1].sum() >= energy * power.sum())


def test_extract_then_merge_reproduces_the_difference(tiny_sd_folder, tuned, tmp_path):
    file, deltas = tuned
    result = extract(str(tiny_sd_folder), str(file), tmp_path / "x.safetensors", rank=2, preset="full",
                     dtype="float32", config=str(tiny_sd_folder), device="cpu", progress=False)
    assert result.ranks == dict.fromkeys(deltas, 2)
    selected = sum(1 for m in (Pretrained(str(tiny_sd_folder)).load(),) for model in (m.unet, m.text_encoder)
                   for _, path, _ in lycoris.targeting.supported_layers(model)
                   if lycoris.targeting.matches(path, lycoris.PRESETS["full"]))
    assert result.skipped == selected - len(deltas)
    assert result.uncovered == ["lora_unet:conv_norm_out.weight"]

    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
        conv = file_name("lora_unet", "down_blocks.0.resnets.0.conv1")
        assert f.get_slice(f"{conv}.lora_down.weight").get_shape() == [2, 32, 3, 3]
        assert f.get_slice(f"{conv}.lora_up.weight").get_shape() == [32, 2, 1, 1]
        assert float(f.get_tensor(f"{conv}.alpha")) == 2
        keys = f.keys()
        assert {k.split(".")[0] for k in keys} == set(deltas)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "2"
    assert json.loads(meta["ss_network_args"])["algo"] == "locon"

    base, merged = Pretrained(str(tiny_sd_folder)).load(), Pretrained(str(tiny_sd_folder)).load()
    nets = lycoris.load_file(result.path, {"lora_unet": base.unet, "lora_te": base.text_encoder})
    assert {n for net in nets.values() for n in net.delta_weights()} == set(deltas)
    for net in nets.values():
        net.remove()
    lycoris.merge_into({"lora_unet": merged.unet, "lora_te": merged.text_encoder}, [(result.path, 1.0)])
    residual = total = 0.0
    for prefix, model, merged_model in (("lora_unet", base.unet, merged.unet),
                                        ("lora_te", base.text_encoder, merged.text_encoder)):
        merged_layers = dict(merged_model.named_modules())
        for path, layer in model.named_modules():
            if file_name(prefix, path) not in deltas:
                continue
            delta = deltas[file_name(prefix, path)]
            got = (merged_layers[path].weight - layer.weight).detach().flatten(1)
            error = float((got - delta).norm() / delta.norm())
            discarded = torch.linalg.svdvals(delta.double()).square()[2:].sum()
            if path in LOW_RANK[prefix]:
                assert error < 1e-5, path
            else:  # exactly what truncating the SVD leaves out
                assert error == pytest.approx(math.sqrt(discarded / delta.double().square().sum()), rel=1e-3), path
            residual += float(discarded)
            total += float(delta.double().square().sum())
    assert result.relative_error == pytest.approx(math.sqrt(residual / total), rel=1e-3)


def test_energy_picks_the_smallest_rank_keeping_that_share(tiny_sd_folder, tuned, tmp_path, capsys):
    file, deltas = tuned
    convs = {file_name("lora_unet", p) for p in ("down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv1")}
    result = extract(str(tiny_sd_folder), str(file), tmp_path / "e.safetensors", energy=0.75, conv_rank=3,
                     preset="full", dtype="float32", config=str(tiny_sd_folder), device="cpu", progress=False)
    # (2, 1) singular values: rank 1 keeps 4/5 of Σσ².
    assert result.ranks == {name: 3 if name in convs else expected_rank(delta, 0.75)
                            for name, delta in deltas.items()}
    assert result.ranks[file_name("lora_te", "encoder.layers.0.self_attn.k_proj")] == 1

    # attn-mlp: no k×k convolution; 0.85 needs both singular values of the rank-2 layers.
    assert main_extract(["--base", str(tiny_sd_folder), "--tuned", str(file), "--config", str(tiny_sd_folder),
                         "--energy", "0.85", "--out", str(tmp_path / "f.safetensors"), "--device", "cpu"]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    parts = Pretrained(str(tiny_sd_folder)).load()
    nets = lycoris.load_file(tmp_path / "f.safetensors", {"lora_unet": parts.unet, "lora_te": parts.text_encoder})
    ranks = {name: adapter.dim for net in nets.values() for name, adapter in net.named_children()}
    assert ranks == {name: expected_rank(delta, 0.85) for name, delta in deltas.items() if name not in convs}
    assert ranks[file_name("lora_unet", "down_blocks.0.attentions.0.proj_in")] == 2


def test_extract_refuses_a_model_that_did_not_change(tiny_sd_folder, tmp_path):
    with pytest.raises(ValueError, match="does not differ from --base .* nothing to extract"):
        extract(str(tiny_sd_folder), str(tiny_sd_folder), tmp_path / "x.safetensors", rank=4, progress=False)
    assert not (tmp_path / "x.safetensors").exists()


# -- the command lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [main_generate, main_merge, main_extract])
def test_help_has_examples(entry, capsys):
    assert entry(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lycoflow ") and "examples:" in text


def test_existing_outputs_are_replaced_only_with_overwrite(tiny_sd_folder, lora, tuned, tmp_path):
    # Through the real command line: exit 2, the file named, the file untouched; --overwrite replaces it.
    from lycoflow.cli import main

    merged, extracted = tmp_path / "merged.safetensors", tmp_path / "extracted.safetensors"
    for path in (merged, extracted):
        path.write_bytes(b"the user's own file")
    commands = {merged: ["merge", "--base", str(tiny_sd_folder), "--adapter", str(lora), "--out-file", str(merged)],
                extracted: ["extract", "--base", str(tiny_sd_folder), "--tuned", str(tuned[0]), "--config",
                            str(tiny_sd_folder), "--rank", "2", "--out", str(extracted)]}
    for path, command in commands.items():
        assert main(command) == 2
        assert path.read_bytes() == b"the user's own file"
        assert main([*command, "--overwrite"]) == 0
        with safe_open(str(path), "pt") as f:
            assert len(list(f.keys())) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_adapter_weights_parse():
    assert parse_adapter("a.safetensors:0.5") == (Path("a.safetensors"), 0.5)
    assert parse_adapter("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_adapter("a.safetensors:-1e-1") == (Path("a.safetensors"), -0.1)
    assert parse_adapter(r"C:\loras\a.safetensors") == (Path(r"C:\loras\a.safetensors"), 1.0)


def test_mistakes_are_named_before_loading_anything(tiny_sd_folder, lora, tmp_path):
    base = ["--base", str(tiny_sd_folder)]
    with pytest.raises(FileNotFoundError, match=r"adapter file not found: .*missing\.safetensors"):
        main_generate([*base, "--adapter", str(tmp_path / "missing.safetensors:0.5"), "--prompt", "x",
                       "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"adapter file not found: .*missing\.safetensors"):
        main_merge([*base, "--adapter", str(tmp_path / "missing.safetensors"), "--out-file",
                    str(tmp_path / "m.safetensors")])
    with pytest.raises(ValueError, match="--prompt TEXT or --prompts FILE, not both"):
        main_generate([*base, "--prompt", "x", "--prompts", "p.txt", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"prompts file not found: .*p\.txt"):
        main_generate([*base, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--scheduler diffusers.NoSuchScheduler: not a diffusers scheduler"):
        main_generate([*base, "--prompt", "x", "--scheduler", "diffusers.NoSuchScheduler", "--out", str(tmp_path)])
    with pytest.raises(argparse.ArgumentError, match="required: --base"):
        main_generate(["--prompt", "x", "--out", str(tmp_path)])
    with pytest.raises(BaseModelError, match="base model not found"):
        main_generate(["--base", "./no/such/model", "--prompt", "x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--algorithm no_such_module\.Thing: cannot import no_such_module"):
        main_generate([*base, "--algorithm", "no_such_module.Thing", "--prompt", "x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--algorithm torch\.nn\.Linear: .* neither a lycoris\.Adapter class nor"):
        main_merge([*base, "--adapter", str(lora), "--algorithm", "torch.nn.Linear", "--out-file",
                    str(tmp_path / "m.safetensors")])

    for outs in ([], ["--out-diffusers", str(tmp_path / "d"), "--out-file", str(tmp_path / "f.safetensors")]):
        with pytest.raises(ValueError, match="exactly one output: --out-diffusers DIR .* or --out-file"):
            main_merge([*base, "--adapter", str(lora), *outs])
    with pytest.raises(ValueError, match=r"--out-file .*m\.ckpt: name a \.safetensors file"):
        main_merge([*base, "--adapter", str(lora), "--out-file", str(tmp_path / "m.ckpt")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--out-diffusers .*full already exists and is not empty"):
        main_merge([*base, "--adapter", str(lora), "--out-diffusers", str(tmp_path / "full")])
    with pytest.raises(ValueError, match="at least one adapter file"):
        main_merge([*base, "--out-file", str(tmp_path / "m.safetensors")])

    out = ["--out", str(tmp_path / "x.safetensors")]
    for ranks in ([], ["--rank", "4", "--energy", "0.9"]):
        with pytest.raises(ValueError, match="exactly one of --rank R .* or --energy E"):
            main_extract([*base, "--tuned", str(tiny_sd_folder), *ranks, *out])
    with pytest.raises(ValueError, match=r"--energy 1.5 must be in \(0, 1\]"):
        main_extract([*base, "--tuned", str(tiny_sd_folder), "--energy", "1.5", *out])
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'everything'"):
        main_extract([*base, "--tuned", str(tiny_sd_folder), "--rank", "4", "--preset", "everything", *out])
