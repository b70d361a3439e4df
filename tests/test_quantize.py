"""An 8-bit frozen base (`lycoris.quantize_frozen`, `model.quantize_base: int8 | float8`): every algorithm on it
computes what it computes on a full-precision base holding the dequantised weights (outputs and every gradient),
no full-precision copy of a quantized weight is kept for backward, and a fit on it trains, saves and resumes
exactly; for both storages."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lycoris
from lycoflow.lightning_cli import run_lightning
from lycoris.quantize import QuantizedConv1d, QuantizedConv2d, QuantizedLinear, dense_weight

pytest.importorskip("torchao")


class Layers(nn.Module):
    """A strided 3×3 convolution, a Linear over its pixels and a Conv1d over them: the three layer kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1, stride=2)
        self.lin = nn.Linear(24, 48)
        self.seq = nn.Conv1d(48, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.conv(x).flatten(2).transpose(1, 2))
        return self.seq(h.transpose(1, 2))


KINDS = ("int8", "float8")


def quantized_and_dense(kind: str, seed: int = 0) -> tuple[Layers, Layers]:
    torch.manual_seed(seed)
    quantized = Layers().requires_grad_(False)
    assert lycoris.quantize_frozen(quantized, kind) == 3
    dense = Layers().requires_grad_(False)
    with torch.no_grad():
        for name in ("conv", "lin", "seq"):
            getattr(dense, name).weight.copy_(dense_weight(getattr(quantized, name)))
            getattr(dense, name).bias.copy_(getattr(quantized, name).bias)
    return quantized, dense


