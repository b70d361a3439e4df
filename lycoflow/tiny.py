"""Tiny Stable-Diffusion-1.x-architecture models built from config under a fixed seed.

Same module layout, names and file format as SD 1.5 (so presets, file keys and every loader behave as on the
real model), with about a thousand times fewer parameters and random weights: what tests, the quickstart
and benchmarks run on with no network. They prove the machinery, not image quality.

`TinySD` is a base-model source like `lycoflow.models.Pretrained`: on first use it writes a real diffusers
folder (UNet, VAE, CLIP text encoder, the real 49,408-token CLIP tokenizer, scheduler) to the cache, and
from then on loads it with the same code that loads SD 1.5.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .cache import cache_dir
from .models import BaseModel, Components, Pretrained

#: CLIP's special tokens, at the ids OpenAI's tokenizer gives them.
BOS, EOS = 49406, 49407


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, block_out_channels: tuple[int, ...] = (32, 64),
              attention: tuple[bool, ...] = (True, False), sample_size: int = 8) -> UNet2DConditionModel:
    """A UNet2DConditionModel with SD 1.x blocks (cross-attention, 1×1 conv proj_in): by default (32, 64) channels,
    cross-attention at the first level. ``attention`` says which levels have it (the up blocks mirror the down)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _text_config(hidden_size: int, vocab_size: int, **extra: Any) -> CLIPTextConfig:
    full_vocab = vocab_size > EOS  # the real tokenizer's special ids, else a toy vocabulary's 0/1
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=BOS if full_vocab else 0,
        eos_token_id=EOS if full_vocab else 1,
        pad_token_id=EOS if full_vocab else 1,
        **extra,
    )


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, vocab_size: int = 1000) -> CLIPTextModel:
    """A 2-layer CLIP text encoder (transformers' CLIPTextModel, as in SD 1.x and as SDXL's first)."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config(hidden_size, vocab_size))


#: The tiny SDXL's additional-embedding width per size/crop number (SDXL: 256), its second encoder's width (wider than
#: the first's, as CLIP-G's 1280 is than CLIP-L's 768: diffusers' single-file loader tells them apart by it) and its
#: pooled text width (the projection's, not the width, as CLIP-G's projection is its own matrix).
SDXL_TIME_DIM, SDXL_CLIP_G_WIDTH, SDXL_POOLED_DIM = 8, 48, 32


def tiny_text_encoder_2(seed: int = 0, hidden_size: int = SDXL_CLIP_G_WIDTH, projection_dim: int = SDXL_POOLED_DIM,
                        vocab_size: int = 1000) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder at toy scale: CLIPTextModelWithProjection (OpenCLIP ViT-bigG's layout in
    transformers' names, GELU, a bias-free projection of the pooled state) with 2 layers."""
    torch.manual_seed(seed + 1)  # not the first encoder's weights
    return CLIPTextModelWithProjection(_text_config(hidden_size, vocab_size, hidden_act="gelu",
                                                    projection_dim=projection_dim))


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's UNet blocks at toy scale: three levels (32, 64, 64 channels), two resnets each, no attention at the
    first, linear proj_in/proj_out, transformer blocks of 1 and 2 layers (SDXL: 2 and 10), cross-attention on both
    text encoders' states side by side (32 + 48 wide), and the text-time additional embedding of the pooled text
    with the six size and crop numbers (``add_embedding``, LDM's ``label_emb``)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # diffusers' name for SDXL's head counts (5, 10, 20)
        use_linear_projection=True,
        cross_attention_dim=32 + SDXL_CLIP_G_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED_DIM,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0, norm_num_groups: int = 8, block_out_channels: tuple[int, ...] = (8, 16, 32, 32)
             ) -> AutoencoderKL:
    """An AutoencoderKL to 4 latent channels, 2^(levels-1)× spatial reduction: by default 4 levels, 8× as SD's VAE,
    with 8–32 channels.

    With 8 groups each of the 8 full-resolution channels is normalised alone (instance norm), which erases every
    image's mean colour before the decoder's output convolution: `lycoflow.toy`'s trained VAE uses 2 groups."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=64,
    )


def sd_scheduler() -> DDIMScheduler:
    """SD 1.5's noise schedule (scaled-linear betas 0.00085–0.012, 1000 steps, ε-prediction)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table that the BPE vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_tokenizer(folder: str | os.PathLike, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer (49,408 tokens), rebuilt from the vocabulary that open-clip-torch ships.

    Writes ``vocab.json`` and ``merges.txt`` into ``folder``. "a photo of a cat" → 49406, 320, 1125, 539, 320,
    2368, 49407, as OpenAI's. ``pad_token``: SD 1.x and SDXL's first tokenizer pad with the end token, SD 2.x and
    SDXL's second with "!" (id 0).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the CLIP vocabulary comes from open-clip-torch: pip install open-clip-torch")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def tiny_components(seed: int = 0, unet: dict[str, Any] | None = None, vae: dict[str, Any] | None = None
                    ) -> Components:
    """Every part of a tiny SD 1.x model, built from config under ``seed`` (``unet``, ``vae``: arguments of
    `tiny_unet`, `tiny_vae` other than the seed); torch's global random state is left as it was (a run that builds
    the model on first use must train exactly like one that reads it back)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(tmp)
    with torch.random.fork_rng(devices=[]):
        return Components(
            unet=tiny_unet(seed, **(unet or {})), vae=tiny_vae(seed, **(vae or {})),
            text_encoder=tiny_text_encoder(seed, vocab_size=len(tokenizer)), tokenizer=tokenizer,
            scheduler=sd_scheduler(),
        )


def tiny_sdxl_components(seed: int = 0) -> Components:
    """Every part of a tiny SDXL model, built from config under ``seed``: `tiny_sdxl_unet`, an SD-shaped VAE with
    SDXL's latent scale (0.13025), the two text encoders with the real CLIP tokenizer twice (the second padding
    with "!", as SDXL's), SD's noise schedule (SDXL's is the same); torch's global random state is left as it was."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = clip_tokenizer(Path(tmp) / "1"), clip_tokenizer(Path(tmp) / "2", pad_token="!")
    with torch.random.fork_rng(devices=[]):
        vae = tiny_vae(seed)
        vae.register_to_config(scaling_factor=0.13025)
        return Components(
            unet=tiny_sdxl_unet(seed), vae=vae, text_encoder=tiny_text_encoder(seed, vocab_size=len(tokenizer)),
            tokenizer=tokenizer, scheduler=sd_scheduler(),
            text_encoder_2=tiny_text_encoder_2(seed, vocab_size=len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
        )


def write_diffusers_folder(folder: str | os.PathLike, parts: Components) -> Path:
    """Write a model's parts as a diffusers folder (model_index.json + one subfolder per part), atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (
        ("text_encoder_2", "tokenizer_2") if parts.is_sdxl else ())
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    if parts.is_sdxl:  # StableDiffusionXLPipeline's components (it has no safety checker)
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor",
                                                             "requires_safety_checker")}
        index |= {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    try:
        for name in names:
            getattr(parts, name).save_pretrained(tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a DDP rank) renamed its identical build first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_tiny_sd(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SD 1.x model with random weights as a diffusers folder, atomically."""
    return write_diffusers_folder(folder, tiny_components(seed))


def save_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SDXL model with random weights as a diffusers folder, atomically."""
    return write_diffusers_folder(folder, tiny_sdxl_components(seed))


class TinySD(BaseModel):
    """A tiny SD-1.x-architecture model with random weights (0.9 M-parameter UNet), built on first use.

    It has SD 1.5's module names, VAE reduction (8×), CLIP tokenizer and noise schedule, so recipes, presets
    and adapter files behave as on SD 1.5; its images are noise. For the quickstart and tests; point a recipe
    at real weights with `lycoflow.models.Pretrained`.

    Args:
        folder: where the diffusers folder is written and read; default ``<cache>/models/tiny-sd1-seed<seed>``
            (``tiny-sdxl2-seed<seed>`` for `TinySDXL`; cache: ``$LYCOFLOW_CACHE`` or ``~/.cache/lycoflow``).
        seed: seed of the random weights.
    """

    #: The default folder's name stem, and what writes the model there.
    stem = "tiny-sd1"
    write = staticmethod(save_tiny_sd)

    def __init__(self, folder: str | None = None, seed: int = 0):
        self.folder = Path(folder) if folder else cache_dir() / "models" / f"{self.stem}-seed{seed}"
        self.seed = seed

    def load(self) -> Components:
        if not (self.folder / "model_index.json").is_file():
            self.write(self.folder, self.seed)
        return Pretrained(str(self.folder)).load()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(folder={str(self.folder)!r}, seed={self.seed})"


class TinySDXL(TinySD):
    """A tiny SDXL-architecture model with random weights (`tiny_sdxl_components`), built on first use: SDXL's
    two text encoders and tokenizers, text-time additional embedding and multi-layer transformer blocks, so the
    SDXL paths run offline. For tests; point a recipe at real weights with `lycoflow.models.Pretrained`.
    Arguments as `TinySD`'s."""

    stem = "tiny-sdxl2"  # 2: CLIP-G-shaped encoder wider than CLIP-L's (a folder of the first build is not reused)
    write = staticmethod(save_tiny_sdxl)
