"""Algorithm-specific behaviour: factorisation rules, parameter counts, fast paths, and clear errors."""

import copy
import math

import pytest
import torch
from torch import nn

import lycoris


@pytest.mark.parametrize(
    ("dimension", "factor", "expected"),
    [((320, -1), None, (16, 20)), ((320, 8), None, (8, 40)), ((1280, 16), None, (16, 80)),
     ((768, 4), None, (4, 192)), ((640, -1), None, (20, 32)), ((768, 5), None, (4, 192))],
)
def test_lokr_factorization_table(dimension, factor, expected):
    assert lycoris.factorization(*dimension) == expected


def count(net):
    return sum(p.numel() for p in net.parameters())


def apply_to(layer, strategy):
    return strategy.apply(nn.Sequential(layer))


def test_parameter_counts():
    lin = lambda: nn.Linear(320, 640)  # noqa: E731
    conv = lambda: nn.Conv2d(320, 640, 3, padding=1)  # noqa: E731
    # LoRA: r(in + out); LoCon on 3x3: r(in·9 + out); Tucker: r·in + r·r·9 + r·out.
    assert count(apply_to(lin(), lycoris.LoRA(dim=8))) == 8 * (320 + 640)
    assert count(apply_to(conv(), lycoris.LoRA(dim=8))) == 8 * (320 * 9 + 640)
    assert count(apply_to(conv(), lycoris.LoRA(dim=8, use_tucker=True))) == 8 * 320 + 8 * 8 * 9 + 8 * 640
    # DoRA adds one magnitude per input column (per output row with dora_on_output).
    assert count(apply_to(lin(), lycoris.LoRA(dim=8, weight_decompose=True))) == 8 * (320 + 640) + 320
    assert count(apply_to(lin(), lycoris.LoRA(dim=8, weight_decompose=True, dora_on_output=True))) == \
        8 * (320 + 640) + 640
    # LoHa: two rank-r pairs.
    assert count(apply_to(lin(), lycoris.LoHa(dim=4))) == 2 * 4 * (320 + 640)
    # LoKr factor 8, dim 10000: w1 (8x8) full, w2 (80x40) full.
    assert count(apply_to(lin(), lycoris.LoKr(factor=8, dim=10000))) == 8 * 8 + 80 * 40
    # LoKr low-rank w2: w1 (8x8) + r(80 + 40).
    assert count(apply_to(lin(), lycoris.LoKr(factor=8, dim=4))) == 8 * 8 + 4 * (80 + 40)
    # (IA)3: one value per output (or input) channel.
    assert count(apply_to(lin(), lycoris.IA3())) == 640
    assert count(apply_to(lin(), lycoris.IA3(train_on_input=True))) == 320
    # OFT dim 4 on 640 rows: 160 blocks of 4x4.
    assert count(apply_to(lin(), lycoris.OFT(dim=4))) == 160 * 16
    # BOFT dim 10 on 640 rows: blocks of 10, 64 of them, log2(64)+1 = 7 stages.
    assert count(apply_to(lin(), lycoris.BOFT(dim=10))) == 7 * 64 * 100
    # GLoRA: A (in->r->in) and B (in->r->out).
    assert count(apply_to(lin(), lycoris.GLoRA(dim=8))) == 8 * (320 + 320) + 8 * (320 + 640)
    assert count(apply_to(lin(), lycoris.Full())) == 640 * 320 + 640


