"""`DiffusionFinetune`: the loss is the paper's objective (and its v-prediction / min-SNR variants), memory
options do not change the maths, and the optimiser gets the paper's defaults and per-part learning rates."""

import pytest
import torch

import lycoris
from lycoflow.lightning_cli import run_lightning
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD


def batch(n=4, size=64):
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
            "caption": [f"zqx star, red, tag{i}" for i in range(n)]}


def module(folder, strategy=None, **kwargs):
    return DiffusionFinetune(TinySD(folder=str(folder)), strategy or lycoris.LoRA(dim=4, preset="attn-mlp"), **kwargs)


@pytest.mark.parametrize(("prediction_type", "gamma"), [("epsilon", None), ("v_prediction", None), ("epsilon", 5.0),
                                                       ("v_prediction", 1.0)])
def test_loss_is_the_denoising_objective(tiny_sd_folder, prediction_type, gamma):
    model = module(tiny_sd_folder, prediction_type=prediction_type, min_snr_gamma=gamma)
    for p in model.networks.parameters():  # move off the zero init so the adapter is in the loss
        torch.nn.init.normal_(p, std=0.05)
    data = batch()
    loss = model.denoising_loss(data, model._generator(3, 1))

    # Replay the same draws by hand: eq. (1) of the paper, ||target - UNet(z_t, t, c)||^2.
    gen = model._generator(3, 1)
    scheduler = model.noise_scheduler
    with torch.no_grad():
        posterior = model.vae.encode(data["pixel_values"]).latent_dist
    latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * 0.18215
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    pred = model.unet(noisy, t, **model.text_conditioning(data["caption"])).sample
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (a / (1 - a)).flatten()
        per_sample = per_sample * torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction_type == "epsilon"
                                                                             else snr + 1)
    torch.testing.assert_close(loss, per_sample.mean(), atol=1e-6, rtol=1e-5)


def test_noise_depends_only_on_seed_and_batch_position(tiny_sd_folder):
    a, b = module(tiny_sd_folder, seed=1), module(tiny_sd_folder, seed=1)
    torch.randn(10)  # the global RNG's state must not matter
    assert a.denoising_loss(batch(), a._generator(2, 5)) == b.denoising_loss(batch(), b._generator(2, 5))
    assert a.denoising_loss(batch(), a._generator(2, 5)) != a.denoising_loss(batch(), a._generator(2, 6))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd_folder):
    grads = []
    for checkpointing in (False, True):
        model = module(tiny_sd_folder, gradient_checkpointing=checkpointing)
        for p in model.networks.parameters():
            torch.nn.init.normal_(p, mean=0.01, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        model.denoising_loss(batch(), model._generator(0, 0)).backward()
        assert model.unet.is_gradient_checkpointing == model.text_encoder.is_gradient_checkpointing == checkpointing
        grads.append({k: p.grad for k, p in model.networks.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert any(k.startswith("lora_te.") for k in grads[0])  # the checkpointed text encoder trains too
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("strategy", [
    lycoris.LoKr(factor=4, dim=10000, preset="attn-mlp"), lycoris.LoRA(dim=4, conv_dim=2, preset="full"),
    lycoris.LoRA(dim=4, weight_decompose=True, preset="attn-mlp"), lycoris.LoHa(dim=4, preset="attn-mlp"),
    lycoris.OFT(dim=4, rescaled=True, preset="attn-mlp"), lycoris.IA3(preset="attn-mlp"),
    lycoris.Full(preset="attn-only"),
], ids=lambda s: type(s).__name__ + ("-dora" if getattr(s, "weight_decompose", False) else ""))
def test_bf16_base_under_bf16_autocast_trains_float32_adapters(tiny_sd_folder, strategy):
    """What `precision: bf16-mixed` with `weight_dtype: bfloat16` runs: bf16 weights and ops, fp32 adapters."""
    model = module(tiny_sd_folder, strategy, weight_dtype="bfloat16")
    assert model.unet.dtype == model.text_encoder.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    assert {p.dtype for p in model.networks.parameters()} == {torch.float32}
    for p in model.networks.parameters():
        torch.nn.init.normal_(p, mean=p.detach().mean().item(), std=0.01)  # off the zero init: real gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.denoising_loss(batch(2), model._generator(0, 0))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.networks.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_optimizer_has_paper_defaults_per_part_rates_and_warmup(tiny_sd_folder):
    model = module(tiny_sd_folder, lr=5e-4, text_encoder_lr=1e-4, warmup_steps=4)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["name"], g["weight_decay"], g["betas"]) for g in optimizer.param_groups] == [
        ("unet", 0.1, (0.9, 0.99)), ("text_encoder", 0.1, (0.9, 0.99))]
    rates = []
    for _ in range(6):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx([5e-4 / 4, 1e-4 / 4]) and rates[4] == rates[5] == pytest.approx([5e-4, 1e-4])
    # DoRA magnitudes start at the base weights' norms: decaying them towards zero would shrink the model.
    dora = module(tiny_sd_folder, lycoris.LoRA(dim=4, weight_decompose=True, preset="attn-only"))
    groups = dora.configure_optimizers().param_groups
    exempt = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(exempt) == 2 and sum(len(g["params"]) for g in exempt) == len(
        [n for n, _ in dora.networks.named_parameters() if n.endswith("dora_scale")])
    frozen_te = module(tiny_sd_folder, train_text_encoder=False)
    assert set(frozen_te.networks) == {"lora_unet"}
    assert not any(p.requires_grad for p in frozen_te.text_encoder.parameters())


def test_validate_command_reports_the_validation_loss(tiny_sd_folder, synthetic_root):
    cli = run_lightning(["validate", "recipes/tiny.yaml", "--model.base.init_args.folder", str(tiny_sd_folder),
                         f"--data.init_args.root={synthetic_root}", "--data.init_args.resolution=64",
                         "--trainer.logger=false", "--trainer.limit_val_batches=2",
                         "--trainer.enable_progress_bar=false"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
