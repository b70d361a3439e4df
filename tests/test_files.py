"""Adapter files on real (tiny) diffusers/transformers models: names, round trips, and refusing bad files."""

import copy
import json
import os
import stat
import sys
import textwrap

import pytest
import torch
from jsonargparse import ArgumentParser
from safetensors.torch import load_file as read_tensors
from safetensors.torch import save_file as write_tensors

import lycoris
from lycoflow.cache import atomic_path

ATTN_ONLY_UNET = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v",
}


#: The tiny UNet's norm layers inside its Transformer2DModels and its ResNet blocks (every norm but conv_norm_out).
UNET_TRANSFORMER_NORMS = {f"lora_unet_{block}_attentions_{i}_{norm}" for block, i in (
    ("down_blocks_0", 0), ("mid_block", 0), ("up_blocks_1", 0), ("up_blocks_1", 1))
    for norm in ("norm", "transformer_blocks_0_norm1", "transformer_blocks_0_norm2", "transformer_blocks_0_norm3")}
UNET_RESNET_NORMS = {f"lora_unet_{block}_resnets_{i}_norm{j}" for block, n in (
    ("down_blocks_0", 1), ("down_blocks_1", 1), ("mid_block", 2), ("up_blocks_0", 2), ("up_blocks_1", 2))
    for i in range(n) for j in (1, 2)}


def unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=gen)


def run(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


@torch.no_grad()
def randomize(*nets):
    gen = torch.Generator().manual_seed(1)
    for net in nets:
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_presets_select_the_expected_layers(unet, text_encoder):
    names = {p: {a.name for a in lycoris.LoRA(preset=p).apply(copy.deepcopy(unet)).adapters()} for p in lycoris.PRESETS}
    assert names["attn-only"] >= ATTN_ONLY_UNET
    assert len(names["attn-only"]) == 4 * 2 * 4  # 4 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert all(n.split("_")[-1] in {"q", "k", "v", "0"} for n in names["attn-only"])
    mlp_only = names["attn-mlp"] - names["attn-only"]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in mlp_only
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in mlp_only
    assert len(mlp_only) == 4 * 4  # ff in/out + proj_in/out per transformer
    rest = names["full"] - names["attn-mlp"]
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
            "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv"} <= rest
    # full also trains the norms of the ResNet and transformer blocks (train_norm: see test_train_norm_*).
    assert not any("attentions" in n for n in rest - UNET_TRANSFORMER_NORMS)
    assert rest >= UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS

    te = {a.name for a in lycoris.LoRA(preset="attn-only").apply(copy.deepcopy(text_encoder), "lora_te").adapters()}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te and len(te) == 2 * 4
    te_mlp = {a.name for a in lycoris.LoRA(preset="attn-mlp").apply(copy.deepcopy(text_encoder), "lora_te").adapters()}
    assert te_mlp - te == {f"lora_te_text_model_encoder_layers_{i}_mlp_fc{j}" for i in (0, 1) for j in (1, 2)}


def test_unet_and_text_encoder_round_trip_in_one_file(tmp_path, unet, text_encoder):
    base_unet, base_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    strategy = lycoris.LoKr(factor=4, dim=10000, preset="attn-mlp")
    unet_net, te_net = strategy.apply(unet, "lora_unet"), strategy.apply(text_encoder, "lora_te")
    randomize(unet_net, te_net)
    inputs, ids = unet_inputs(), torch.tensor([[0, 5, 9, 1]])
    want_unet, want_te = run(unet, inputs), text_encoder(ids).last_hidden_state
    path = lycoris.save_file(tmp_path / "a.safetensors", {"lora_unet": unet_net, "lora_te": te_net},
                             metadata={"ss_network_dim": 10000, "note": "hi"}, dtype=torch.float32)
    keys = read_tensors(path)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lokr_w1" in keys  # canonical name, transformers 5 too
    assert not any(k.startswith("lora_te_encoder") for k in keys)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"ss_network_dim": "10000", "note": "hi"}

    nets = lycoris.load_file(path, {"lora_unet": base_unet, "lora_te": base_te})
    assert set(nets) == {"lora_unet", "lora_te"}
    torch.testing.assert_close(run(base_unet, inputs), want_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_te(ids).last_hidden_state, want_te, atol=1e-5, rtol=1e-5)


