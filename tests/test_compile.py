"""`model.compile`: torch.compile traces the UNet with every algorithm's adapters in one graph (no break per layer),
and a compiled fit trains as an uncompiled one does and resumes exactly."""

import pytest
import torch
import torch._dynamo as dynamo
from diffusers.models.attention_processor import AttnProcessor2_0

import lycoris
from lycoflow.lightning_cli import run_lightning
from lycoflow.tiny import TinySD

STRATEGIES = {
    "LoRA": lambda: lycoris.LoRA(dim=4, alpha=2, preset="attn-mlp"),
    "LoCon": lambda: lycoris.LoRA(dim=4, alpha=2, preset="full"),  # convolutions, norms and the time embedding too
    "LoKr": lambda: lycoris.LoKr(factor=8, dim=10000, preset="attn-mlp"),
    "LoHa": lambda: lycoris.LoHa(dim=4, alpha=2, preset="attn-mlp"),
    "GLoRA": lambda: lycoris.GLoRA(dim=4, preset="attn-mlp"),
    "IA3": lambda: lycoris.IA3(preset="attn-mlp"),
    "OFT": lambda: lycoris.OFT(dim=4, constraint=1e-3, preset="attn-mlp"),
    "BOFT": lambda: lycoris.BOFT(dim=4, preset="attn-mlp"),
    "DoRA": lambda: lycoris.LoRA(dim=4, weight_decompose=True, preset="attn-mlp"),
    "Full": lambda: lycoris.Full(preset="attn-mlp"),
    "dropouts": lambda: lycoris.LoRA(dim=4, dropout=0.1, rank_dropout=0.1, preset="attn-mlp"),
}
#: Run by default; the rest with the slow tests. On the 8-bit bases (their op is the same under every algorithm):
#: LoRA, and on int8 DoRA, which reads the dequantised W0.
QUICK = ("LoRA", "IA3")
CASES = [pytest.param("float32", n, marks=[] if n in QUICK else pytest.mark.slow) for n in STRATEGIES] + [
    pytest.param(base, n, marks=pytest.mark.slow) for base, n in (("int8", "LoRA"), ("int8", "DoRA"),
                                                                   ("float8", "LoRA"))]


@pytest.fixture(scope="module")
def unet(tiny_sd_folder):
    unet = TinySD(folder=tiny_sd_folder).load().unet.requires_grad_(False).train()
    unet.set_attn_processor(AttnProcessor2_0())  # as DiffusionFinetune does
    return unet


def graph_breaks(unet: torch.nn.Module) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    dynamo.reset()
    explained = dynamo.explain(lambda h: unet(h, torch.tensor([10, 500]), encoder_hidden_states=context).sample)(x)
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize(("base", "name"), CASES)
def test_the_unet_with_its_adapters_is_one_graph(base, name, unet, tiny_sd_folder):
    if base != "float32":
        pytest.importorskip("torchao")
        unet = TinySD(folder=tiny_sd_folder).load().unet.requires_grad_(False).train()
        lycoris.quantize_frozen(unet, base)
    net = STRATEGIES[name]().apply(unet, prefix="lora_unet")
    try:
        assert graph_breaks(unet) == []
    finally:
        net.remove()


@pytest.mark.slow
def test_dylora_and_module_dropout_break_the_graph_as_documented(unet):
    """Their random rank or skip per step is a value the graph branches on; the docstring of `compile` says so.
    (On the middle block's layers only: every break is one more graph to compile.)"""
    for strategy, reasons in ((lycoris.DyLoRA(dim=4, block_size=2, preset="attn-mlp"), ("Tensor.item()",)),
                              (lycoris.LoRA(dim=4, module_dropout=0.1, preset="attn-mlp"),
                               ("Data-dependent branching", "generic_jump TensorVariable"))):
        net = strategy.apply(unet.mid_block, prefix="lora_unet_mid_block")
        assert len(net.adapters()) >= 4
        try:
            breaks = graph_breaks(unet)
            assert breaks and all(any(reason in b for reason in reasons) for b in breaks), breaks
        finally:
            net.remove()


@pytest.mark.slow
def test_a_compiled_fit_trains_as_an_uncompiled_one_and_resumes_exactly(tiny, tmp_path):
    opts = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]",
            "--model.adapter=lycoris.LoRA", "--model.adapter.init_args.dim=4", "--model.train_text_encoder=false")

    def fit(run, *extra):
        return run_lightning(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={tmp_path / run}",
                              *opts, *extra])

    eager = fit("eager").model.trainable_state_dict()
    compiled = fit("compiled", "--model.compile=true")
    assert hasattr(compiled.model.unet, "_compiled_call_impl") and compiled.model.unet._compiled_call_impl is not None
    moved = 0
    for key, tensor in compiled.model.trainable_state_dict().items():
        # Adam divides by the gradients' own size, so rounding in the near-zero ones grows: within 1% of the scale.
        assert (tensor - eager[key]).abs().max() <= 1e-2 * tensor.abs().max(), key
        moved += key.endswith("lora_up.weight") and bool(tensor.abs().sum() > 0)
    assert moved
    fit("resumed", "--model.compile=true", "--trainer.max_epochs=1")
    resumed = fit("resumed", "--model.compile=true", "--ckpt_path=last")
    assert resumed.trainer.global_step == 2
    for key, tensor in compiled.model.trainable_state_dict().items():
        assert torch.equal(tensor, resumed.model.trainable_state_dict()[key]), key
