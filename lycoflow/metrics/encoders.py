"""Image and text encoders behind the evaluation metrics (paper §4.2), pluggable by import path.

The paper's backbones: `DINOv2` embeddings for fidelity and diversity; `OpenCLIP` image and text embeddings for
controllability (open_clip's ViT-L-14 trained on DataComp-XL; `CLIP` is OpenAI's ViT-L/14 through transformers, an
alternative); and `VGG19` feature maps whose Gram matrices give the style loss, tapped as the paper's code ran:
after the ReLU at relu1_1…relu4_1 and before it at conv5_1, with the shorter side resized to 224.
Each takes images as a float batch [b, 3, H, W] in [0, 1] of any size and does its own resizing and
normalisation, on its own device and dtype; each is frozen and stays in eval mode.

`TinyDINOv2`, `TinyCLIP`, `TinyOpenCLIP` and `TinyVGG19` have the same architectures and code paths at a few
thousand times fewer parameters, with random weights under a fixed seed: what tests and the quickstart measure
with, offline. Their metric values prove the machinery, not image quality (``pretrained`` is False, so logs can
say so).

A metric needs only what its protocol names (`ImageEmbedder`, `TextImageEmbedder`, `StyleFeatures`), so any
object with those attributes and methods can replace these.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedTokenizerBase,
)

from ..models import is_hub_id
from ..tiny import BOS, EOS, clip_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Convolutions per block of VGG19; conv1_1…conv5_1 are the first of each block.
VGG19_CONVS_PER_BLOCK = (2, 2, 4, 4, 4)
#: `TinyOpenCLIP`'s architecture as an open_clip model config (the ``model_cfg`` of an ``open_clip_config.json``):
#: 2-layer, 32-wide image and text transformers with the real vocabulary and 77-token context, 224² input in 7×7
#: patches, as the paper's ViT-L-14 sees.
TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "layers": 2, "width": 32, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

_T = TypeVar("_T")
_M = TypeVar("_M", bound=nn.Module)


class EncoderError(Exception):
    """An encoder's weights cannot be found or read; the message says which and how to fix it."""


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps images to embedding vectors (DINOv2 for fidelity and diversity).

    ``name`` labels the metrics it computes; ``pretrained`` is False for random-weight encoders, whose
    metrics only test the machinery.
    """

    name: str
    pretrained: bool

    def embed_images(self, images: Tensor) -> Tensor:
        """Float images [b, 3, H, W] in [0, 1], any size → float32 embeddings [b, d], not normalised."""
        ...


@runtime_checkable
class TextImageEmbedder(ImageEmbedder, Protocol):
    """Maps images and texts into one embedding space (CLIP for controllability)."""

    def embed_texts(self, texts: list[str]) -> Tensor:
        """b texts → float32 embeddings [b, d] in the space of `embed_images`, not normalised."""
        ...


@runtime_checkable
class StyleFeatures(Protocol):
    """Maps images to the feature maps whose Gram matrices describe their style (VGG19 for the style loss)."""

    name: str
    pretrained: bool

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Float images [b, 3, H, W] in [0, 1] → float32 feature maps, each [b, c, h, w]."""
        ...


def _eval_only(self: _M, mode: bool = True) -> _M:
    """`nn.Module.train` of the encoders: they stay in eval mode when a parent module is put into training."""
    return nn.Module.train(self, False)


def _model_input(
    images: Tensor, module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int | None,
    crop: bool = True,
) -> Tensor:
    """Images → a model's normalised input on its device and dtype.

    Args:
        images: float [b, 3, H, W] in [0, 1].
        module: the model, whose first parameter gives the device and dtype.
        mean: per-channel mean the model was trained with.
        std: per-channel standard deviation the model was trained with.
        size: resize (bicubic, antialiased) so the shorter side is ``size``; None keeps the size as given.
        crop: then crop the centre ``size``×``size`` square, as the models' own image processors do.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a float batch of RGB images [b, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    weight = next(module.parameters())
    # Resize and normalise in float32 (CPU has no half-precision antialiased bicubic); cast for the model last.
    x = images.to(device=weight.device, dtype=torch.float32)
    if size is not None:
        h, w = x.shape[-2:]
        if min(h, w) != size:
            h, w = round(h * size / min(h, w)), round(w * size / min(h, w))
            # Bicubic overshoots; the processors resize 8-bit pixels, which saturate at the pixel range.
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if crop:
            top, left = (h - size) // 2, (w - size) // 2
            x = x[..., top : top + size, left : left + size]
    x = (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
    return x.to(weight.dtype)


def _reason(err: Exception) -> str:
    """The first line of an error's message, for a one-sentence cause."""
    return (str(err).splitlines() or [type(err).__name__])[0].rstrip(".")