def test_fp16_file_and_non_canonical_text_encoder_names_load(tmp_path, text_encoder):
    base = copy.deepcopy(text_encoder)
    net = lycoris.LoRA(dim=4, alpha=2, preset="attn-only").apply(text_encoder, "lora_te")
    randomize(net)
    path = lycoris.save_file(tmp_path / "a.safetensors", {"lora_te": net}, dtype=torch.float16)
    tensors = read_tensors(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    # What naive naming under transformers 5 writes (and some tools do): no text_model level.
    renamed = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    write_tensors(renamed, str(tmp_path / "b.safetensors"))
    (loaded,) = lycoris.load_file(tmp_path / "b.safetensors", {"lora_te": base}).values()
    assert {a.name for a in loaded.adapters()} == {a.name for a in net.adapters()}
    for name, delta in loaded.delta_weights().items():
        torch.testing.assert_close(delta, net.delta_weights()[name], atol=2e-3, rtol=2e-3)


def test_bad_files_are_refused_with_the_key_at_fault(tmp_path, unet):
    net = lycoris.LoRA(dim=4, preset="attn-only").apply(copy.deepcopy(unet))
    path = lycoris.save_file(tmp_path / "good.safetensors", {"lora_unet": net})
    tensors = read_tensors(path)

    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    nan = dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    write_tensors(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=f"NaN/inf.*{key}"):
        lycoris.load_file(tmp_path / "nan.safetensors", {"lora_unet": copy.deepcopy(unet)})

    # A file for another model: a 64-channel layer's factors offered to a 32-channel one.
    wide = dict(tensors)
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    wide[down] = torch.zeros(4, 64)
    write_tensors(wide, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"attn1_to_q.lora_down.weight has shape \(4, 64\).*needs \(4, 32\)"):
        lycoris.load_file(tmp_path / "other.safetensors", {"lora_unet": copy.deepcopy(unet)})

    stray = dict(tensors, **{"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 4)})
    write_tensors(stray, str(tmp_path / "stray.safetensors"))
    with pytest.raises(ValueError, match="lora_unet_no_such_layer"):
        lycoris.load_file(tmp_path / "stray.safetensors", {"lora_unet": copy.deepcopy(unet)})
    with pytest.warns(UserWarning, match="lora_unet_no_such_layer"):
        nets = lycoris.load_file(tmp_path / "stray.safetensors", {"lora_unet": copy.deepcopy(unet)}, strict=False)
    assert len(nets["lora_unet"].adapters()) == len(net.adapters())

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        lycoris.load_file(tmp_path / "junk.safetensors", {"lora_unet": unet})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lycoris.load_file(tmp_path / "missing.safetensors", {"lora_unet": unet})
    write_tensors({}, tmp_path / "empty.safetensors", metadata={"ss_network_dim": "8"})
    empty = tmp_path / "empty.safetensors"
    with pytest.raises(ValueError, match="empty.safetensors: holds no tensors, so no adapter"):
        lycoris.load_file(empty, {"lora_unet": unet})
    with pytest.raises(ValueError, match="empty.safetensors: holds no tensors, so no adapter"):
        lycoris.merge_into({"lora_unet": unet}, [(empty, 1.0)])


def test_save_is_atomic(tmp_path, unet):
    net = lycoris.IA3(preset="attn-only").apply(unet)
    path = lycoris.save_file(tmp_path / "sub" / "x.safetensors", {"lora_unet": net})
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_has_the_mode_the_umask_gives(tmp_path, unet, umask):
    """A UI running as another user reads the file (the temporary file it is renamed from is created 0600)."""
    net = lycoris.IA3(preset="attn-only").apply(unet)
    old = os.umask(umask)
    try:
        path = lycoris.save_file(tmp_path / "x.safetensors", {"lora_unet": net})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.umask(umask)
    try:  # lycoflow's own atomic writes too (recipes, metrics tables, images)
        with atomic_path(tmp_path / "config.yaml") as tmp:
            tmp.write_text("model: {}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o666 & ~umask


USER_MODULE = '''
import torch
from torch import nn
import lycoris


class ScaledDiffAdapter(lycoris.Adapter):
    signature = ("sdiff",)

    def __init__(self, base, **common):
        super().__init__(base, **common)
        self.sdiff = nn.Parameter(torch.zeros_like(base.weight))
        self.s = nn.Parameter(torch.ones(()))

    def _delta(self):
        return self.s * self.sdiff

    @classmethod
    def from_state_dict(cls, base, tensors):
        return cls(base)


class ScaledDiff(lycoris.Strategy):
    """Full difference with a learned scale.

    Args:
        gain: initial scale.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    adapter_class = ScaledDiffAdapter

    def __init__(self, gain: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.gain = gain

    def make_adapter(self, layer, dim, alpha):
        adapter = ScaledDiffAdapter(layer, **self.common())
        adapter.s.data.fill_(self.gain)
        return adapter
'''


def test_user_strategy_from_outside_the_package_by_class_path(tmp_path, monkeypatch, unet):
    (tmp_path / "my_algos.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"adapter": {"class_path": "my_algos.ScaledDiff",
                                              "init_args": {"gain": 2.0, "preset": "attn-only", "dropout": 0.1}}}))
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--adapter", type=lycoris.Strategy)
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(recipe)]))
    strategy = cfg.adapter
    assert type(strategy).__name__ == "ScaledDiff" and strategy.gain == 2.0 and strategy.dropout == 0.1
    with pytest.raises(SystemExit):  # unknown init arg is rejected by the schema
        parser.parse_args(["--adapter", json.dumps({"class_path": "my_algos.ScaledDiff", "init_args": {"gian": 1}})])

    base = copy.deepcopy(unet)
    net = strategy.apply(unet)
    assert len(net.adapters()) == 32
    with torch.no_grad():
        for a in net.adapters():
            a.sdiff.normal_(std=0.01)
    net.eval()  # dropout=0.1 acts in training only
    want = run(unet, unet_inputs())
    path = lycoris.save_file(tmp_path / "u.safetensors", {"lora_unet": net})
    with pytest.raises(ValueError, match=r"no known algorithm has the keys \['s', 'sdiff'\]"):
        lycoris.load_file(path, {"lora_unet": copy.deepcopy(base)})

    class Unreadable(lycoris.Strategy):  # names no adapter_class
        pass

    with pytest.raises(TypeError, match="Unreadable sets no adapter_class"):
        lycoris.load_file(path, {"lora_unet": copy.deepcopy(base)}, algorithms=[Unreadable, *lycoris.ALGORITHMS])
    # The strategy, class or instance, reads its files by its adapter_class; so does the adapter class itself.
    module = sys.modules["my_algos"]
    for algorithm in (type(strategy), strategy, module.ScaledDiffAdapter):
        fresh = copy.deepcopy(base)
        lycoris.load_file(path, {"lora_unet": fresh}, algorithms=(algorithm, *lycoris.ALGORITHMS))
        torch.testing.assert_close(run(fresh, unet_inputs()), want, atol=1e-5, rtol=1e-5)


