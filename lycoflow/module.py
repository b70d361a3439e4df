"""`DiffusionFinetune`: the LightningModule that fine-tunes Stable Diffusion (1.x, 2.x, SDXL) with any
`lycoris.Strategy`.

The base model (UNet, VAE, text encoder(s), tokenizer(s), noise schedule) is frozen; the strategy wraps the
targeted layers of the UNet (and of the text encoders) and only the adapters' parameters train. The module never asks
which algorithm it runs: `Full` (native fine-tuning, trained as a weight difference) is one more strategy.

Loss: the paper's eq. (1), ‖ε − ε_θ(z_t, t, c)‖² on VAE latents, or the v-prediction target when the
scheduler says so; optional min-SNR-γ weighting and noise offset. Caption dropout comes from the data. SDXL's c
is both encoders' states, the second's pooled text and each sample's size numbers (`Components.unet_conditioning`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import lycoris

from . import __version__
from .data.encodings import module_digest
from .models import (
    DTYPES,
    SDXL_TEXT_ENCODER_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    BaseModel,
    Components,
    DType,
    MaxTokenLength,
    cast_frozen,
)


class DiffusionFinetune(L.LightningModule):
    """Fine-tune a Stable Diffusion 1.x/2.x or SDXL model with a LyCORIS adapter (or natively, with `lycoris.Full`).

    Args:
        base: where the base model comes from: `lycoflow.models.Pretrained` (Hub id, diffusers folder or
            single-file checkpoint) or `lycoflow.tiny.TinySD` (the offline tiny model).
        adapter: the algorithm and its hyperparameters, e.g. ``lycoris.LoKr`` — applied to the UNet, and to
            the text encoder unless ``text_encoder_adapter`` gives another.
        train_text_encoder: also adapt the text encoder (the paper does); for SDXL both text encoders.
        text_encoder_adapter: a different strategy for the text encoder; None uses ``adapter``.
        text_encoder_2_adapter: SDXL: a different strategy for the second text encoder (CLIP-G); None uses the
            first's.
        max_token_length: caption tokens the text encoder reads, in training, in the text-encoder cache and in
            evaluation sampling: 75 (CLIP's context) or, as kohya's ``max_token_length``, 150 (the paper) or 225:
            the caption is encoded in chunks of 75 whose hidden states are joined (see `Components.encode_text`).
        lr: learning rate of the UNet's adapter (paper: 5e-4 for adapters, 1e-6 for native fine-tuning).
        text_encoder_lr: learning rate of the text encoder's adapter; None uses ``lr``.
        text_encoder_2_lr: SDXL: learning rate of the second text encoder's adapter; None uses the first's.
        optimizer: the optimizer class and its arguments (its ``lr`` is replaced by the rates above); None
            means AdamW(weight_decay=0.1, betas=(0.9, 0.99)); the paper's is `lycoflow.optim.AdamW8bit` with
            those arguments.
        lr_scheduler: a scheduler applied per step after the warmup; None keeps the rate constant.
        warmup_steps: linear warmup of the learning rate over this many optimizer steps (the paper: 3,500, then
            constant).
        prediction_type: the UNet's target; None reads it from the model's scheduler config (SD 2.x-v says
            ``v_prediction``) or a single file's ``v_pred`` marker (NoobAI-v and other v-prediction SDXL).
        zero_terminal_snr: train on a noise schedule rescaled to zero SNR at its last step (Lin et al. 2024; the
            ``ztsnr`` marker of a single file); None reads it from the model's scheduler config or that marker.
        min_snr_gamma: weight each sample's loss by min(SNR, γ)/SNR (Hang et al. 2023; 5 is common); None off.
        noise_offset: add offset·N(0,1) per image and channel to the noise (learns darker/brighter images).
        gradient_checkpointing: recompute activations in the backward pass of the UNet (and the trained text
            encoders): much less memory, about 30% slower.
        weight_dtype: storage dtype of the frozen UNet and text-encoder weights; bfloat16/float16 halve their
            memory (adapters stay float32; run the Trainer with ``precision: bf16-mixed``). The VAE stays
            float32: SD's VAE overflows in float16.
        quantize_base: ``int8`` or ``float8`` stores the frozen Linear and convolution weights of the UNet and text
            encoders in 8 bits (torchao's weight-only int8, or float8 e4m3, one scale per output channel; ``pip
            install 'lycoflow[quantize]'``), a quarter of their float32 memory, dequantised per layer as they run
            (into ``weight_dtype``).
            Adapters add their terms on top; algorithms that rebuild the weight (LoHa, GLoRA, Full) build it from
            the dequantised W0 per layer, and DoRA's norms read it. The base then differs from the original by
            its rounding, and the adapter is trained against that base (saved files are as always).
        compile: ``torch.compile`` the UNet, the adapters inside it included: one graph for every algorithm (no
            break per layer), but DyLoRA and ``module_dropout``, whose random rank or skip per step ends the graph
            at each adapter. The first step compiles (and evaluation's sampling once more), which takes minutes.
        seed: seed of the noise and timesteps; each batch's draw depends only on (seed, epoch, batch), so a
            resumed run draws exactly what an uninterrupted one does.
    """

    def __init__(
        self,
        base: BaseModel,
        adapter: lycoris.Strategy,
        train_text_encoder: bool = True,
        text_encoder_adapter: lycoris.Strategy | None = None,
        text_encoder_2_adapter: lycoris.Strategy | None = None,
        max_token_length: MaxTokenLength = 75,
        lr: float = 5e-4,
        text_encoder_lr: float | None = None,
        text_encoder_2_lr: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        zero_terminal_snr: bool | None = None,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        gradient_checkpointing: bool = False,
        weight_dtype: DType = "float32",
        quantize_base: lycoris.Quantization | None = None,
        compile: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        for name, rate in (("lr", lr), ("text_encoder_lr", text_encoder_lr), ("text_encoder_2_lr", text_encoder_2_lr)):
            if rate is not None and not rate > 0:  # checked before the base model loads; NaN fails too
                raise ValueError(f"model.{name}={rate} must be > 0 (the paper: 5e-4 for adapters, 1e-6 for native "
                                 "fine-tuning); to freeze the text encoder set model.train_text_encoder=false")
        if quantize_base is not None:  # before the base model loads: a missing torchao is said at once
            lycoris.quantize.storage(quantize_base)
        parts = base.load()
        self.base_source, self.adapter = base, adapter
        self.base_version = parts.version
        self.tokenizer, self.tokenizer_2 = parts.tokenizer, parts.tokenizer_2
        self.max_token_length = max_token_length
        self.prediction_type = prediction_type or parts.scheduler.config.prediction_type
        # The schedule carries the prediction type trained (and its SNR rescaling), which samplers built from it use.
        rescale = {} if zero_terminal_snr is None else {"rescale_betas_zero_snr": zero_terminal_snr}
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config, prediction_type=self.prediction_type,
                                                         **rescale)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the base model's scheduler predicts {self.prediction_type!r}; lycoflow trains "
                             "'epsilon' or 'v_prediction' models (set model.prediction_type to override)")
        if self.prediction_type == "epsilon" and self.noise_scheduler.config.get("rescale_betas_zero_snr"):
            raise ValueError("a zero-terminal-SNR schedule needs model.prediction_type=v_prediction: at its last "
                             "step the latents are pure noise, so predicting the noise there says nothing (and "
                             "min-SNR weighting divides by SNR 0); or set model.zero_terminal_snr=false")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        # SD's parts have no batch norm and zero dropout, so train mode changes nothing in them; it is what
        # transformers' gradient checkpointing needs, and it keeps Lightning's module-mode checks quiet.
        self.unet = cast_frozen(parts.unet.requires_grad_(False).train(), DTYPES[weight_dtype])
        self.vae = cast_frozen(parts.vae.requires_grad_(False).train(), torch.float32)
        self.text_encoder = cast_frozen(parts.text_encoder.requires_grad_(False).train(), DTYPES[weight_dtype])
        self.text_encoder_2 = None if parts.text_encoder_2 is None else \
            cast_frozen(parts.text_encoder_2.requires_grad_(False).train(), DTYPES[weight_dtype])
        if quantize_base is not None:  # before the adapters: DoRA's magnitudes start at the stored base's norms
            for part in (self.unet, self.text_encoder, self.text_encoder_2):
                if part is not None:
                    lycoris.quantize_frozen(part, quantize_base)
            # DDP broadcasts every parameter from rank 0 at the start, which an 8-bit tensor cannot take part in;
            # each rank built the same frozen base anyway.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, [
                f"{name}.weight" for name, layer in self.named_modules() if isinstance(layer, lycoris.Quantized)])
        self.unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention (flash/mem-eff)

        self.lr, self.text_encoder_lr = lr, lr if text_encoder_lr is None else text_encoder_lr
        first = text_encoder_adapter or adapter
        # Per adapted part: (optimizer group name, file-key prefix, module, strategy, learning rate).
        parts_to_adapt: list[tuple[str, str, nn.Module, lycoris.Strategy, float]] = [
            ("unet", UNET_PREFIX, self.unet, adapter, self.lr)]
        if train_text_encoder and self.text_encoder_2 is None:
            parts_to_adapt.append(("text_encoder", TEXT_ENCODER_PREFIX, self.text_encoder, first, self.text_encoder_lr))
        elif train_text_encoder:
            one, two = SDXL_TEXT_ENCODER_PREFIXES
            parts_to_adapt += [
                ("text_encoder", one, self.text_encoder, first, self.text_encoder_lr),
                ("text_encoder_2", two, self.text_encoder_2, text_encoder_2_adapter or first,
                 self.text_encoder_lr if text_encoder_2_lr is None else text_encoder_2_lr)]
        self.networks = nn.ModuleDict({prefix: strategy.apply(module, prefix=prefix)
                                       for _, prefix, module, strategy, _ in parts_to_adapt})
        self._groups = [(name, prefix, lr) for name, prefix, _, _, lr in parts_to_adapt]
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for _, _, module, _, _ in parts_to_adapt[1:]:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile:  # in place: the module (its config, its state dict's names) stays what the rest uses
            self.unet.compile()

        self.train_text_encoder = train_text_encoder
        self.optimizer_factory, self.lr_scheduler_factory, self.warmup_steps = optimizer, lr_scheduler, warmup_steps
        self.min_snr_gamma, self.noise_offset, self.seed = min_snr_gamma, noise_offset, seed
        #: The resolved recipe (YAML), stored in every adapter file; set by the CLI.
        self.recipe: str | None = None
        # Only adapters are checkpointed (see on_save_checkpoint); the frozen base is rebuilt from `base`.
        self.strict_loading = False
        self._last_batch_end: float | None = None
        self._latent_identity: str | None = None
        self._text_identity: str | None = None

    # -- the denoising loss ---------------------------------------------------------------------------
    def _seed(self, *key: int) -> int:
        return hash((self.seed, self.global_rank, *key)) & 0x7FFF_FFFF_FFFF_FFFF

    def _generator(self, *key: int) -> torch.Generator:
        """A generator whose state depends only on (seed, rank, *key): resumable and rank-distinct."""
        return torch.Generator(self.device).manual_seed(self._seed(*key))

    @contextmanager
    def _step_rng(self, *key: int) -> Iterator[torch.Generator]:
        """The step's noise generator; the global RNG (adapter dropouts, DyLoRA's rank draw) is seeded from the
        same key inside and restored after, so nothing a step draws depends on the steps before it."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._seed(*key, 1))
            yield self._generator(*key)

    @property
    def components(self) -> Components:
        """The model's parts, with its adapters attached and the schedule it trains (for sampling)."""
        return Components(self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler,
                          self.max_token_length, self.text_encoder_2, self.tokenizer_2)

    def text_conditioning(self, captions: list[str]) -> dict[str, Tensor]:
        """``encoder_hidden_states`` of the captions, and for SDXL ``text_embeds`` (the pooled text): what the
        text-encoder cache stores and the loss reads."""
        states, pooled = self.components.encode_prompt(captions)
        return {"encoder_hidden_states": states} | ({} if pooled is None else {"text_embeds": pooled})

    @torch.no_grad()
    def latent_parameters(self, pixels: Tensor) -> Tensor:
        """The VAE posterior (mean and log-variance channels) of pixels in [-1, 1]: what the latent cache keeps."""
        with torch.autocast(self.device.type, enabled=False):  # the VAE runs in float32 whatever the precision
            return self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.parameters

    def sample_latents(self, parameters: Tensor, generator: torch.Generator) -> Tensor:
        """A scaled latent drawn from the posterior with the step's generator (cached or not, the same draw)."""
        return DiagonalGaussianDistribution(parameters.float()).sample(generator) * self.vae.config.scaling_factor

    # The data module's caches key their entries by these (see lycoflow.data.encodings.EncodingModel).
    def latent_identity(self) -> str:
        if self._latent_identity is None:
            self._latent_identity = module_digest(self.vae, dict(self.vae.config), "float32")
        return self._latent_identity

    def text_identity(self) -> str | None:
        if self.train_text_encoder:
            return None
        if self._text_identity is None:
            tokenizer = self.tokenizer
            extra: tuple[object, ...] = (type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                                         tokenizer.model_max_length, self.max_token_length)
            if self.text_encoder_2 is None:  # SD 1.x/2.x: the digest (and so the cache keys) as before SDXL
                self._text_identity = module_digest(self.text_encoder, *extra)
            else:  # the vocabulary is CLIP's in both; the second pads with another token
                self._text_identity = module_digest(nn.ModuleList([self.text_encoder, self.text_encoder_2]), *extra,
                                                    self.tokenizer_2.pad_token, "sdxl")
        return self._text_identity

    def denoising_loss(self, batch: dict[str, Any], generator: torch.Generator) -> Tensor:
        parameters = batch["latent_parameters"] if "latent_parameters" in batch else \
            self.latent_parameters(batch["pixel_values"])
        latents = self.sample_latents(parameters, generator)
        text = batch if "encoder_hidden_states" in batch else self.text_conditioning(batch["caption"])
        condition = self.components.unet_conditioning(text["encoder_hidden_states"], text.get("text_embeds"),
                                                      batch.get("add_time_ids"))
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=generator, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        pred = self.unet(noisy.to(self.unet.dtype), t, **condition).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[t]
            snr = alphas / (1 - alphas)
            clipped = snr.clamp(max=self.min_snr_gamma)
            loss = loss * (clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1))
        return loss.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with self._step_rng(self.current_epoch, batch_idx) as generator:
            loss = self.denoising_loss(batch, generator)
        size = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Same noise and timesteps at every validation, so values are comparable across epochs.
        with self._step_rng(-1, batch_idx) as generator:
            loss = self.denoising_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]), sync_dist=True)
        return loss

    # -- throughput, gradient norm, learning rates ----------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None  # validation and epoch-end work between epochs are not training time

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # From one batch's end to the next: data loading and the whole step, as the run experiences it.
        now = time.perf_counter()
        if self._last_batch_end is not None:
            images = len(batch["caption"]) * self.trainer.world_size
            self.log("train/images_per_s", images / (now - self._last_batch_end), batch_size=1)
        self._last_batch_end = now

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.networks.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)
        for name, lr in {group["name"]: group["lr"] for group in optimizer.param_groups}.items():
            self.log(f"train/lr_{name}", lr, batch_size=1)

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = []
        for name, prefix, lr in self._groups:
            decay, exempt = self.networks[prefix].parameters_by_decay()
            groups.append({"name": name, "params": decay, "lr": lr})
            if exempt:
                groups.append({"name": name, "params": exempt, "lr": lr, "weight_decay": 0.0})
        # Each group carries its rate, which wins over the optimizer's own default.
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, weight_decay=0.1, betas=(0.9, 0.99))
        else:
            optimizer = self.optimizer_factory(groups)
        warmup = self.warmup_steps
        schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        if warmup:
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)))
        if self.lr_scheduler_factory is not None:
            schedulers.append(self.lr_scheduler_factory(optimizer))
        if not schedulers:
            return optimizer
        scheduler = schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.SequentialLR(
            optimizer, schedulers, milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints and adapter files ----------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.networks.state_dict(prefix="networks.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base (GBs for SD) is rebuilt from `base` on resume; only the adapters are state.
        checkpoint["state_dict"] = self.trainable_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected, found = self.trainable_state_dict(), checkpoint["state_dict"]
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
        if missing or extra or reshaped:
            raise ValueError(
                "this checkpoint was written with a different adapter configuration: "
                f"{len(missing)} adapter tensors missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                f"(e.g. {extra[:2]}), {len(reshaped)} of another shape (e.g. {reshaped[:2]}); resume with the "
                "recipe that wrote it"
            )

    def adapter_metadata(self, output_name: str) -> dict[str, str]:
        """kohya-compatible metadata (what A1111/ComfyUI and civitai show), plus the resolved recipe."""
        meta = lycoris.kohya_metadata(self.adapter.network_args(), self.adapter.dim, self.adapter.alpha,
                                      self.base_version, output_name, epoch=self.current_epoch + 1,
                                      steps=self.global_step, seed=self.seed,
                                      v_parameterization=self.components.v_prediction,
                                      zero_terminal_snr=self.components.zero_terminal_snr)
        meta["lycoflow_version"] = __version__
        if self.recipe is not None:
            meta["lycoflow_recipe"] = self.recipe
        return meta

    def save_adapter(self, path: str | Path, dtype: DType = "float16", output_name: str | None = None) -> Path:
        """Write the trained adapters as one LyCORIS/kohya file (UNet keys ``lora_unet_*``, text encoder
        ``lora_te_*``; SDXL's ``lora_te1_*`` and ``lora_te2_*``), atomically."""
        path = Path(path)
        return lycoris.save_file(path, dict(self.networks), metadata=self.adapter_metadata(output_name or path.stem),
                                 dtype=DTYPES[dtype])
