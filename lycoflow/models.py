"""Where the base Stable Diffusion model comes from: a hub id (downloaded once into the Hugging Face cache), a
local diffusers folder, or a single-file checkpoint — all through diffusers' own loaders.

A recipe names a source by import path (``lycoflow.models.Pretrained``, ``lycoflow.tiny.TinySD``, or a
user's own `BaseModel` subclass); `load` returns the `Components`: the one type for a Stable Diffusion model's
parts that training, sampling, evaluation and the tools share.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Checkpoint suffixes that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
#: Single files: the keys that say SDXL (its second, OpenCLIP text encoder) and an SDXL refiner (that one alone),
#: and the empty tensors that mark v-prediction and a zero-terminal-SNR schedule (ComfyUI's, which it writes
#: and reads: ``comfy/supported_models.py`` ``SDXL.model_type``).
SDXL_KEY, SDXL_REFINER_KEY = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face Hub id (``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


#: Storage dtypes of frozen weights and adapter files, by the name recipes and command lines use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]

#: File-key prefixes of the two adapted parts (kohya's and the UIs' names): adapter files, networks and the
#: optimizer's groups are keyed by them. SDXL's two text encoders are kohya's ``lora_te1`` (CLIP-L) and
#: ``lora_te2`` (CLIP-G), the names ComfyUI, A1111 and Forge map to them.
UNET_PREFIX, TEXT_ENCODER_PREFIX = "lora_unet", "lora_te"
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # diffusers warns on every .to(dtype), even a no-op one.
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


class BaseModelError(Exception):
    """The base model cannot be found or read; the message says which and how to fix it."""


#: Caption tokens the text encoder reads (kohya's ``max_token_length``): one, two or three chunks of 75.
MaxTokenLength = Literal[75, 150, 225]
#: Content tokens per chunk: CLIP's 77-token context less its begin and end tokens.
CHUNK = 75


@dataclass
class Components:
    """The parts of a Stable Diffusion model: what training, sampling and the tools use. ``scheduler`` holds the
    noise schedule (and the prediction type) that samplers are built from; ``max_token_length`` how many caption
    tokens `encode_text` reads (75: CLIP's context, as SD was trained; 150 or 225: kohya's longer captions).
    SDXL has a second text encoder (OpenCLIP ViT-bigG's, with its projection) and tokenizer: ``text_encoder_2``,
    ``tokenizer_2``; SD 1.x/2.x have None there."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    max_token_length: MaxTokenLength = 75
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def __post_init__(self) -> None:
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise ValueError("an SDXL model needs both text_encoder_2 and tokenizer_2 (SD 1.x/2.x: neither)")
        if self.max_token_length not in (75, 150, 225):
            raise ValueError(f"max_token_length={self.max_token_length} must be 75, 150 or 225 (chunks of {CHUNK} "
                             "caption tokens, as kohya's max_token_length)")

    def tokenize(self, texts: Sequence[str], tokenizer: CLIPTokenizer | None = None) -> Tensor:
        """The token ids the text encoder reads, ``[b, chunks, context]`` (context: 77 for CLIP), as kohya's
        sd-scripts builds them (``train_util.BaseDataset.get_input_ids``); by ``tokenizer`` (None: the first).

        A caption is tokenized to at most ``max_token_length`` tokens between its begin (BOS) and end (EOS)
        tokens, padded; each chunk of 75 is then framed as a sequence of its own: BOS, the chunk, and the last id
        of the whole (EOS or padding). Where the padding is not EOS (SD 2.x pads with "!"), a chunk whose last
        token is a caption token ends in EOS instead, and a chunk of padding only starts with EOS; with SD 1.x's
        tokenizer (padding = EOS) neither changes anything. With one chunk the ids are the plain tokenization
        to the context.
        """
        tokenizer = tokenizer or self.tokenizer
        context = self.text_encoder.config.max_position_embeddings
        body, chunks = context - 2, self.max_token_length // CHUNK
        ids = tokenizer(list(texts), padding="max_length", max_length=chunks * body + 2, truncation=True,
                        return_tensors="pt").input_ids
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        framed = []
        for k in range(chunks):
            chunk = torch.cat([ids[:, :1], ids[:, 1 + k * body:1 + (k + 1) * body], ids[:, -1:]], dim=1)
            ends_in_caption = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[:, -1] = torch.where(ends_in_caption, eos, chunk[:, -1])
            chunk[:, 1] = torch.where(chunk[:, 1] == pad, eos, chunk[:, 1])
            framed.append(chunk)
        return torch.stack(framed, dim=1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """The text encoder's hidden states of ``texts``: ``[b, max_token_length + 2, d]`` (77 tokens for 75).

        Each chunk of `tokenize` is encoded as its own sequence, and the states are joined as kohya's
        sd-scripts joins them (``train_util.get_hidden_states``): the first chunk's BOS, every chunk's 75 token
        states, the last chunk's final state; the inner chunks' BOS and EOS states are left out. (kohya's SD 2.x
        branch means to copy a state into empty chunks, but compares the ids with the EOS token's text, so it
        never does: SD 1.x and 2.x join alike.) With 75 this is the encoder's output on the plain tokenization.
        """
        return self.encode_prompt(texts)[0]

    def encode_prompt(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """What the UNet is conditioned on: `encode_text`'s hidden states, and for SDXL the pooled text.

        SDXL's, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and kohya's ``sdxl_train_util`` compute
        them: both encoders' penultimate hidden states side by side, ``[b, tokens, d1 + d2]``, and the second's
        projected pooled state ``[b, p]`` (of the first chunk, as kohya's, when a caption is longer than 75
        tokens). SD 1.x/2.x: the final hidden states, and None.
        """
        if not self.is_sdxl:
            return self._encode(self.text_encoder, self.tokenize(texts), penultimate=False)[0], None
        first, _ = self._encode(self.text_encoder, self.tokenize(texts), penultimate=True)
        second, pooled = self._encode(self.text_encoder_2, self.tokenize(texts, self.tokenizer_2), penultimate=True)
        return torch.cat([first, second], dim=-1), pooled

    @staticmethod
    def _encode(encoder: nn.Module, ids: Tensor, penultimate: bool) -> tuple[Tensor, Tensor]:
        """Each chunk of ``ids`` encoded as its own sequence, the states joined (`encode_text`), and the encoder's
        first output (CLIPTextModelWithProjection: the projected pooled state) of each caption's first chunk."""
        b, chunks, context = ids.shape
        out = encoder(ids.reshape(b * chunks, context).to(next(encoder.parameters()).device),
                      output_hidden_states=penultimate)
        states = (out.hidden_states[-2] if penultimate else out[0]).reshape(b, chunks, context, -1)
        joined = torch.cat([states[:, 0, :1], *states[:, :, 1:-1].unbind(1), states[:, -1, -1:]], dim=1)
        return joined, out[0].reshape(b, chunks, *out[0].shape[1:])[:, 0]

    def unet_conditioning(self, states: Tensor, pooled: Tensor | None, sizes: Tensor | None) -> dict[str, object]:
        """The UNet's keyword arguments for text ``states`` (and SDXL's ``pooled`` text and size numbers
        ``[b, 6]``: original height, width, crop top, left, target height, width)."""
        dtype = self.unet.dtype
        kwargs: dict[str, object] = {"encoder_hidden_states": states.to(dtype)}
        if self.is_sdxl:
            if pooled is None or sizes is None:
                raise ValueError("an SDXL UNet needs the pooled text and the six size numbers of every sample")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": sizes.to(states.device, dtype)}
        return kwargs

    def adaptable(self) -> dict[str, nn.Module]:
        """The parts adapters attach to, by file-key prefix (what `lycoris.load_file` and `merge_into` take)."""
        if self.is_sdxl:
            first, second = SDXL_TEXT_ENCODER_PREFIXES
            return {UNET_PREFIX: self.unet, first: self.text_encoder, second: self.text_encoder_2}
        return {UNET_PREFIX: self.unet, TEXT_ENCODER_PREFIX: self.text_encoder}

    def modules(self) -> list[nn.Module]:
        """The networks (UNet, VAE, text encoders): what is moved to a device or cast."""
        return [self.unet, self.vae, self.text_encoder, *([self.text_encoder_2] if self.is_sdxl else [])]

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def v_prediction(self) -> bool:
        """The noise schedule's model predicts v (SD 2.x-v, NoobAI-v), not the noise."""
        return self.scheduler.config.get("prediction_type") == "v_prediction"

    @property
    def zero_terminal_snr(self) -> bool:
        """The noise schedule is rescaled to zero SNR at its last step (Lin et al. 2024)."""
        return bool(self.scheduler.config.get("rescale_betas_zero_snr"))

    @property
    def version(self) -> str:
        """kohya's ``ss_base_model_version``: SDXL has two text encoders, SD 2.x 1024-wide cross-attention, SD 1.x
        768 (tiny: SD 1.x)."""
        if self.is_sdxl:
            return "sdxl_base_v1-0"
        if self.unet.config.cross_attention_dim != 1024:
            return "sd_v1"
        return "sd_v2_768_v" if self.v_prediction else "sd_v2_512"


class BaseModel:
    """A source of a base model. Subclass and implement `load` to bring your own."""

    def load(self) -> Components:
        raise NotImplementedError


class Pretrained(BaseModel):
    """A Stable Diffusion 1.x/2.x or SDXL model from the Hub, a local diffusers folder or a single checkpoint file.

    The family is read from the model: an SDXL folder lists ``text_encoder_2`` in its ``model_index.json``, an
    SDXL single file holds ``conditioner.embedders.1.model.*``; an SDXL single file's empty ``v_pred`` tensor
    (NoobAI-style v-prediction) sets the noise schedule's prediction type, and with it ``ztsnr`` zero terminal
    SNR, as ComfyUI reads them (``comfy/supported_models.py`` ``SDXL.model_type``).

    Args:
        path: a Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``; read from the Hugging Face cache
            when already downloaded, also offline with ``HF_HUB_OFFLINE=1``), a local diffusers folder (with
            ``model_index.json``), or a single-file checkpoint (``.safetensors``; ``.ckpt`` only with
            ``trust_pickle``), e.g. one downloaded from Civitai.
        config: for a single file: the diffusers folder or Hub id whose configs describe its architecture
            (SDXL's: ``stabilityai/stable-diffusion-xl-base-1.0``). None lets diffusers infer the model type and
            fetch its configs (needs the network once).
        revision: Hub revision (branch, tag or commit).
        variant: weights variant in the folder/repo, e.g. ``fp16``.
        trust_pickle: allow ``.ckpt``/``.pt``/``.bin`` checkpoints. They are Python pickles and can run
            arbitrary code when read: only enable this for files from a source you trust.
        cache_dir: the Hugging Face cache to download to and read from; None uses the default
            (``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).
    """

    def __init__(
        self,
        path: str,
        config: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        trust_pickle: bool = False,
        cache_dir: str | None = None,
    ):
        self.path, self.config, self.revision, self.variant = path, config, revision, variant
        self.trust_pickle, self.cache_dir = trust_pickle, cache_dir

    def load(self) -> Components:
        local = Path(self.path).expanduser()
        if local.is_dir():
            if not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
                raise BaseModelError(
                    f"base model folder {local} is not a diffusers folder (no model_index.json or unet/): "
                    "point `path` at the folder that holds unet/, vae/, text_encoder/, tokenizer/, scheduler/, "
                    "or at a single .safetensors checkpoint"
                )
            return self._from_folder(str(local))
        if local.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if not local.is_file():
                raise BaseModelError(f"base model checkpoint not found: {local}")
            return self._from_single_file(local)
        if not is_hub_id(self.path):
            raise BaseModelError(
                f"base model not found: {self.path!r} is neither an existing folder or checkpoint file nor a "
                "Hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
            )
        try:
            return self._from_folder(self.path)
        except OSError as err:  # huggingface_hub raises OSError subclasses for missing repos, files, network
            raise BaseModelError(
                f"could not load base model {self.path!r} from the Hugging Face Hub or its cache: "
                f"{str(err).splitlines()[0]}. Check the id (and `huggingface-cli login` for gated models), or "
                "download it and point `path` at the folder"
            ) from None

    def _from_folder(self, path: str) -> Components:
        from diffusers import DiffusionPipeline

        hub = {"revision": self.revision, "cache_dir": self.cache_dir}
        # The family is the model's own: SDXL folders list a second text encoder in model_index.json.
        local = Path(path).expanduser()
        if (local / "model_index.json").is_file() or not local.is_dir():
            sdxl = "text_encoder_2" in DiffusionPipeline.load_config(path, **hub)
        else:
            sdxl = (local / "text_encoder_2").is_dir()
        second = {
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                          variant=self.variant, **hub),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub),
        } if sdxl else {}
        return Components(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=self.variant, **hub),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=self.variant, **hub),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=self.variant, **hub),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub),
            # Training only needs the noise schedule; DDPM reads any SD scheduler config (PNDM, DDIM, Euler...).
            scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **hub),
            **second,
        )

    def _from_single_file(self, path: Path) -> Components:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pickled = path.suffix.lower() in PICKLE_SUFFIXES
        if pickled and not self.trust_pickle:
            raise BaseModelError(
                f"{path} is a pickle checkpoint, which can run arbitrary code when loaded. Prefer a .safetensors "
                "version of it; if you trust its source, set trust_pickle: true (--model.base.init_args.trust_pickle"
                "=true)"
            )
        keys = _checkpoint_keys(path, pickled)
        sdxl = any(k.startswith(SDXL_KEY) for k in keys)
        if not sdxl and any(k.startswith(SDXL_REFINER_KEY) for k in keys):
            raise BaseModelError(f"{path} is an SDXL refiner checkpoint (CLIP-G only): lycoflow trains and samples "
                                 "base models; use an SDXL base checkpoint")
        options = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
                str(path), config=self.config, cache_dir=self.cache_dir,
                local_files_only=self.config is not None and Path(self.config).is_dir(), **options,
            )
        except (OSError, ValueError, KeyError) as err:
            raise BaseModelError(
                f"could not load single-file checkpoint {path}: {str(err).splitlines()[0]}. It must be a Stable "
                "Diffusion 1.x/2.x or SDXL checkpoint; offline, pass `config` (a diffusers folder of the same "
                "architecture)"
            ) from None
        # An SDXL checkpoint's own markers win over the configs it was read with (an SDXL base's say epsilon).
        markers = {} if not sdxl or V_PRED_MARKER not in keys else {"prediction_type": "v_prediction"} | (
            {"rescale_betas_zero_snr": True} if ZTSNR_MARKER in keys else {})
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **markers) if markers else pipe.scheduler
        second = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2} if sdxl else {}
        return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, **second)

    def __repr__(self) -> str:
        return f"Pretrained(path={self.path!r})"


def _checkpoint_keys(path: Path, pickled: bool) -> set[str]:
    """A single file's tensor names: from the safetensors header alone, or (a trusted pickle) by loading it."""
    if not pickled:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return set(f.keys())
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise BaseModelError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    try:  # trust_pickle said yes; the file is read again by diffusers (its loader takes no state dict)
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise BaseModelError(f"{path}: not a readable checkpoint ({err})") from None
    return set(state.get("state_dict", state) if isinstance(state, dict) else ())