def _from_hub_or_folder(load: Callable[[str], _T], model: str, what: str, example: str) -> _T:
    """``load(path)`` for a Hub id (through the Hugging Face cache) or a local folder, with errors that say the fix.

    transformers reads Hub ids from the cache without the network when ``HF_HUB_OFFLINE=1``.
    """
    local = Path(model).expanduser()
    if not local.is_dir() and not is_hub_id(model):
        raise EncoderError(
            f"{what} not found: {model!r} is neither an existing folder nor a Hub id like {example!r}"
        )
    try:
        return load(str(local) if local.is_dir() else model)
    except (OSError, ValueError) as err:  # missing files, repos or network; a folder of another model type
        raise EncoderError(
            f"could not load {what} {model!r}: {_reason(err)}. Download it once with network access "
            "(it is then read from the Hugging Face cache, also with HF_HUB_OFFLINE=1), or pass a local folder "
            "holding it as written by save_pretrained"
        ) from None


class _DINOv2Embedder(nn.Module):
    """A transformers DINOv2 model as an `ImageEmbedder`: the final layer-normed CLS token (``pooler_output``).

    Args:
        backbone: a transformers DINOv2 model (`Dinov2Model` or one with registers).
        name: label of the metrics.
        pretrained: whether the weights are trained.
        image_size: side of the square the images are resized and centre-cropped to.
    """

    def __init__(self, backbone: nn.Module, name: str, pretrained: bool, image_size: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.name, self.pretrained, self.image_size = name, pretrained, image_size

    train = _eval_only

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        pixels = _model_input(images, self.backbone, IMAGENET_MEAN, IMAGENET_STD, self.image_size)
        return self.backbone(pixel_values=pixels).pooler_output.float()


class DINOv2(_DINOv2Embedder):
    """DINOv2 image embeddings, for fidelity (image similarity, centroid distance) and diversity (Vendi score).

    The paper used ViT-L/14. Images are resized (bicubic) so the shorter side is ``image_size``, centre-cropped
    and ImageNet-normalised; the embedding is the CLS token of the last layer-normed hidden state.

    Args:
        model: a Hub id of a transformers DINOv2 checkpoint (``facebook/dinov2-small``/``-base``/``-large``/
            ``-giant``, also ``-with-registers``; read from the Hugging Face cache when already downloaded, also
            offline with ``HF_HUB_OFFLINE=1``), or a local folder saved with ``save_pretrained``.
        image_size: side of the square crop the model sees; a multiple of the patch size (14).
    """

    def __init__(self, model: str = "facebook/dinov2-large", image_size: int = 224):
        backbone = _from_hub_or_folder(AutoModel.from_pretrained, model, "DINOv2 model", "facebook/dinov2-large")
        if not backbone.config.model_type.startswith("dinov2"):
            raise EncoderError(f"{model!r} is a {backbone.config.model_type!r} model, not a DINOv2 one")
        super().__init__(backbone, f"dinov2:{model}", True, image_size)


class TinyDINOv2(_DINOv2Embedder):
    """A 2-layer, 64-wide DINOv2 with random weights: `DINOv2`'s code path for tests and the quickstart.

    Args:
        seed: seed of the random weights.
        image_size: side of the square crop the model sees; a multiple of the patch size (14).
    """

    def __init__(self, seed: int = 0, image_size: int = 56):
        config = Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=14,
            image_size=image_size,
        )
        with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's random stream
            torch.manual_seed(seed)
            backbone = Dinov2Model(config)
        super().__init__(backbone, "tiny-dinov2 (untrained)", False, image_size)