def test_lokr_blocks_follow_the_factorization_and_dim_rule():
    adapter = apply_to(nn.Linear(320, 640), lycoris.LoKr(factor=8, dim=10000)).adapters()[0]
    assert adapter.lokr_w1.shape == (8, 8) and adapter.lokr_w2.shape == (80, 40)
    assert adapter.scale == 1.0  # both blocks full: no rank, so no alpha scaling
    # w2 becomes low-rank only when dim < max(out_k, in_n) / 2 = 40.
    assert hasattr(apply_to(nn.Linear(320, 640), lycoris.LoKr(factor=8, dim=40)).adapters()[0], "lokr_w2")
    low = apply_to(nn.Linear(320, 640), lycoris.LoKr(factor=8, dim=39, alpha=13)).adapters()[0]
    assert low.lokr_w2_a.shape == (80, 39) and low.scale == pytest.approx(13 / 39)
    both = apply_to(nn.Linear(320, 640), lycoris.LoKr(dim=4, decompose_both=True)).adapters()[0]
    assert both.lokr_w1_a.shape == (20, 4) and both.lokr_w1_b.shape == (4, 16)  # 640 -> (20, 32), 320 -> (16, 20)


@pytest.mark.parametrize("layer", [nn.Linear(24, 48), nn.Conv2d(24, 48, 3, stride=2, padding=1)])
def test_lokr_reshape_path_equals_weight_path(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    net = lycoris.LoKr(factor=4, dim=2, alpha=1).apply(model)
    adapter = net.adapters()[0]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 24, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 7, 24)
    through_factors = adapter.base_forward(x) + adapter.scale * adapter._kron_forward(x)
    through_weight = nn.functional.linear(x, adapter.adapted_weight(), layer.bias) if isinstance(
        layer, nn.Linear) else layer._conv_forward(x, adapter.adapted_weight(), layer.bias)
    torch.testing.assert_close(through_factors, through_weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), through_weight, atol=1e-5, rtol=1e-5)  # whichever path it picks


def test_lokr_picks_the_reshape_path_only_when_far_cheaper():
    big = lycoris.LoKr(factor=16, dim=10000).apply(nn.Sequential(nn.Linear(1280, 1280))).adapters()[0]
    assert big._cheaper_by_reshape(torch.randn(1, 256, 1280))  # w1 16x16: the product repeats w2 256 times
    paper = lycoris.LoKr(factor=8, dim=10000).apply(nn.Sequential(nn.Linear(320, 320))).adapters()[0]
    assert not paper._cheaper_by_reshape(torch.randn(1, 1024, 320))  # measured slower on the SD slice


ROTATIONS = {"oft": lycoris.OFT(dim=4), "oft_rescaled_constrained": lycoris.OFT(dim=4, rescaled=True, constraint=0.5),
             "boft": lycoris.BOFT(dim=4), "boft_rescaled": lycoris.BOFT(dim=4, rescaled=True),
             "oft_rank_dropout": lycoris.OFT(dim=4, rank_dropout=0.3)}


@pytest.mark.parametrize("strategy", ROTATIONS.values(), ids=ROTATIONS.keys())
@pytest.mark.parametrize("layer", [nn.Linear(24, 16), nn.Conv2d(24, 16, 3, stride=2, padding=1)],
                         ids=["linear", "conv"])