def test_kohya_sd_scripts_lora_file_loads(tmp_path, unet, text_encoder):
    """kohya's LoRA files: lora_down/lora_up/alpha per layer (alpha absent in old files: scale 1)."""
    gen = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 32-d context -> 32
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 LoCon
    te = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    tensors = {
        f"{q}.lora_down.weight": torch.randn(4, 32, generator=gen),
        f"{q}.lora_up.weight": torch.randn(32, 4, generator=gen),
        f"{q}.alpha": torch.tensor(1.0),
        f"{conv}.lora_down.weight": torch.randn(2, 32, 3, 3, generator=gen),
        f"{conv}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=gen),
        f"{te}.lora_down.weight": torch.randn(8, 32, generator=gen),
        f"{te}.lora_up.weight": torch.randn(32, 8, generator=gen),
        f"{te}.alpha": torch.tensor(4.0),
    }
    write_tensors({k: v.half() for k, v in tensors.items()}, str(tmp_path / "kohya.safetensors"))
    tensors = {k: v.half().float() for k, v in tensors.items()}
    nets = lycoris.load_file(tmp_path / "kohya.safetensors", {"lora_unet": unet, "lora_te": text_encoder})
    deltas = {**nets["lora_unet"].delta_weights(), **nets["lora_te"].delta_weights()}
    up_down = lambda n: tensors[f"{n}.lora_up.weight"].flatten(1) @ tensors[f"{n}.lora_down.weight"].flatten(1)  # noqa: E731
    torch.testing.assert_close(deltas[q], up_down(q) * 1.0 / 4)
    torch.testing.assert_close(deltas[conv], (up_down(conv) * 1.0).reshape(32, 32, 3, 3))  # no alpha: alpha = rank
    torch.testing.assert_close(deltas[te], up_down(te) * 4.0 / 8)


