"""Text-to-image sampling with the model being trained (or a base model with adapter files attached).

The loop is diffusers' components driven directly rather than ``StableDiffusionPipeline``, for three reasons:
each image gets its own generator (its starting noise depends on its seed alone, not on its batch neighbours),
the VAE decodes in float32 while the UNet may hold bfloat16 weights, and the adapters stay attached in-process,
so any algorithm (and its multiplier: 0 gives the base model, :func:`adapters_off`) is what generates.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from torch import Tensor

from lycoris import Network

from ..models import Components


class Sampler:
    """How evaluation images are generated (paper: DDIM, 25 steps, CFG 7, 512²: SD 1.5's size).

    Args:
        scheduler: a diffusers scheduler class, built from the base model's noise schedule
            (``diffusers.DDIMScheduler``, ``diffusers.EulerDiscreteScheduler``,
            ``diffusers.DPMSolverMultistepScheduler``, ...).
        steps: denoising steps.
        guidance_scale: classifier-free guidance; 1 turns it off (and halves the cost).
        resolution: side of the square images; None: the base model's own (`native_resolution`: 512 for SD 1.5,
            768 for SD 2.x-v, 1024 for SDXL).
        negative_prompt: the unconditional prompt of classifier-free guidance.
        batch_size: images per UNet call.
    """

    def __init__(self, scheduler: type[SchedulerMixin] = DDIMScheduler, steps: int = 25, guidance_scale: float = 7.0,
                 resolution: int | None = None, negative_prompt: str = "", batch_size: int = 8) -> None:
        for name, value in (("steps", steps), ("resolution", resolution), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"Sampler: {name}={value} must be >= 1")
        if resolution is not None and resolution % 8:
            raise ValueError(f"Sampler: resolution={resolution} must be a multiple of 8 (Stable Diffusion's VAE "
                             "downsampling)")
        self.scheduler, self.steps, self.guidance_scale = scheduler, steps, guidance_scale
        self.resolution, self.negative_prompt, self.batch_size = resolution, negative_prompt, batch_size

    def side(self, parts: Components) -> int:
        """The images' side for the model ``parts``: ``resolution``, or the model's own."""
        return self.resolution or native_resolution(parts)

    def describe(self, parts: Components) -> dict[str, object]:
        """What decides the images of the model ``parts`` (stored beside cached base images, to know when they
        are stale): the side as resolved for it, so a default sampler and an explicit 512 are the same."""
        return {"scheduler": self.scheduler.__name__, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "resolution": self.side(parts), "negative_prompt": self.negative_prompt}


def native_resolution(parts: Components) -> int:
    """The image side a base model was trained at: its UNet's latent size times the VAE's downsampling."""
    return parts.unet.config.sample_size * _downsampling(parts)


def _downsampling(parts: Components) -> int:
    # 8 for SD, 4 for the toy base (a multiple of 8, as Sampler checks, divides by either).
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


@torch.no_grad()
def sample(parts: Components, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler) -> Tensor:
    """Images ``[n, 3, r, r]`` in [0, 1] (float32, on the model's device), one per (prompt, seed), in one batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    device = next(parts.unet.parameters()).device
    dtype = parts.unet.dtype
    scheduler = sampler.scheduler.from_config(parts.scheduler.config)
    scheduler.set_timesteps(sampler.steps, device=device)
    guided = sampler.guidance_scale != 1.0
    context, pooled = parts.encode_prompt(prompts)
    if guided:
        negative, negative_pooled = parts.encode_prompt([sampler.negative_prompt] * len(prompts))
        context = torch.cat([negative, context])
        pooled = None if pooled is None else torch.cat([negative_pooled, pooled])
    # SDXL's size conditioning: the image as it is generated, uncropped (diffusers' default too).
    rows = 2 * len(prompts) if guided else len(prompts)
    r = sampler.side(parts)
    sizes = torch.tensor([[r, r, 0, 0, r, r]] * rows) if parts.is_sdxl else None
    condition = parts.unet_conditioning(context.to(device), None if pooled is None else pooled.to(device), sizes)
    side = r // _downsampling(parts)
    channels = parts.unet.config.in_channels
    # One generator per image, on the CPU: the same seed gives the same noise on any device and in any batch.
    noise = [torch.randn((channels, side, side), generator=torch.Generator().manual_seed(s)) for s in seeds]
    latents = torch.stack(noise).to(device) * scheduler.init_noise_sigma
    # Ancestral/SDE samplers draw noise at every step too: from the batch's first seed (DDIM, the default, does not).
    extra = {"generator": torch.Generator(device).manual_seed(seeds[0])} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        pred = parts.unet(model_input.to(dtype), t, **condition).sample.float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + sampler.guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, **extra).prev_sample
    latents = latents.float() / parts.vae.config.scaling_factor
    with torch.autocast(device.type, enabled=False):  # SD's VAE overflows in half precision
        # One image at a time: SD's float32 decoder needs GBs per 512² image, on top of the training state.
        images = torch.cat([parts.vae.decode(z[None]).sample for z in latents])
    return ((images + 1) / 2).clamp(0, 1)


@contextmanager
def adapters_off(networks: Iterable[Network]):
    """The base model: every network at multiplier 0, restored after."""
    networks = list(networks)
    saved = [net.multiplier for net in networks]
    try:
        for net in networks:
            net.multiplier = 0.0
        yield
    finally:
        for net, value in zip(networks, saved):
            net.multiplier = value