def test_rotating_the_output_equals_rotating_the_weight_in_float64(strategy, layer):
    """OFT/BOFT's bypass (the frozen op, its output rotated) and the rebuilt weight compute the same outputs and
    the same gradients for the input and every adapter parameter (float64, multiplier 0.7, training mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer)).double()
    net = strategy.apply(model)
    adapter = net.adapters()[0]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    net.multiplier = 0.7
    net.train()
    x = torch.randn(3, 24, 5, 5, dtype=torch.float64) if isinstance(layer, nn.Conv2d) else \
        torch.randn(3, 7, 24, dtype=torch.float64)
    out = paths_agree(net, adapter, adapter._bypass_forward, x)
    if not adapter.rank_dropout:  # whichever path the layer's own forward takes
        torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-10)


def paths_agree(net, adapter, bypass, x):
    """Outputs and gradients (input, every adapter parameter) of ``bypass`` and of the rebuilt weight."""
    results = []
    for path in (bypass, lycoris.Adapter._forward.__get__(adapter)):
        torch.manual_seed(1)  # the same dropout masks on both paths
        inp = x.clone().requires_grad_()
        out = path(inp)
        results.append((out, *torch.autograd.grad(out.square().sum(), [inp, *net.parameters()])))
    for bypassed, rebuilt in zip(*results):
        torch.testing.assert_close(bypassed, rebuilt, atol=1e-12, rtol=1e-10)
    return results[0][0]


@pytest.mark.parametrize("on_output", [False, True], ids=["per-column", "per-row"])
@pytest.mark.parametrize("layer", [nn.Linear(24, 16), nn.Conv2d(24, 16, 3, stride=2, padding=1)],
                         ids=["linear", "conv"])
def test_dora_through_the_factors_equals_the_rebuilt_weight_in_float64(layer, on_output):
    """DoRA's norms from the factors and its magnitudes as input/output scales: the outputs and every gradient
    of the rebuilt m·(W0+ΔW)/‖W0+ΔW‖ (float64, multiplier 0.7)."""
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer)).double()
    net = lycoris.LoRA(dim=4, alpha=2, weight_decompose=True, dora_on_output=on_output).apply(model)
    adapter = net.adapters()[0]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    net.multiplier = 0.7
    x = torch.randn(3, 24, 5, 5, dtype=torch.float64) if isinstance(layer, nn.Conv2d) else \
        torch.randn(3, 7, 24, dtype=torch.float64)
    out = paths_agree(net, adapter, adapter._dora_forward, x)
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-10)  # whichever path the layer's forward takes
    conv = lycoris.LoRA(dim=8, weight_decompose=True).apply(nn.Sequential(nn.Conv2d(320, 320, 3, padding=1)))
    square = lycoris.LoRA(dim=8, weight_decompose=True).apply(nn.Sequential(nn.Linear(320, 320)))
    assert conv.adapters()[0]._factors_cheaper(torch.randn(1, 320, 32, 32))  # the weight is the larger
    assert not square.adapters()[0]._factors_cheaper(torch.randn(1, 1024, 320))  # the activations are


def test_rotations_rotate_the_output_where_the_weight_is_large_against_the_positions():
    """The choices measured on SD 1.5's slice (benchmarks/adapters.py): 3×3 convolutions and few-token layers rotate
    their output in training; 320-wide Linear layers over 1024 tokens, and sampling over many positions, rotate
    the weight."""
    def oft(layer):
        return lycoris.OFT(dim=4).apply(nn.Sequential(layer)).adapters()[0]

    conv, square, keys = oft(nn.Conv2d(320, 320, 3, padding=1)), oft(nn.Linear(320, 320)), oft(nn.Linear(768, 320))
    assert conv._bypass_cheaper(torch.randn(1, 320, 32, 32))
    assert not square._bypass_cheaper(torch.randn(1, 1024, 320))
    assert keys._bypass_cheaper(torch.randn(1, 77, 768))  # cross-attention's keys over the 77 text tokens
    with torch.no_grad():  # sampling: one rotated weight beats rotating 8192 positions
        assert not conv._bypass_cheaper(torch.randn(8, 320, 32, 32))


def test_boft_error_names_the_layer_and_the_sizes_that_work():
    model = nn.Sequential(nn.Linear(8, 320))
    with pytest.raises(ValueError, match=r"lora_unet_0 .*BOFT cannot factor dimension 320 with dim=4.*\[10, 20, 40"):
        lycoris.BOFT(dim=4).apply(model)


def test_dylora_trains_rank_prefixes_and_saves_full_rank(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    net = lycoris.DyLoRA(dim=8, alpha=8, block_size=4).apply(model)
    adapter = net.adapters()[0]
    with torch.no_grad():
        adapter.lora_up.weight.normal_()
    x = torch.randn(2, 16)
    net.train()
    outputs = {tuple(model(x).flatten().tolist()) for _ in range(20)}
    assert len(outputs) == 2  # rank 4 or rank 8, each with scale alpha/b
    net.eval()
    full = model(x)
    up, down = adapter.lora_up.weight, adapter.lora_down.weight
    torch.testing.assert_close(full, nn.functional.linear(x, model[0].weight + up @ down * (8 / 8), model[0].bias))
    path = lycoris.save_file(tmp_path / "d.safetensors", {"lora_unet": net})
    from safetensors.torch import load_file
    assert set(load_file(path)) == {"lora_unet_0.lora_down.weight", "lora_unet_0.lora_up.weight", "lora_unet_0.alpha"}


def test_unknown_hyperparameter_is_named_at_construction():
    with pytest.raises(TypeError, match="dimm"):
        lycoris.LoRA(dimm=4)
    with pytest.raises(ValueError, match=r"overrides\['\*attn2\*'\].*'rnak'"):
        lycoris.LoKr(overrides={"*attn2*": {"rnak": 4}})
    with pytest.raises(ValueError, match="preset 'attn'"):
        lycoris.LoHa(preset="attn")
    with pytest.raises(ValueError, match="dropout=1.5"):
        lycoris.LoRA(dropout=1.5)


def test_overrides_targets_and_exclude():
    model = nn.ModuleDict({
        "attn": nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)}),
        "conv": nn.Conv2d(8, 8, 3),
        "skip": nn.Conv2d(8, 8, 1),
    })
    strategy = lycoris.LoRA(dim=2, conv_dim=0, exclude=["skip"], overrides={"attn.to_k": {"dim": 5, "alpha": 1}})
    net = strategy.apply(model, prefix="p")
    adapters = dict(net.named_children())
    assert set(adapters) == {"p_attn_to_q", "p_attn_to_k"}  # 3x3 conv skipped by conv_dim=0, 1x1 excluded
    assert adapters["p_attn_to_k"].dim == 5 and adapters["p_attn_to_k"].scale == pytest.approx(1 / 5)
    assert adapters["p_attn_to_q"].dim == 2 and adapters["p_attn_to_q"].scale == 1.0
    net.remove()
    net = lycoris.LoRA(dim=2, targets=["conv"], conv_dim=3, conv_alpha=1.5).apply(model, prefix="p")
    (adapter,) = net.adapters()
    assert adapter.dim == 3 and adapter.scale == pytest.approx(0.5)
    with pytest.raises(ValueError, match="matched no layer"):
        lycoris.LoRA(targets=["nothing*"]).apply(model)


def test_second_network_on_the_same_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    net = lycoris.LoRA().apply(model)
    with pytest.raises(RuntimeError, match="already has an adapter"):
        lycoris.LoHa().apply(model)
    net.remove()
    lycoris.LoHa().apply(model)


def test_loha_memory_saving_backward_matches_autograd():
    torch.manual_seed(0)
    w = [torch.randn(6, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True),
         torch.randn(6, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
    g = torch.randn(6, 5)
    (lycoris.functional.HadamardProduct.apply(*w, 0.5) * g).sum().backward()
    ours = [t.grad.clone() for t in w]
    for t in w:
        t.grad = None
    ((w[0] @ w[1]) * (w[2] @ w[3]) * 0.5 * g).sum().backward()
    for a, t in zip(ours, w):
        torch.testing.assert_close(a, t.grad)


def test_oft_rotation_is_orthogonal_and_constrained():
    torch.manual_seed(0)
    net = lycoris.OFT(dim=4, constraint=1e-3).apply(nn.Sequential(nn.Linear(8, 16)))
    adapter = net.adapters()[0]
    with torch.no_grad():
        adapter.oft_blocks.normal_()
    r = adapter.rotation()
    eye = torch.eye(4).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    # ‖Q‖ capped at the constraint: R stays within ~2·constraint of I.
    assert (r - eye).norm() < 2.5e-3


def test_merge_into_bakes_files_in_order(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    paths, deltas = [], []
    for i, strategy in enumerate([lycoris.LoRA(dim=2), lycoris.LoKr(factor=2, dim=10000)]):
        model = copy.deepcopy(base)
        net = strategy.apply(model)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        deltas.append(net.delta_weights()["lora_unet_0"])
        paths.append(lycoris.save_file(tmp_path / f"{i}.safetensors", {"lora_unet": net}))
    merged = copy.deepcopy(base)
    changed = lycoris.merge_into({"lora_unet": merged}, [(paths[0], 1.0), (paths[1], 0.5)])
    assert changed == {"lora_unet": 2}
    assert "forward" not in merged[0].__dict__  # nothing attached: plain layers
    torch.testing.assert_close(merged[0].weight, base[0].weight + deltas[0] + 0.5 * deltas[1])
    assert math.isfinite(merged(x).sum().item())


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 16), nn.LayerNorm(16)], ids=["groupnorm", "layernorm"])
def test_norm_adapter_on_a_bfloat16_norm_trains_float32_deltas(norm):
    """A bf16 base norm (``weight_dtype: bfloat16``): w_norm/b_norm stay float32 and get float32 gradients, the layer
    computes in bf16 with γ + m·w_norm and β + m·b_norm rounded once, and merging adds them to the bf16 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(norm).to(torch.bfloat16)
    base = copy.deepcopy(model[0])
    net = lycoris.Full(train_norm=True).apply(model)
    (adapter,) = net.adapters()
    assert isinstance(adapter, lycoris.NormAdapter)
    assert {n: (p.dtype, tuple(p.shape)) for n, p in adapter.named_parameters()} == {
        "w_norm": (torch.float32, (16,)), "b_norm": (torch.float32, (16,))}
    with torch.no_grad():
        adapter.w_norm.normal_(std=0.1)
        adapter.b_norm.normal_(std=0.1)
    net.multiplier = 0.5
    x = torch.randn(2, 16, 3, 3) if isinstance(norm, nn.GroupNorm) else torch.randn(2, 3, 16)
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.weight.copy_(base.weight.float() + 0.5 * adapter.w_norm)
        ref.bias.copy_(base.bias.float() + 0.5 * adapter.b_norm)
        torch.testing.assert_close(out, ref(x.bfloat16()), atol=0, rtol=0)
    out.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert model[0].weight.grad is None and not model[0].weight.requires_grad
    net.merge()
    torch.testing.assert_close(model[0].weight, ref.weight)  # bf16(γ) + bf16(m·w_norm): one more rounding
    net.unmerge()
    assert torch.equal(model[0].weight, base.weight) and torch.equal(model[0].bias, base.bias)