# -- norm layers (train_norm) ---------------------------------------------------------------------------------
def norm_names(model, prefix="lora_unet", **kwargs) -> set[str]:
    net = lycoris.LoRA(**kwargs).apply(copy.deepcopy(model), prefix)
    assert all(isinstance(a, lycoris.NormAdapter) == ("norm" in a.name) for a in net.adapters())
    return {a.name for a in net.adapters() if isinstance(a, lycoris.NormAdapter)}


def test_train_norm_follows_the_preset_unless_given(unet, text_encoder):
    """train_norm=None: norms train with preset full only, those of its ResNet and transformer blocks: what the LyCORIS
    library's train_norm reaches with its presets (its text-encoder modules, CLIPAttention and CLIPMLP, hold no norm),
    and what both UIs place (lycoris/targeting.py). train_norm=True/False decides for any preset."""
    assert norm_names(unet, preset="full") == UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS
    assert norm_names(unet, preset="attn-mlp") == norm_names(unet, preset="attn-only") == set()
    assert norm_names(unet, preset="attn-mlp", train_norm=True) == UNET_TRANSFORMER_NORMS  # the blocks it adapts
    assert norm_names(unet, preset="attn-only", train_norm=True) == set()
    assert norm_names(unet, preset="full", train_norm=False) == set()
    assert norm_names(unet, preset="full", exclude=["*resnets*"]) == UNET_TRANSFORMER_NORMS
    # No preset, no targets: every norm layer, as every Linear/Conv layer.
    assert norm_names(unet, train_norm=True) == UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS | {"lora_unet_conv_norm_out"}
    assert norm_names(text_encoder, "lora_te", preset="full") == set()
    te_norms = {f"lora_te_text_model_encoder_layers_{i}_layer_norm{j}" for i in (0, 1) for j in (1, 2)}
    assert norm_names(text_encoder, "lora_te", train_norm=True) == te_norms | {"lora_te_text_model_final_layer_norm"}
    assert norm_names(text_encoder, "lora_te", targets=["*layer_norm1"], train_norm=True) == {
        f"lora_te_text_model_encoder_layers_{i}_layer_norm1" for i in (0, 1)}
    assert lycoris.LoRA(preset="full", train_norm=False).network_args()["train_norm"] is False  # ss_network_args
    assert "train_norm" not in lycoris.LoRA(preset="full").network_args()


