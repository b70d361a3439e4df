"""Evaluation encoders trained on the toy world (`lycoflow.data.world`), in the roles of the paper's: what the
quickstart and the toy sweep measure with, offline, and what makes their numbers mean something.

- `ToyImageEncoder` (DINOv2's role: fidelity, diversity): a small VGG-like network trained self-supervised on the
  world's images (SimCLR: two random crops and colour distortions of an image must embed closer to each other
  than to the batch's others).
- `ToyCLIP` (CLIP's role: controllability): an image network and a word-level text transformer trained together
  contrastively on the world's image–caption pairs. Not the base model's text encoder, which would make the
  measurement circular. Words outside the world's vocabulary (trigger words, the quickstart concepts' names) are
  unknown to it, as made-up trigger words are to CLIP.
- `ToyStyleNet` (VGG19's role: the style loss): a network trained supervised to name each image's attributes
  (figure, colour, size, position, background, rendering style), tapped after the first ReLU of each of its four
  stages as VGG19 is at relu1_1…relu4_1. Its attribute heads are kept: `classify` is what tests use to check
  what the toy base draws.

Their weights ship inside the package with the toy base model (`lycoflow.toy`), checksum-verified on load. They
know the toy world only: on real photographs their numbers mean nothing.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import world
from .encoders import _eval_only, _model_input

#: The world images' statistics, close enough for a network trained from scratch.
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
#: Attribute heads of `ToyStyleNet`, each with its classes in order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "figure": (*world.SHAPES, *world.CREATURES, *world.PATTERNS), "colour": tuple(sorted(world.COLOURS)),
    "size": world.SIZES, "position": world.POSITIONS, "background": tuple(sorted(world.BACKGROUNDS)),
    "style": world.STYLES,
}
#: The text tower's vocabulary: padding, unknown, then the world's words.
TOKENS = ("<pad>", "<unk>", *world.VOCABULARY)
CONTEXT = 24


class ConvNet(nn.Module):
    """VGG's design at toy scale: four stages of two 3×3 convolutions with ReLUs and a 2×2 max-pool, widths 8–64,
    on 64² inputs; ``embed`` is the average-pooled last stage projected to ``dim``.

    Args:
        dim: width of the embedding (0: no projection, as `ToyStyleNet`, whose heads read the pooled features).
    """

    widths = (8, 16, 32, 64)

    def __init__(self, dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in self.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.project = nn.Linear(channels, dim) if dim else nn.Identity()
        #: Index in ``features`` of each stage's first ReLU (the style taps).
        self.taps = tuple(5 * k + 1 for k in range(len(self.widths)))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x).mean((2, 3)))


def tokenize(texts: list[str]) -> Tensor:
    """Word ids ``[b, CONTEXT]``: lower-cased words of the world's vocabulary, others unknown, then padding."""
    index = {token: i for i, token in enumerate(TOKENS)}
    ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        # An empty text (a style descriptor deleted, the paper's rule) is one unknown word, as CLIP still reads its
        # start and end tokens: a row of padding alone would attend to nothing and embed as NaN.
        words = [index.get(w, 1) for w in re.findall(r"[a-z]+", text.lower())][:CONTEXT] or [1]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
    return ids


class TextTower(nn.Module):
    """Word embeddings with learned positions, a 2-layer transformer, the mean over the words, a projection."""

    def __init__(self, dim: int = 64, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(len(TOKENS), width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.project = nn.Linear(width, dim)

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0
        x = self.blocks(self.embed(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.project((x * keep).sum(1) / keep.sum(1).clamp(min=1))


class ContrastivePair(nn.Module):
    """`ToyCLIP`'s trained parts: image network, text tower and CLIP's learned temperature."""

    def __init__(self):
        super().__init__()
        self.image = ConvNet()
        self.text = TextTower()
        self.log_scale = nn.Parameter(torch.tensor(2.66))  # CLIP's initial 1/0.07


class AttributeNet(nn.Module):
    """`ToyStyleNet`'s trained parts: the convolution stack and one linear head per attribute."""

    def __init__(self):
        super().__init__()
        self.net = ConvNet(dim=0)
        self.heads = nn.ModuleDict({name: nn.Linear(ConvNet.widths[-1], len(classes))
                                    for name, classes in ATTRIBUTES.items()})


def pixels(images: Tensor, module: nn.Module) -> Tensor:
    """Float images [b, 3, H, W] in [0, 1] → the toy networks' input: shorter side 64, centre crop, normalised."""
    return _model_input(images, module, MEAN, STD, world.SIZE)


def _trained(module: nn.Module, prefix: str, weights: str | None) -> nn.Module:
    from ..toy import read_weights  # the shipped file and its checksum live with the toy base model

    tensors = read_weights(weights)
    state = {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)
    return module.requires_grad_(False).eval()


class ToyImageEncoder(nn.Module):
    """The toy world's image encoder (DINOv2's role). ``weights``: a file written by ``lycoflow pretrain`` (None: the
    one shipped with lycoflow)."""

    pretrained = True
    image_size = world.SIZE

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.model = _trained(ConvNet(), "image_encoder", weights)
        self.name = "toy-world image encoder"

    train = _eval_only

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        return self.model(pixels(images, self.model)).float()


class ToyCLIP(nn.Module):
    """The toy world's contrastive image–text pair (CLIP's role). ``weights`` as `ToyImageEncoder`'s."""

    pretrained = True
    image_size = world.SIZE

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.model = _trained(ContrastivePair(), "clip", weights)
        self.name = "toy-world clip"

    train = _eval_only

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        return self.model.image(pixels(images, self.model)).float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        return self.model.text(tokenize(list(texts)).to(device)).float()


class ToyStyleNet(nn.Module):
    """The toy world's feature network for the style loss (VGG19's role). ``weights`` as `ToyImageEncoder`'s."""

    pretrained = True

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.model = _trained(AttributeNet(), "style", weights)
        self.name = "toy-world style net"

    train = _eval_only

    @torch.no_grad()
    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Four float32 maps (8, 16, 32, 64 channels) at 1, 1/2, 1/4, 1/8 of 64²."""
        x, maps = pixels(images, self.model), []
        for i, layer in enumerate(self.model.net.features):
            x = layer(x)
            if i in self.model.net.taps:
                maps.append(x.float())
            if i == self.model.net.taps[-1]:
                break
        return maps

    @torch.no_grad()
    def classify(self, images: Tensor) -> dict[str, list[str]]:
        """What each image shows, attribute by attribute, as the network reads it."""
        features = self.model.net(pixels(images, self.model))
        return {name: [ATTRIBUTES[name][i] for i in head(features).argmax(1).tolist()]
                for name, head in self.model.heads.items()}


def attribute_targets(scenes: list[world.Scene]) -> dict[str, Tensor]:
    """Class indices of ``scenes`` per attribute head (what `AttributeNet` is trained to predict)."""
    return {name: torch.tensor([classes.index(getattr(s, name)) for s in scenes]) for name, classes in
            ATTRIBUTES.items()}


def info_nce(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP's symmetric contrastive loss: row i of ``a`` belongs with row i of ``b`` and with no other row."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * scale
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

