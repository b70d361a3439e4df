"""The invariant matrix: every algorithm × every layer kind satisfies the adapter contract — ΔW in W0's shape with
the scale applied once, a forward computing with W0 + multiplier·ΔW, exact merge and unmerge, a file that loads
back — and every strategy keeps its constructor arguments under their own names. Norm layers (GroupNorm,
LayerNorm) get the same checks for the `lycoris.NormAdapter` that strategies build on them with ``train_norm``:
one code path for every strategy (`Strategy.apply`), so a few strategies stand for all here, and
`test_every_strategy_trains_norms_with_the_norm_adapter` checks that each built-in one builds it."""

import copy
import inspect

import pytest
import torch
from torch import nn

import lycoris

LAYERS = {
    "linear": lambda: nn.Linear(16, 32),
    "conv1d": lambda: nn.Conv1d(16, 32, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv2d_3x3_s2": lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
    "conv2d_3x3_dilated_reflect": lambda: nn.Conv2d(16, 32, 3, padding=2, dilation=2, padding_mode="reflect"),
}


def affine(norm: nn.Module) -> nn.Module:
    """A norm layer whose affine weight and bias are not the identity's (so that "add" and "replace" differ)."""
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.2 * torch.randn_like(norm.bias))
    return norm


NORMS = {
    "groupnorm": lambda: affine(nn.GroupNorm(4, 16)),
    "layernorm": lambda: affine(nn.LayerNorm(16)),
}
INPUTS = {
    "linear": (2, 5, 16),
    "conv1d": (2, 16, 9),
    "conv2d_1x1": (2, 16, 6, 6),
    "conv2d_3x3_s2": (2, 16, 7, 7),
    "conv2d_3x3_dilated_reflect": (2, 16, 6, 6),
    "groupnorm": (2, 16, 5, 5),
    "layernorm": (2, 5, 16),
}
STRATEGIES = {
    "lora": lambda: lycoris.LoRA(dim=4, alpha=2),
    "locon_tucker": lambda: lycoris.LoRA(dim=4, alpha=2, use_tucker=True),
    "dora": lambda: lycoris.LoRA(dim=4, alpha=2, weight_decompose=True),
    "dora_on_output": lambda: lycoris.LoRA(dim=4, alpha=2, weight_decompose=True, dora_on_output=True),
    "loha": lambda: lycoris.LoHa(dim=4, alpha=2),
    "loha_tucker": lambda: lycoris.LoHa(dim=4, alpha=2, use_tucker=True),
    "loha_dora": lambda: lycoris.LoHa(dim=4, alpha=2, weight_decompose=True),
    "lokr_lowrank": lambda: lycoris.LoKr(factor=4, dim=2, alpha=1),
    "lokr_full": lambda: lycoris.LoKr(factor=4, dim=10000, alpha=1),
    "lokr_both_tucker": lambda: lycoris.LoKr(dim=1, alpha=1, decompose_both=True, use_tucker=True),
    "lokr_dora": lambda: lycoris.LoKr(factor=4, dim=2, alpha=1, weight_decompose=True),
    "lokr_dora_on_output": lambda: lycoris.LoKr(factor=4, dim=2, alpha=1, weight_decompose=True, dora_on_output=True),
    "dylora": lambda: lycoris.DyLoRA(dim=4, alpha=4, block_size=2),
    "glora": lambda: lycoris.GLoRA(dim=4, alpha=2),
    "ia3": lambda: lycoris.IA3(),
    "ia3_input": lambda: lycoris.IA3(train_on_input=True),
    "oft": lambda: lycoris.OFT(dim=4),
    "oft_constrained": lambda: lycoris.OFT(dim=8, constraint=0.05, rescaled=True),
    "boft": lambda: lycoris.BOFT(dim=4),
    "boft_rescaled": lambda: lycoris.BOFT(dim=8, rescaled=True),
    "full": lambda: lycoris.Full(),
}
MULTIPLIER = 0.7
NORM_STRATEGIES = ("lora", "dora", "full")  # a plain, a DoRA (whose options a norm adapter must not take), native

#: (layer kind, strategy) cells: every strategy on every weight layer, the norm adapter's strategies on the norms.
CELLS = [(layer, strategy) for layer in LAYERS for strategy in STRATEGIES] + [
    (norm, strategy) for norm in NORMS for strategy in NORM_STRATEGIES]
cells = pytest.mark.parametrize(("layer_kind", "strategy_name"), CELLS, ids=[f"{l}-{s}" for l, s in CELLS])


def make_strategy(layer_kind, strategy_name):
    strategy = STRATEGIES[strategy_name]()
    if layer_kind in NORMS:
        strategy = type(strategy)(**(strategy.settings() | {"train_norm": True}))
    return strategy