STRATEGIES = {
    "LoRA": lambda: lycoris.LoRA(dim=4, alpha=2),
    "LoKr": lambda: lycoris.LoKr(factor=4, dim=10000),
    "LoHa": lambda: lycoris.LoHa(dim=4, alpha=2),
    "DyLoRA": lambda: lycoris.DyLoRA(dim=4, block_size=2),
    "GLoRA": lambda: lycoris.GLoRA(dim=4),
    "IA3": lambda: lycoris.IA3(),
    "OFT": lambda: lycoris.OFT(dim=4, rescaled=True),
    "BOFT": lambda: lycoris.BOFT(dim=8),
    "DoRA": lambda: lycoris.LoRA(dim=4, weight_decompose=True),
    "Full": lambda: lycoris.Full(),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_algorithm_on_the_8bit_base_computes_as_on_the_dequantised_one(name, kind):
    quantized, dense = quantized_and_dense(kind)
    torch.manual_seed(1)
    on_quantized = STRATEGIES[name]().apply(quantized, prefix="x")
    on_dense = STRATEGIES[name]().apply(dense, prefix="x")
    with torch.no_grad():  # away from the zero initialisation, so that every term of ΔW counts
        for p in on_quantized.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    on_dense.load_state_dict(on_quantized.state_dict())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    torch.manual_seed(2)  # DyLoRA draws its rank per call: the same draws for both
    y = quantized(x)
    torch.manual_seed(2)
    y_dense = dense(x_dense)
    torch.testing.assert_close(y, y_dense, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in on_quantized.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), name
    for n, p in on_dense.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


#: The factored paths, and the cost-model choice that would pick the rebuilt weight on these small layers (which
#: keeps the adapted weight for backward, as on a full-precision base).
FACTORED = {"LoRA": None, "IA3": None, "LoKr": (lycoris.LoKrAdapter, "_cheaper_by_reshape"),
            "OFT": (lycoris.OFTAdapter, "_bypass_cheaper")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FACTORED)
def test_the_base_is_stored_in_8bits_near_its_weights_and_the_factored_paths_keep_no_dense_copy(name, kind,
                                                                                                 monkeypatch):
    torch.manual_seed(0)
    original = Layers().requires_grad_(False)
    quantized = Layers().requires_grad_(False)
    quantized.load_state_dict(original.state_dict())
    lycoris.quantize_frozen(quantized, kind)
    assert (type(quantized.conv), type(quantized.lin), type(quantized.seq)) == (
        QuantizedConv2d, QuantizedLinear, QuantizedConv1d)
    for layer in ("conv", "lin", "seq"):
        weight, reference = getattr(quantized, layer).weight, getattr(original, layer).weight
        assert weight.qdata.dtype == {"int8": torch.int8, "float8": torch.float8_e4m3fn}[kind]
        assert weight.shape == reference.shape and weight.dtype == reference.dtype
        assert weight.scale.numel() == reference.shape[0]  # one scale per output channel
        error = (dense_weight(getattr(quantized, layer)) - reference).abs()
        largest = reference.abs().flatten(1).amax(1).view(-1, *[1] * (reference.dim() - 1))
        if kind == "int8":  # symmetric rounding to 255 levels per channel: at most half a step off
            bound = largest / 127 / 2 + 1e-7
        else:  # e4m3 below the channel's largest, 448: 3 mantissa bits (half a step 2^-4 of the weight), and
            bound = reference.abs() / 16 + largest / 448 * 2.0 ** -10  # steps of 2^-9 below its normal range
        assert torch.all(error <= bound) and error.sum() > 0

    if FACTORED[name] is not None:
        monkeypatch.setattr(*FACTORED[name], lambda self, x: True)
    STRATEGIES[name]().apply(quantized, prefix="x")
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quantized(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
    # By size: autograd may keep a weight transposed. (No activation or adapter tensor here has a weight's size.)
    weights = {getattr(quantized, n).weight.numel() for n in ("conv", "lin", "seq")}
    kept = [t for t in saved if t.is_floating_point() and t.numel() in weights]
    assert saved and not kept


def test_what_is_not_a_frozen_zero_padded_layer_stays_and_merging_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.LayerNorm(4),
                          nn.Linear(4, 4).requires_grad_(False))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    model[0].weight.requires_grad_(True)  # trainable: left alone
    assert lycoris.quantize_frozen(model) == 1
    assert [type(m) for m in model] == [nn.Linear, nn.Conv2d, nn.LayerNorm, QuantizedLinear]
    with pytest.raises(ValueError, match="quantization='int4'.*'int8' or 'float8'"):
        lycoris.quantize_frozen(model, "int4")

    net = lycoris.LoRA(dim=2).apply(model, prefix="x")
    with pytest.raises(ValueError, match=r"x_3: cannot merge into a base stored in 8 bits"):
        net.merge()
    with pytest.raises(RuntimeError, match="quantize the frozen base before attaching adapters"):
        lycoris.quantize_frozen(model[:2])  # the trainable Linear is skipped; the adapted frozen conv is refused
    lycoris.save_file(tmp_path / "a.safetensors", {"x": net})
    net.remove()
    with pytest.raises(ValueError, match=r"x_3: cannot merge into a base stored in 8 bits"):
        lycoris.merge_into({"x": model}, [(tmp_path / "a.safetensors", 1.0)])


@pytest.mark.parametrize("kind", KINDS)
def test_a_fit_on_an_8bit_base_trains_saves_and_resumes_exactly(kind, tiny, tmp_path):
    opts = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]",
            f"--model.quantize_base={kind}", "--data.init_args.caption_dropout=0.3")

    def fit(run, *extra):
        return run_lightning(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={tmp_path / run}",
                              *opts, *extra])

    straight = fit("straight")
    model = straight.model
    assert isinstance(model.unet.conv_in, QuantizedConv2d) and isinstance(model.unet.conv_in.weight.qdata, torch.Tensor)
    assert isinstance(model.text_encoder.encoder.layers[0].mlp.fc1, QuantizedLinear)
    assert torch.isfinite(straight.trainer.callback_metrics["train/loss"])
    moved = [t for k, t in model.trainable_state_dict().items() if k.endswith("lokr_w1")]
    assert moved and all(t.abs().sum() > 0 for t in moved)

    fit("resumed", "--trainer.max_epochs=1")
    resumed = fit("resumed", "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_the_encoding_cache_key_of_a_quantized_encoder_is_that_of_its_dequantised_weights(kind):
    from lycoflow.data.encodings import module_digest

    original, (quantized, dense) = Layers(), quantized_and_dense(kind)
    assert module_digest(quantized, "x") == module_digest(dense, "x") != module_digest(original, "x")


@pytest.mark.parametrize("kind", KINDS)
def test_a_channel_of_zeros_or_of_tiny_weights_stays_finite(kind):
    """torchao's float8 scale of an all-zero channel is 0 (and its weights 0/0) unless bounded below."""
    layer = nn.Linear(8, 3).requires_grad_(False)
    with torch.no_grad():
        layer.weight[0] = 0
        layer.weight[1] *= 1e-6
    reference = layer.weight.clone()
    lycoris.quantize_frozen(layer, kind)
    weight = dense_weight(layer)
    assert torch.isfinite(weight).all() and torch.equal(weight[0], torch.zeros(8))
    torch.testing.assert_close(weight[2], reference[2], rtol=0.07, atol=0)
    assert torch.isfinite(layer(torch.randn(2, 8))).all()


def test_without_torchao_the_cli_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    from lycoflow.cli import main

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # `from torchao.quantization import` fails
    code = main(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={tmp_path}",
                 "--model.quantize_base=int8"])
    assert code == 2
    assert capsys.readouterr().err.startswith("lycoflow fit: error: an 8-bit frozen base needs torchao: pip install "
                                              "'lycoflow[quantize]'")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_importing_with_the_optional_extras_installed_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import lycoflow.module, lycoflow.optim, lycoris.quantize"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_an_8bit_base(tiny, tmp_path):
    """DDP broadcasts the parameters at its start: the int8 ones are left out, not an error."""
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "lycoflow.cli", "fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}",
         "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
         "--trainer.limit_val_batches=0", "--trainer.logger=false", "--model.quantize_base=int8",
         "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