@pytest.mark.parametrize("strategy", [lycoris.LoRA(dim=4, alpha=1), lycoris.LoHa(dim=4, alpha=1),
                                      lycoris.GLoRA(dim=4, alpha=1), lycoris.OFT(dim=4, constraint=1e-4),
                                      lycoris.IA3()], ids=lambda s: type(s).__name__)
def test_the_file_constants_the_forward_reads_follow_a_loaded_state_dict(strategy):
    """alpha, the constraint and on_input are buffers read as Python numbers (for torch.compile): loading another
    value into the buffer changes what the forward computes, exactly as an adapter built with that value."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    net = strategy.apply(nn.Sequential(layer), prefix="x")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    state = net.state_dict()
    key = next(k for k in state if k.endswith((".alpha", ".on_input")))
    changed = {**state, key: torch.ones_like(state[key]) if key.endswith("on_input") else state[key] * 3}
    x = torch.randn(2, 8)
    before = layer(x)
    net.load_state_dict(changed)
    after = layer(x)
    net.remove()
    rebuilt = type(net.adapters()[0]).from_state_dict(layer, {k.split(".", 1)[1]: v for k, v in changed.items()})
    rebuilt.load_state_dict({k.split(".", 1)[1]: v for k, v in changed.items()})
    rebuilt.to_base().attach()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, layer(x))