class _CLIPEmbedder(nn.Module):
    """A transformers CLIP model and its tokenizer as a `TextImageEmbedder`: projected image and text embeddings.

    Args:
        model: a transformers `CLIPModel`.
        tokenizer: its tokenizer.
        name: label of the metrics.
        pretrained: whether the weights are trained.
    """

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, name: str, pretrained: bool):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained

    train = _eval_only

    # The towers and projections are called directly: `get_image_features` / `get_text_features` return a
    # tensor in transformers 4 but an output object in transformers 5.
    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        size = self.model.config.vision_config.image_size
        pixels = _model_input(images, self.model, CLIP_MEAN, CLIP_STD, size)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled).float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """Texts longer than the text tower's context (77 tokens for CLIP) are truncated, keeping the end token."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.model.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.model.text_projection(pooled).float()


class CLIP(_CLIPEmbedder):
    """CLIP image and text embeddings in one space, for controllability (image–prompt text similarity).

    The paper used ViT-L/14. Images are resized (bicubic) so the shorter side is the model's input size,
    centre-cropped and normalised with CLIP's statistics; embeddings are the projected pooled outputs.

    Args:
        model: a Hub id of a transformers CLIP checkpoint with its tokenizer (``openai/clip-vit-large-patch14``;
            read from the Hugging Face cache when already downloaded, also offline with ``HF_HUB_OFFLINE=1``),
            or a local folder holding a `CLIPModel` and its tokenizer saved with ``save_pretrained``.
    """

    def __init__(self, model: str = "openai/clip-vit-large-patch14"):
        clip, tokenizer = _from_hub_or_folder(
            lambda path: (CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)),
            model, "CLIP model", "openai/clip-vit-large-patch14",
        )
        super().__init__(clip, tokenizer, f"clip:{model}", True)


class TinyCLIP(_CLIPEmbedder):
    """A 2-layer, 32-wide CLIP with random weights and OpenAI's real tokenizer: `CLIP`'s code path for tests.

    Args:
        seed: seed of the random weights.
    """

    def __init__(self, seed: int = 0):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = clip_tokenizer(tmp)
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        config = CLIPConfig(
            text_config={**tower, "vocab_size": len(tokenizer), "bos_token_id": BOS, "eos_token_id": EOS,
                         "pad_token_id": EOS},
            vision_config={**tower, "image_size": 32, "patch_size": 8},
            projection_dim=32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        super().__init__(model, tokenizer, "tiny-clip (untrained)", False)


class _OpenCLIPEmbedder(nn.Module):
    """An open_clip model and its tokenizer as a `TextImageEmbedder`: ``encode_image`` / ``encode_text``.

    Images get the model's own eval transform (its ``preprocess_cfg``: bicubic resize of the shorter side, centre
    crop, its mean and std), on tensors instead of PIL images.

    Args:
        model: an open_clip model with its ``preprocess_cfg`` set, as `open_clip.create_model` returns it.
        tokenizer: its open_clip tokenizer.
        name: label of the metrics.
        pretrained: whether the weights are trained.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor], name: str, pretrained: bool):
        super().__init__()
        cfg = open_clip.get_model_preprocess_cfg(model)
        h, w = (cfg["size"],) * 2 if isinstance(cfg["size"], int) else cfg["size"]
        # open_clip has other eval transforms (squash, letterbox); `_model_input` does the CLIP models' one.
        if h != w or (cfg["resize_mode"], cfg["interpolation"]) != ("shortest", "bicubic"):
            raise ValueError(
                f"{name}: only open_clip models preprocessed by a bicubic shorter-side resize and a square centre "
                f"crop are supported, not {cfg}"
            )
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained
        self.image_size, self.mean, self.std = h, tuple(cfg["mean"]), tuple(cfg["std"])

    train = _eval_only

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        pixels = _model_input(images, self.model, self.mean, self.std, self.image_size)
        return self.model.encode_image(pixels).float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """Texts longer than the context (77 tokens) are truncated by open_clip's tokenizer, keeping the end token."""
        tokens = self.tokenizer(list(texts)).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens).float()


