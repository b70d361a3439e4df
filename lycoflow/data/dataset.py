"""The torch Dataset: one training item (pixels or cached latents, caption, concept labels) per key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .balance import Bucket
from .captions import build_caption
from .encodings import EncodingCache
from .folders import Sample
from .images import cover_crop, load_rgb, size_conditioning, to_tensor
from .manifest import Concept


class HierarchicalDataset(Dataset):
    """Items by ``index`` (deterministic: centre crop, full caption) or ``(index, seed)`` (augmented); a list of
    keys gives the collated batch (what :class:`~lycoflow.data.balance.BucketBatchSampler` asks for).

    ``buckets`` (one (w, h) per sample) replaces the square ``resolution`` crop. An item holds ``pixel_values``
    or, with the latent cache, ``latent_parameters``; with the text cache also ``encoder_hidden_states`` (SDXL:
    and ``text_embeds``); and ``add_time_ids``, SDXL's size conditioning of the crop
    (`lycoflow.data.images.size_conditioning`).
    """

    def __init__(self, samples: Sequence[Sample], concepts: Sequence[Concept], resolution: int,
                 center_crop: bool = True, flip: bool = False, shuffle_tags: bool = False, keep_tokens: int = 1,
                 tag_dropout: float = 0.0, caption_dropout: float = 0.0,
                 buckets: Sequence[Bucket] | None = None) -> None:
        self.buckets = None if buckets is None else list(buckets)
        self.samples = list(samples)
        self.concepts = list(concepts)
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip = flip
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.caption_dropout = caption_dropout
        # Set by HierarchicalDataModule.cache_encodings: per sample the (unflipped, flipped) latent entry, and per
        # caption its text entry; items then carry those tensors instead of pixels / instead of nothing.
        self.cache: EncodingCache | None = None
        self.latent_keys: list[tuple[str, str | None]] | None = None
        self.text_keys: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int] | list[tuple[int, int]]) -> dict[str, Any]:
        if isinstance(key, list):
            return default_collate([self[k] for k in key])
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        concept = self.concepts[sample.concept]
        rng = None if seed is None else np.random.default_rng(seed)
        # Always draw the same four numbers first, so switching one option does not reshuffle the others.
        u_drop, u_flip, u_x, u_y = rng.random(4) if rng is not None else (1.0, 1.0, 0.5, 0.5)
        flip = bool(self.flip and u_flip < 0.5)
        offset = (0.5, 0.5) if self.center_crop else (u_x, u_y)
        # SDXL's size conditioning, from the sizes alone: the same with cached latents (which are centre crops).
        item: dict[str, Any] = {"add_time_ids": size_conditioning(sample.size, self.size(index), offset, flip)}
        if self.latent_keys is not None:
            entry = self._cache().read("latent_parameters", self.latent_keys[index][flip])
            item["latent_parameters"] = entry["latent_parameters"]
        else:
            item["pixel_values"] = self.pixels(index, offset, flip)
        caption = "" if u_drop < self.caption_dropout else build_caption(
            concept.descriptor, sample.tags, self.keep_tokens, self.shuffle_tags, self.tag_dropout, rng)
        if self.text_keys is not None:
            item |= self._cache().read("encoder_hidden_states", self.text_keys[caption])  # + SDXL's text_embeds
        return {**item, "caption": caption, "category": concept.category, "class": concept.class_name,
                "subclass": concept.subclass, "path": str(sample.path)}

    def size(self, index: int) -> Bucket:
        """The (w, h) sample ``index`` is trained at."""
        return (self.resolution, self.resolution) if self.buckets is None else self.buckets[index]

    def pixels(self, index: int, offset: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> torch.Tensor:
        """The image cropped to its training size (``offset`` places the crop), mirrored if ``flip``."""
        path = self.samples[index].path
        try:
            img = cover_crop(load_rgb(path), self.size(index), offset)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{path}: unreadable image ({err}); it was readable at setup") from err
        return to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)

    def full_caption(self, index: int) -> str:
        """The caption without shuffle or dropout (what validation uses)."""
        sample = self.samples[index]
        return build_caption(self.concepts[sample.concept].descriptor, sample.tags, self.keep_tokens)

    def _cache(self) -> EncodingCache:
        assert self.cache is not None, "cache keys are set together with the cache"
        return self.cache
