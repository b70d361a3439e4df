"""Interoperability with the files of the LyCORIS library and of kohya sd-scripts, on SD-1.x model names.

1. Files written by the LyCORIS library itself (``lycoris-lora`` 4.1.3 through its kohya entry point
   ``lycoris.kohya.create_network``, prefixes ``lora_unet``/``lora_te``) on a tiny SD-1.x-architecture UNet
   and CLIP text encoder, every algorithm: loaded here with `lycoris.load_file`, the models must give the
   outputs the library's own forward gave (stored beside each file), at multiplier 1 and 0.5, unmerged and
   merged. See tests/fixtures/lycoris_lib/sd_tiny/README.md for how they were made. The library is not
   needed (nor installed) to run these tests.
2. kohya sd-scripts LoRA/LoCon files (``lora_down.weight``/``lora_up.weight``/``alpha``, alpha sometimes
   absent, fp16 or bf16), built here: ΔW must be up·down·α/r and the models must compute with W0 + ΔW.
3. Norm layers (``train_norm``, keys ``w_norm``/``b_norm``), both ways: the library's own train_norm files load
   here and reproduce its outputs, and lycoflow's preset-full file loaded by the library computed what lycoflow
   computes. See tests/fixtures/lycoris_lib/sd_tiny_norm/README.md.

Where our semantics deliberately differ from the library's (see the xfail reasons), the test is kept and
marked ``xfail(strict=True)``, so that a change on either side shows.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as read_tensors
from safetensors.torch import save_file as write_tensors
from tiny_sd import build_models  # tests/tiny_sd.py

import lycoris

FIXTURES = Path(__file__).parent / "fixtures" / "lycoris_lib" / "sd_tiny"
PREFIXES = ("lora_unet", "lora_te")

# case -> (adapter class every layer must load as, DoRA?)
CASES = {
    "locon": (lycoris.LoRAAdapter, False),
    "locon_tucker": (lycoris.LoRAAdapter, False),
    "loha": (lycoris.LoHaAdapter, False),
    "loha_tucker": (lycoris.LoHaAdapter, False),
    "lokr_full": (lycoris.LoKrAdapter, False),
    "lokr_lowrank": (lycoris.LoKrAdapter, False),
    "lokr_both_tucker": (lycoris.LoKrAdapter, False),
    "dora": (lycoris.LoRAAdapter, True),
    "dora_on_input": (lycoris.LoRAAdapter, True),
    "lokr_dora": (lycoris.LoKrAdapter, True),
    "oft": (lycoris.OFTAdapter, False),
    "oft_rescaled": (lycoris.OFTAdapter, False),
    "coft": (lycoris.OFTAdapter, False),
    "boft": (lycoris.BOFTAdapter, False),
    "glora": (lycoris.GLoRAAdapter, False),
    "full": (lycoris.FullAdapter, False),
    "ia3": (lycoris.IA3Adapter, False),
}

COFT_REASON = (
    "OFT constraint: the library caps ||Q|| at constraint * out_dim (DiagOFTModule: self.constraint = "
    "constraint * out_dim, alpha stores the bare constraint); we cap at alpha itself, as ComfyUI reads it "
    "(lycoris/functional.py cayley, called with float(self.alpha) in lycoris/oft.py rotation)"
)
DORA_STRENGTH_REASON = (
    "multiplier with DoRA: the library computes (W0+ΔW)·(m·(s/||W0+ΔW|| - 1) + 1), ΔW unscaled inside the "
    "norm; ours is W0 + m·(DoRA(W0+ΔW) - W0), linear in m, as ComfyUI's weight_decompose applies strength"
)
XFAIL_REASONS = {"coft": COFT_REASON}
STRENGTH_REASONS = {
    "dora_on_input": DORA_STRENGTH_REASON,
    "coft": COFT_REASON,
    "oft_rescaled": (
        "multiplier with rescale: the library computes rescale * (I + m(R - I))^T W0, which is rescale * W0 "
        "at m=0; ours is W0 + m(rescale * R^T W0 - W0) (linear in m)"
    ),
    "boft": (
        "multiplier: the library interpolates every butterfly stage towards I (R_i -> m R_i + (1-m) I) and "
        "multiplies the stages; ours scales the final ΔW linearly"
    ),
    "dora": DORA_STRENGTH_REASON,
    "lokr_dora": DORA_STRENGTH_REASON,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny (8x8 latents): a second intra-op thread only adds synchronisation, and on a
    2-core machine that is busy elsewhere it makes every op wait for a core (measured: 105 s instead of 9 s
    for this file while a benchmark ran). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pristine():
    return build_models()


@pytest.fixture
def models(pristine):
    return copy.deepcopy(pristine)


@pytest.fixture(scope="module")
def inputs():
    return read_tensors(str(FIXTURES / "inputs.safetensors"))


@torch.no_grad()
def run(models, x):
    unet, te = models
    return (
        unet(x["unet.sample"], x["unet.timestep"], encoder_hidden_states=x["unet.context"]).sample,
        te(x["te.input_ids"]).last_hidden_state,
    )


def assert_matches(ours, expected, what):
    for part, got, want in zip(("unet", "te"), ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m, part=part: f"{what}, {part}: {m}")


def file_layers(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        keys = f.keys()  # a safe_open handle is not iterable
    return {k.split(".", 1)[0] for k in keys}


def expected(case, multiplier):
    out = read_tensors(str(FIXTURES / f"{case}.outputs.safetensors"))
    return out[f"unet.m{multiplier}"], out[f"te.m{multiplier}"]


# -- 1. the library's files ---------------------------------------------------------------------------
def test_fixtures_are_present_and_made_by_the_library():
    assert sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.outputs.safetensors")) == sorted(CASES)
    for case in CASES:
        with safe_open(str(FIXTURES / f"{case}.outputs.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["lycoris-lora"] == "4.1.3" and meta["entry_point"] == "lycoris.kohya.create_network"
        assert json.loads(meta["kwargs"])["algo"]
        with safe_open(str(FIXTURES / f"{case}.safetensors"), "pt") as f:
            assert "sshs_model_hash" in f.metadata()  # written by the library's save_weights


def test_base_models_are_rebuilt_exactly(pristine, inputs):
    """The deterministic base reproduces the outputs the library side computed before applying anything,
    so a mismatch below is the adapter's, not the base model's."""
    unet_y, te_y = run(pristine, inputs)
    torch.testing.assert_close(unet_y, inputs["unet.base"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(te_y, inputs["te.base"], rtol=1e-6, atol=1e-6)


def test_library_names_text_encoder_layers_without_text_model(pristine):
    """On transformers 5 the library writes lora_te_encoder_layers_* (CLIPTextModel has no text_model level
    any more); our loader places them, and our own files spell them lora_te_text_model_encoder_* (the
    names A1111/ComfyUI look up)."""
    names = file_layers(FIXTURES / "locon.safetensors")
    te_names = {n for n in names if n.startswith("lora_te_")}
    assert te_names and all(n.startswith("lora_te_encoder_layers_") for n in te_names)
    unet, te = copy.deepcopy(pristine)
    nets = lycoris.load_file(FIXTURES / "locon.safetensors", {"lora_unet": unet, "lora_te": te})
    assert {a.name for a in nets["lora_te"].adapters()} == {
        n.replace("lora_te_", "lora_te_text_model_", 1) for n in te_names
    }


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL_REASONS[c])) if c in XFAIL_REASONS else c
    for c in CASES
])
def test_library_file_reproduces_library_outputs(case, models, inputs, tmp_path):
    path = FIXTURES / f"{case}.safetensors"
    algorithm, dora = CASES[case]
    want = expected(case, 1.0)
    base = (inputs["unet.base"], inputs["te.base"])
    for got, ref in zip(want, base):  # the adapter changes both models noticeably
        assert (got - ref).norm() > 0.03 * ref.norm()

    nets = lycoris.load_file(path, {"lora_unet": models[0], "lora_te": models[1]})
    adapters = [a for net in nets.values() for a in net.adapters()]
    assert len(adapters) == len(file_layers(path))  # every layer of the file was placed
    assert set(nets) == set(PREFIXES)
    assert all(type(a) is algorithm and a.weight_decompose == dora for a in adapters)

    assert_matches(run(models, inputs), want, f"{case}: forward")
    for net in nets.values():
        net.merge()
    assert_matches(run(models, inputs), want, f"{case}: merged")
    for net in nets.values():
        net.unmerge()

    # Re-saved in our format and loaded again: the same model.
    ours = lycoris.save_file(tmp_path / f"{case}.safetensors", nets)
    for net in nets.values():
        net.remove()
    assert_matches(run(models, inputs), base, f"{case}: removed")
    lycoris.load_file(ours, {"lora_unet": models[0], "lora_te": models[1]})
    assert_matches(run(models, inputs), want, f"{case}: re-saved by us")


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=STRENGTH_REASONS[c]))
    if c in STRENGTH_REASONS else c
    for c in CASES
])
def test_library_file_at_half_strength(case, models, inputs):
    lycoris.load_file(FIXTURES / f"{case}.safetensors", {"lora_unet": models[0], "lora_te": models[1]},
                      multiplier=0.5)
    assert_matches(run(models, inputs), expected(case, 0.5), f"{case}: multiplier 0.5")


def test_lokr_alpha_is_ignored_when_both_blocks_are_full(models):
    """The library stores alpha = dim (10000) when w1 and w2 are both full and uses scale 1."""
    tensors = read_tensors(str(FIXTURES / "lokr_full.safetensors"))
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {10000.0}
    nets = lycoris.load_file(FIXTURES / "lokr_full.safetensors", {"lora_unet": models[0], "lora_te": models[1]})
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    w1, w2 = tensors[f"{name}.lokr_w1"].float(), tensors[f"{name}.lokr_w2"].float()
    want = torch.kron(w1[:, :, None, None], w2)  # scale 1
    torch.testing.assert_close(nets["lora_unet"].delta_weights()[name], want)


# -- 2. kohya sd-scripts files --------------------------------------------------------------------------
KOHYA_LAYERS = {
    # file name -> (module path, rank, alpha or None)
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":  # Linear 32 -> 64
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 4, 1.0),
    "lora_unet_mid_block_attentions_0_proj_in": ("mid_block.attentions.0.proj_in", 8, 4.0),  # 1x1 conv
    "lora_unet_down_blocks_1_resnets_0_conv1": ("down_blocks.1.resnets.0.conv1", 2, 1.0),  # 3x3 LoCon
    "lora_unet_down_blocks_0_downsamplers_0_conv": ("down_blocks.0.downsamplers.0.conv", 4, None),  # stride 2
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ("down_blocks.1.resnets.0.time_emb_proj", 4, None),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("encoder.layers.0.self_attn.q_proj", 8, 4.0),
    "lora_te_text_model_encoder_layers_1_mlp_fc2": ("encoder.layers.1.mlp.fc2", 4, 16.0),
}


def kohya_file(path: Path, models, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What sd-scripts' networks/lora.py saves: lora_down (r, in[, k, k]), lora_up (out, r[, 1, 1]), a 0-d
    alpha (left out here for two layers, as in old files), everything in the save precision."""
    unet, te = models
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for name, (module_path, rank, alpha) in KOHYA_LAYERS.items():
        w = (unet if name.startswith("lora_unet") else te).get_submodule(module_path).weight
        out_dim, in_dim = w.shape[:2]
        kernel = tuple(w.shape[2:])
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, *kernel, generator=gen) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, *[1] * len(kernel), generator=gen) * 0.2
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"}
    write_tensors(tensors, str(path), metadata=metadata)
    return {k: v.float() for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kohya_sd_scripts_lora_file(dtype, models, pristine, inputs, tmp_path):
    path = tmp_path / "kohya.safetensors"
    tensors = kohya_file(path, models, dtype)
    nets = lycoris.load_file(path, {"lora_unet": models[0], "lora_te": models[1]})
    deltas = {**nets["lora_unet"].delta_weights(), **nets["lora_te"].delta_weights()}
    assert set(deltas) == set(KOHYA_LAYERS)

    manual_unet, manual_te = copy.deepcopy(pristine)
    for name, (module_path, rank, alpha) in KOHYA_LAYERS.items():
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        scale = (rank if alpha is None else alpha) / rank  # no alpha: alpha = rank, scale 1
        layer = (manual_unet if name.startswith("lora_unet") else manual_te).get_submodule(module_path)
        want = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * scale
        torch.testing.assert_close(deltas[name], want, msg=lambda m, name=name: f"{name}: {m}")
        with torch.no_grad():
            layer.weight += want

    # The loaded (unmerged) models compute with W0 + ΔW.
    assert_matches(run(models, inputs), run((manual_unet, manual_te), inputs), "kohya file")
    base = (inputs["unet.base"], inputs["te.base"])
    assert all((got - ref).norm() > 0.03 * ref.norm() for got, ref in zip(run(models, inputs), base))


# -- 3. norm layers (train_norm) ------------------------------------------------------------------------------
NORM_FIXTURES = FIXTURES.parent / "sd_tiny_norm"
#: case → the adapter class of the layers that are not norms.
NORM_CASES = {"locon_norm": lycoris.LoRAAdapter, "full_norm": lycoris.FullAdapter}


def made(path: Path) -> dict:
    """How a fixture of sd_tiny_norm was made: its metadata ``library`` (JSON)."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["library"])


def norm_expected(path: Path, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = read_tensors(str(path))
    return out[f"unet.m{multiplier}"], out[f"te.m{multiplier}"]


@pytest.mark.parametrize("case", NORM_CASES)
def test_library_train_norm_file_reproduces_library_outputs(case, models, inputs, tmp_path):
    """w_norm/b_norm from the library's NormModule (UNet ResNet and transformer norms, conv_norm_out, the CLIP
    layer norms and final_layer_norm) next to LoCon or full diffs: the same outputs at multiplier 1 and 0.5, merged
    too, and again once re-saved by us."""
    path, outputs = NORM_FIXTURES / f"{case}.safetensors", NORM_FIXTURES / f"{case}.outputs.safetensors"
    meta = made(outputs)
    assert meta["lycoris-lora"] == "4.1.3" and meta["entry_point"] == "lycoris.kohya.create_network"
    assert meta["kwargs"]["train_norm"] is True
    with safe_open(str(path), "pt") as f:
        assert "sshs_model_hash" in f.metadata()  # written by the library's save_weights

    nets = lycoris.load_file(path, {"lora_unet": models[0], "lora_te": models[1]})
    adapters = [a for net in nets.values() for a in net.adapters()]
    assert len(adapters) == len(file_layers(path))  # every layer of the file was placed
    norms = [a for a in adapters if isinstance(a, lycoris.NormAdapter)]
    assert len(norms) == meta["modules"]["NormModule"] and {a.name for a in norms} >= {
        "lora_unet_conv_norm_out", "lora_te_text_model_final_layer_norm"}
    assert all(type(a) is NORM_CASES[case] for a in adapters if a not in norms)
    for multiplier in (1.0, 0.5):
        for net in nets.values():
            net.multiplier = multiplier
        assert_matches(run(models, inputs), norm_expected(outputs, multiplier), f"{case}: multiplier {multiplier}")
    for net in nets.values():
        net.multiplier = 1.0
        net.merge()
    want = norm_expected(outputs, 1.0)
    assert_matches(run(models, inputs), want, f"{case}: merged")
    ours = lycoris.save_file(tmp_path / f"{case}.safetensors", nets)
    for net in nets.values():
        net.remove()
    lycoris.load_file(ours, {"lora_unet": models[0], "lora_te": models[1]})
    assert_matches(run(models, inputs), want, f"{case}: re-saved by us")


@pytest.mark.parametrize("case", NORM_CASES)
def test_library_train_norm_outputs_depend_on_the_norms(case, pristine, inputs, tmp_path):
    """The comparison above would see norms left out: without its w_norm/b_norm keys a file gives other outputs."""
    tensors = read_tensors(str(NORM_FIXTURES / f"{case}.safetensors"))
    write_tensors({k: v for k, v in tensors.items() if not k.endswith(("w_norm", "b_norm"))},
                  str(tmp_path / "no_norms.safetensors"))
    models = copy.deepcopy(pristine)
    lycoris.load_file(tmp_path / "no_norms.safetensors", {"lora_unet": models[0], "lora_te": models[1]})
    want = norm_expected(NORM_FIXTURES / f"{case}.outputs.safetensors", 1.0)
    for got, ref in zip(run(models, inputs), want):
        assert (got - ref).norm() > 0.01 * ref.norm()


def test_library_reproduces_lycoflow_train_norm_file(models, inputs, tmp_path):
    """lycoflow's preset-full LoCon file with its norms, loaded by the library's kohya
    ``create_network_from_weights`` on the UNet: one module per layer (NormModule for every w_norm), no key left
    unused, and the library's outputs are ours, at multiplier 1 and 0.5. The fixture is what lycoflow writes
    today (make_files.py there rebuilds it)."""
    spec = importlib.util.spec_from_file_location("sd_tiny_norm_make_files", NORM_FIXTURES / "make_files.py")
    make_files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_files)
    fresh = read_tensors(str(make_files.write(tmp_path / "now.safetensors")))
    stored = read_tensors(str(make_files.FILE))
    assert fresh.keys() == stored.keys() and all(torch.equal(fresh[k], stored[k]) for k in stored)

    library = NORM_FIXTURES / "lycoflow_locon_norm.library.safetensors"
    meta = made(library)
    assert meta["lycoris-lora"] == "4.1.3" and meta["unused_keys"] == []
    (net,) = lycoris.load_file(make_files.FILE, {"lora_unet": models[0]}).values()
    norms = sum(isinstance(a, lycoris.NormAdapter) for a in net.adapters())
    assert meta["modules"] == {"LoConModule": len(net.adapters()) - norms, "NormModule": norms} and norms == 32
    out = read_tensors(str(library))
    for multiplier in (1.0, 0.5):
        net.multiplier = multiplier
        unet_y, _ = run(models, inputs)
        torch.testing.assert_close(unet_y, out[f"unet.m{multiplier}"], rtol=1e-5,
                                   atol=1e-5 * out[f"unet.m{multiplier}"].abs().max().item())