class OpenCLIP(_OpenCLIPEmbedder):
    """open_clip image and text embeddings in one space, for controllability: the paper's CLIP.

    The paper used open_clip's ViT-L-14 trained on DataComp-XL (tag ``datacomp_xl_s13b_b90k``, Hub repo
    ``laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K``). Images get open_clip's eval transform for the model (for that
    one: bicubic resize of the shorter side to 224, centre crop, OpenAI CLIP's mean and std), texts open_clip's
    tokenizer (77 tokens); embeddings are ``encode_image`` / ``encode_text``, the projected features.

    Args:
        model: an open_clip architecture (``open_clip.list_models()``).
        pretrained: its weights: an open_clip pretrained tag of ``model`` (``open_clip.list_pretrained_tags_by_model``;
            downloaded once into the Hugging Face cache, then read from it, also offline with ``HF_HUB_OFFLINE=1``);
            a local weights file (such as the Hub repo's ``open_clip_model.safetensors``); or a local folder holding
            the weights with their ``open_clip_config.json`` (a copy of the Hub repo), whose config then gives the
            architecture in place of ``model``.
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: str = "datacomp_xl_s13b_b90k"):
        local = Path(pretrained).expanduser()
        if local.is_dir():
            tag, arch, weights, name = {}, f"local-dir:{local}", None, f"open_clip:{pretrained}"
        else:
            if model not in open_clip.list_models():
                raise EncoderError(f"open_clip has no architecture {model!r} (see open_clip.list_models())")
            tag = open_clip.get_pretrained_cfg(model, pretrained)
            if not tag and not local.is_file():
                raise EncoderError(
                    f"open_clip weights not found: {pretrained!r} is neither a pretrained tag of {model} (one of "
                    f"{open_clip.list_pretrained_tags_by_model(model)}) nor an existing file or folder"
                )
            arch, weights, name = model, pretrained if tag else str(local), f"open_clip:{model}:{pretrained}"
        hub = f" (Hub repo {tag['hf_hub'].rstrip('/')})" if tag.get("hf_hub") else ""
        try:
            clip = open_clip.create_model(arch, pretrained=weights, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(arch)
        # Not cached offline, no network, missing files; weights of another architecture (RuntimeError of torch).
        except (OSError, RuntimeError, ValueError) as err:
            raise EncoderError(
                f"could not load open_clip weights {pretrained!r}{hub}: {_reason(err)}. Download them once with "
                "network access (open_clip keeps them in the Hugging Face cache, then also reads them with "
                "HF_HUB_OFFLINE=1), or pass `pretrained`: a local copy of the weights file (the Hub repo's "
                "open_clip_model.safetensors or open_clip_pytorch_model.bin) or a folder holding it with the repo's "
                "open_clip_config.json"
            ) from None
        super().__init__(clip, tokenizer, name, True)


class TinyOpenCLIP(_OpenCLIPEmbedder):
    """An open_clip model of `TINY_OPEN_CLIP_CONFIG` with random weights and open_clip's real tokenizer and
    default eval transform (the paper's model's): `OpenCLIP`'s code path for tests.

    Args:
        seed: seed of the random weights.
    """

    def __init__(self, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG)
        # What `open_clip.create_model` sets last: its default transform at the model's input size.
        open_clip.set_model_preprocess_cfg(model, {**asdict(PreprocessCfg()), "size": model.visual.image_size})
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        super().__init__(model, tokenizer, "tiny-open-clip (untrained)", False)


class _VGGTaps(nn.Module):
    """A VGG ``features`` stack as `StyleFeatures`: five maps, one at each block's first convolution, after its
    ReLU at the first four and before it at the fifth (``taps="paper"``), or before it at all five (``"pre-relu"``);
    `VGG19` says why. The stack is cut after conv5_1, so nothing past it runs.

    Args:
        features: VGG's convolution stack (convolutions, ReLUs and max-pools, in torchvision/timm's order).
        name: label of the metrics.
        pretrained: whether the weights are trained.
        image_size: resize (bicubic, antialiased) so the shorter side is ``image_size``, keeping the aspect
            ratio; None keeps the size as given.
        taps: ``"paper"`` or ``"pre-relu"``.
    """

    def __init__(
        self, features: nn.Sequential, name: str, pretrained: bool, image_size: int | None,
        taps: Literal["paper", "pre-relu"],
    ):
        super().__init__()
        if taps not in ("paper", "pre-relu"):
            raise ValueError(f"{name}: taps must be 'paper' or 'pre-relu', not {taps!r}")
        convs = [i for i, layer in enumerate(features)
                 if isinstance(layer, nn.Conv2d) and (i == 0 or isinstance(features[i - 1], nn.MaxPool2d))][:5]
        self.features = features[: convs[-1] + 1].requires_grad_(False).eval()
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # an in-place ReLU would overwrite the pre-ReLU maps handed out
        # conv1_1…conv4_1 are each followed by their ReLU (VGG has no batch norm between them).
        self.tap_layers = (*(i + 1 for i in convs[:4]), convs[4]) if taps == "paper" else tuple(convs)
        self.name, self.pretrained, self.image_size, self.taps = name, pretrained, image_size, taps

    train = _eval_only

    @torch.no_grad()
    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Five float32 maps with 1, 1/2, 1/4, 1/8, 1/16 of the (resized) input's height and width."""
        x = _model_input(images, self.features, IMAGENET_MEAN, IMAGENET_STD, self.image_size, crop=False)
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_layers:
                maps.append(x.float())
        return maps