def build(layer_kind, strategy_name, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential((LAYERS | NORMS)[layer_kind]())
    original = copy.deepcopy(model)
    net = make_strategy(layer_kind, strategy_name).apply(model, prefix="lora_unet")
    x = torch.randn(INPUTS[layer_kind])
    return model, original, net, x


@torch.no_grad()
def randomize(net):
    gen = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def expected(original, net, x, multiplier):
    """The original layer's own forward, its weight (and bias) replaced by W0 + multiplier·ΔW (b0 + multiplier·Δb)."""
    layer = copy.deepcopy(original[0])
    adapter = net.adapters()[0]
    layer.weight.add_(multiplier * adapter.delta_weight())
    db = adapter.delta_bias()
    if db is not None:
        layer.bias.add_(multiplier * db)
    return layer(x)


@cells
@torch.no_grad()
def test_contract(layer_kind, strategy_name):
    model, original, net, x = build(layer_kind, strategy_name)
    net.eval()
    base_out = original(x)
    # A fresh adapter changes nothing.
    torch.testing.assert_close(model(x), base_out, atol=1e-5, rtol=0)
    assert all(d.abs().max() < 1e-6 for d in net.delta_weights().values())

    randomize(net)
    net.multiplier = MULTIPLIER
    out = model(x)
    assert (out - base_out).abs().max() > 1e-3, "randomised adapter should change the output"
    torch.testing.assert_close(out, expected(original, net, x, MULTIPLIER), atol=1e-5, rtol=1e-5)

    # Merge gives the same output through the plain layer; unmerge gives W0 back.
    net.merge()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    assert "forward" in model[0].__dict__
    net.unmerge()
    torch.testing.assert_close(model[0].weight, original[0].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model[0].bias, original[0].bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)

    # Multiplier 0 is the base model.
    net.multiplier = 0.0
    torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=0)
    net.multiplier = MULTIPLIER

    # remove() restores the module exactly.
    net.remove()
    assert "forward" not in model[0].__dict__
    assert torch.equal(model[0].weight, original[0].weight) and torch.equal(model[0].bias, original[0].bias)
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)


@cells
def test_only_adapter_parameters_train(layer_kind, strategy_name):
    model, _, net, x = build(layer_kind, strategy_name)
    assert not any(p.requires_grad for p in model.parameters())
    params = list(net.parameters())
    assert params and all(p.requires_grad for p in params)
    randomize(net)
    net.train()
    model(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@cells
@torch.no_grad()
def test_save_load_roundtrip(tmp_path, layer_kind, strategy_name):
    model, original, net, x = build(layer_kind, strategy_name)
    randomize(net)
    net.eval()
    want = model(x)
    path = lycoris.save_file(tmp_path / "a.safetensors", {"lora_unet": net})
    # Read by the built-in table, and by the strategy's own adapter_class alone.
    for algorithms in (lycoris.ALGORITHMS, [make_strategy(layer_kind, strategy_name)]):
        fresh = copy.deepcopy(original)
        loaded = lycoris.load_file(path, {"lora_unet": fresh}, algorithms=algorithms)["lora_unet"]
        loaded.eval()
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)
        loaded.multiplier = 0.0
        torch.testing.assert_close(fresh(x), original(x), atol=1e-6, rtol=0)


# The algorithms: strategies that name the adapter reading their files (not the bases Strategy, Decomposable).
BUILT_IN = [cls for cls in map(vars(lycoris).get, lycoris.__all__)
            if isinstance(cls, type) and issubclass(cls, lycoris.Strategy) and hasattr(cls, "adapter_class")]


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda cls: cls.__name__)
def test_a_strategy_stores_each_constructor_argument_under_its_own_name(cls):
    """settings(), network_args() (the files' ss_network_args), overrides, recipes and the analysis read the
    arguments back by name."""
    strategy = cls()
    for klass in cls.__mro__[:cls.__mro__.index(lycoris.Strategy) + 1]:
        if "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name == "self" or param.kind is param.VAR_KEYWORD:
                continue
            assert name in vars(strategy), f"{cls.__name__}({name}=...) is not stored as self.{name}"
            if param.default is not None:  # None may be stored normalised (exclude=None as [])
                assert getattr(strategy, name) == param.default, name
    assert type(strategy)(**strategy.settings()).settings() == strategy.settings()
    assert cls in {type(make()) for make in STRATEGIES.values()}, "every built-in strategy runs the matrix above"
    assert issubclass(cls.adapter_class, lycoris.Adapter) and cls.adapter_class in lycoris.ALGORITHMS


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda cls: cls.__name__)
def test_every_strategy_trains_norms_with_the_norm_adapter(cls):
    """With train_norm, every algorithm (Full included, as the LyCORIS library's full + train_norm) puts a
    `NormAdapter` on the norm layers and its own adapter on the others; the norms start unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), NORMS["groupnorm"](), NORMS["layernorm"]())
    net = cls(dim=4, train_norm=True).apply(model)
    kinds = {name: type(adapter) for name, adapter in net.named_children()}
    assert kinds.keys() == {"lora_unet_0", "lora_unet_1", "lora_unet_2"}
    assert issubclass(kinds["lora_unet_0"], cls.adapter_class)  # DyLoRA's adapter is a LoRA one
    assert kinds["lora_unet_1"] is kinds["lora_unet_2"] is lycoris.NormAdapter
    assert all(not d.any() for name, d in net.delta_weights().items() if name != "lora_unet_0")
    # Without train_norm and without preset, norms are left alone.
    plain = cls(dim=4).apply(nn.Sequential(nn.GroupNorm(4, 16), nn.Linear(16, 16)))
    assert [a.name for a in plain.adapters()] == ["lora_unet_1"]