def test_full_preset_file_with_norms_round_trips(tmp_path, unet, text_encoder):
    """w_norm/b_norm, shaped as the norm's weight, next to the algorithm's keys: saved, loaded (exactly, also from
    float16), merged with merge_into."""
    base_unet, base_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    strategy = lycoris.LoRA(dim=2, alpha=1, preset="full", targets=["*layer_norm*"])  # the CLIP norms too
    unet_net, te_net = strategy.apply(unet, "lora_unet"), strategy.apply(text_encoder, "lora_te")
    randomize(unet_net, te_net)
    inputs, ids = unet_inputs(), torch.tensor([[0, 5, 9, 1]])
    want_unet, want_te = run(unet, inputs), text_encoder(ids).last_hidden_state
    path = lycoris.save_file(tmp_path / "a.safetensors", {"lora_unet": unet_net, "lora_te": te_net})
    tensors = read_tensors(path)
    norm = "lora_unet_mid_block_resnets_1_norm2"
    assert {k for k in tensors if k.startswith(norm + ".")} == {f"{norm}.w_norm", f"{norm}.b_norm"}
    assert tensors[f"{norm}.w_norm"].shape == tensors[f"{norm}.b_norm"].shape == (64,)
    assert "lora_te_text_model_final_layer_norm.w_norm" in tensors

    fresh_unet, fresh_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    nets = lycoris.load_file(path, {"lora_unet": fresh_unet, "lora_te": fresh_te})
    for prefix, net in (("lora_unet", unet_net), ("lora_te", te_net)):
        loaded = nets[prefix].state_dict()
        assert loaded.keys() == net.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(run(fresh_unet, inputs), want_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh_te(ids).last_hidden_state, want_te, atol=1e-5, rtol=1e-5)

    merged_unet, merged_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    lycoris.merge_into({"lora_unet": merged_unet, "lora_te": merged_te}, [(path, 1.0)])
    torch.testing.assert_close(merged_unet.get_submodule("mid_block.resnets.1.norm2").bias,
                               base_unet.get_submodule("mid_block.resnets.1.norm2").bias + tensors[f"{norm}.b_norm"])
    torch.testing.assert_close(run(merged_unet, inputs), want_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_te(ids).last_hidden_state, want_te, atol=1e-5, rtol=1e-5)

    half = lycoris.save_file(tmp_path / "h.safetensors", {"lora_unet": unet_net}, dtype=torch.float16)
    (loaded,) = lycoris.load_file(half, {"lora_unet": copy.deepcopy(base_unet)}).values()
    torch.testing.assert_close(loaded.delta_weights()[norm], unet_net.delta_weights()[norm].half().float())


def test_bad_norm_files_are_refused_with_the_key_at_fault(tmp_path, unet):
    norm, linear = "lora_unet_mid_block_resnets_0_norm1", "lora_unet_mid_block_attentions_0_proj_in"
    cases = {
        "on_linear": ({f"{linear}.w_norm": torch.zeros(64), f"{linear}.b_norm": torch.zeros(64)},
                      r"proj_in does not fit .*NormAdapter adapts GroupNorm, LayerNorm layers, not Conv2d"),
        "lora_on_norm": ({f"{norm}.lora_down.weight": torch.zeros(2, 64), f"{norm}.lora_up.weight": torch.zeros(64, 2)},
                         r"norm1 does not fit .*LoRAAdapter adapts Linear, Conv1d, Conv2d layers, not GroupNorm"),
        "wrong_size": ({f"{norm}.w_norm": torch.zeros(32), f"{norm}.b_norm": torch.zeros(64)},
                       r"norm1.w_norm has shape \(32,\) in the file, but .* needs \(64,\)"),
        "no_bias": ({f"{norm}.w_norm": torch.zeros(64)}, r"norm1: missing \['b_norm'\] for NormAdapter"),
    }
    for case, (tensors, message) in cases.items():
        write_tensors(tensors, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(ValueError, match=message):
            lycoris.load_file(tmp_path / f"{case}.safetensors", {"lora_unet": copy.deepcopy(unet)})
