"""Sampling with the model being trained: per-image seeds, the base model at multiplier 0, the sampler's options."""

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

import lycoris
from lycoflow.evaluation.sampling import Sampler, adapters_off, sample
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD

PROMPTS = ["zqx star, yellow", "a red ring", "pixel art of a robot"]


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    torch.manual_seed(0)
    module = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4, preset="attn-mlp")).eval()
    for p in module.networks.parameters():  # off the zero init, so the adapter changes the images
        torch.nn.init.normal_(p, std=0.1)
    return module


def test_an_image_depends_on_its_prompt_and_seed_only(model):
    sampler = Sampler(steps=3, resolution=32)
    together = sample(model.components, PROMPTS, [1, 2, 3], sampler)
    assert together.shape == (3, 3, 32, 32) and together.dtype == torch.float32
    assert together.min() >= 0 and together.max() <= 1
    alone = sample(model.components, PROMPTS[1:2], [2], sampler)
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-4)
    other_seed = sample(model.components, PROMPTS[1:2], [5], sampler)
    assert (other_seed[0] - together[1]).abs().max() > 1e-2


def test_multiplier_zero_generates_the_base_model(model, tiny_sd_folder):
    sampler = Sampler(steps=3, resolution=32, guidance_scale=1.0)
    with adapters_off(model.networks.values()):
        off = sample(model.components, PROMPTS, [1, 2, 3], sampler)
    assert all(net.multiplier == 1.0 for net in model.networks.values())  # restored
    adapted = sample(model.components, PROMPTS, [1, 2, 3], sampler)
    bare = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4, preset="attn-mlp"))
    for net in bare.networks.values():
        net.remove()
    base = sample(bare.components, PROMPTS, [1, 2, 3], sampler)
    torch.testing.assert_close(off, base, atol=1e-6, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-2


def test_ancestral_samplers_are_deterministic_too(model):
    sampler = Sampler(scheduler=EulerAncestralDiscreteScheduler, steps=3, resolution=32)
    first, second = (sample(model.components, PROMPTS[:2], [7, 8], sampler) for _ in range(2))
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="resolution=30 must be a multiple of 8"):
        Sampler(resolution=30)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        Sampler(steps=0)