class VGG19(_VGGTaps):
    """VGG19 feature maps at relu1_1, relu2_1, relu3_1, relu4_1 and conv5_1 (64, 128, 256, 512, 512 channels),
    whose Gram matrices give the style loss of base-model preservation.

    As the paper ran it: ImageNet VGG19, images resized (bicubic) so the shorter side is 224, ImageNet-normalised,
    maps after the ReLU at the first four and before it at conv5_1 (see ``taps``). The size matters: the layers'
    receptive fields are fixed in pixels, so the Gram matrices of one image differ between sizes.

    Args:
        pretrained: load timm's ImageNet weights (``timm/vgg19.tv_in1k``, torchvision's); downloaded once into
            the Hugging Face cache, then read from it, also offline with ``HF_HUB_OFFLINE=1``. False: random
            weights.
        image_size: resize (bicubic, antialiased) so the shorter side is ``image_size``, keeping the aspect
            ratio (224: the paper's); None keeps the size as given.
        weights: a local file of those weights (``.safetensors`` or ``.pth``) to read instead of the Hub, for
            machines without network access; only with ``pretrained``.
        taps: ``"paper"``: after the ReLU at relu1_1…relu4_1 and before it at conv5_1, what the paper's code
            computed: it stored torchvision's conv1_1…conv5_1 outputs, but the in-place ReLU after each of the first
            four overwrote the stored map, and it stopped at conv5_1, before that ReLU ran. ``"pre-relu"``: before
            the ReLU at all five, the conv1_1…conv5_1 maps that code named.
    """

    def __init__(
        self, pretrained: bool = True, image_size: int | None = 224, weights: str | None = None,
        taps: Literal["paper", "pre-relu"] = "paper",
    ):
        if weights and not pretrained:
            raise ValueError("VGG19: `weights` is read only with pretrained=True")
        if weights and not Path(weights).expanduser().is_file():
            raise EncoderError(f"VGG19 weights file not found: {weights}")
        source = weights or "timm/vgg19.tv_in1k"
        try:
            model = timm.create_model(
                "vgg19", pretrained=pretrained,
                pretrained_cfg_overlay={"file": str(Path(weights).expanduser())} if weights else None,
            )
        except OSError as err:  # missing file, not in the cache offline, no network
            raise EncoderError(
                f"could not load VGG19 ImageNet weights {source!r}: {_reason(err)}. Download them once "
                "with network access (timm keeps them in the Hugging Face cache, then also reads them with "
                "HF_HUB_OFFLINE=1), or pass `weights`: a local copy of timm/vgg19.tv_in1k's model.safetensors"
            ) from None
        super().__init__(model.features, f"vgg19:{source}" if pretrained else "vgg19 (untrained)", pretrained,
                         image_size, taps)


class TinyVGG19(_VGGTaps):
    """VGG19's layer structure (same taps) at 8, 16, 32, 64, 64 channels with random weights, for tests.

    Args:
        seed: seed of the random weights.
        image_size: resize so the shorter side is ``image_size`` (224, as `VGG19`), keeping the aspect ratio;
            None keeps the size.
        taps: ``"paper"`` or ``"pre-relu"``, as `VGG19`'s.
    """

    def __init__(self, seed: int = 0, image_size: int | None = 224, taps: Literal["paper", "pre-relu"] = "paper"):
        layers: list[nn.Module] = []
        channels = 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for width, convs in zip((8, 16, 32, 64, 64), VGG19_CONVS_PER_BLOCK):
                for _ in range(convs):
                    conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
                    # VGG's initialisation (as timm's), which keeps the activations' scale through the layers.
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(conv.bias)
                    layers += [conv, nn.ReLU(inplace=True)]
                    channels = width
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        super().__init__(nn.Sequential(*layers), "tiny-vgg19 (untrained)", False, image_size, taps)
