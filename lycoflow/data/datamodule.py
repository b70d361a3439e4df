"""The LightningDataModule: scans the data set at setup, balances and buckets it, fills the encoding caches, and
hands out the training and validation loaders; plus the setup report it prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from ..cache import cache_dir as default_cache_dir
from .balance import (
    Balance,
    BalancedSampler,
    Bucket,
    BucketBatchSampler,
    apply_repeats,
    assign_bucket,
    batch_by_bucket,
    bucket_sizes,
    bucket_strata,
    expected_exposures,
    plan_quotas,
)
from .dataset import HierarchicalDataset
from .encodings import TEXT_BATCH, EncodingCache, EncodingModel, file_digests, fill, latent_key, text_key
from .folders import OnBadFile, Sample, scan
from .manifest import Concept


class HierarchicalDataModule(L.LightningDataModule):
    """Class-balanced captioned images from a ``category/class[/subclass]`` folder tree (the paper's §5.1 data).

    Each constructor argument is kept once, as the attribute of its name (callbacks read them, e.g.
    ``keep_tokens``); they are not also saved as Lightning hyperparameters: the resolved recipe, which every run
    writes to its ``config.yaml`` and logs, already records them.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 1,
        caption_dropout: float = 0.0,
        balance: Balance = "subclass",
        repeats: dict[str, int] | None = None,
        center_crop: bool = True,
        flip: bool = False,
        shuffle_tags: bool = False,
        keep_tokens: int = 1,
        tag_dropout: float = 0.0,
        caption_extension: str = ".txt",
        num_workers: int = 0,
        seed: int = 0,
        on_bad_file: OnBadFile = "error",
        bucketing: bool = False,
        min_bucket_resolution: int = 256,
        max_bucket_resolution: int = 1024,
        bucket_step: int = 64,
        bucket_no_upscale: bool = False,
        cache_latents: bool = False,
        cache_text_encoder_outputs: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            root: dataset folder: ``category/class[/subclass]/`` images, caption files beside them, optional
                ``dataset.yaml`` manifest (triggers, class words, tags to drop, evaluation text, prompts).
            resolution: side of the square training images (shorter side resized, then cropped).
            batch_size: images per batch.
            caption_dropout: probability that a training caption is replaced by "" (paper: 0.05).
            balance: which groups get equal exposure per epoch: every leaf ``subclass`` (the paper), every
                ``class``, every ``category``, or ``none`` (each image once).
            repeats: fixed repeats per epoch by folder key (``category/class[/subclass]``), overriding the
                balance, the manifest and kohya ``N_`` prefixes for that folder.
            center_crop: crop the centre; otherwise a random crop per sample.
            flip: mirror half the training images horizontally.
            shuffle_tags: shuffle the caption's tags after the first ``keep_tokens``.
            keep_tokens: leading comma-separated tokens kept in place and never dropped (the
                ``trigger class_word`` head is one).
            tag_dropout: probability of dropping each tag after the first ``keep_tokens``.
            caption_extension: extension of the caption file beside each image.
            num_workers: data loader worker processes (0: load in the main process).
            seed: seed of the epoch order, repeats, crops, flips and dropouts (non-negative).
            on_bad_file: ``error`` stops at an unreadable image, caption, empty class folder, an image that would
                be upscaled more than 8× to ``resolution`` or (with ``bucket_no_upscale``) one with a side under
                ``min_bucket_resolution``; ``skip`` leaves it out and lists it at setup.
            bucketing: aspect-ratio buckets instead of square crops: each image is resized to cover the bucket
                nearest its aspect ratio and cropped (centre or random per ``center_crop``); every batch holds
                one bucket. Buckets (kohya's): (w, h), multiples of ``bucket_step`` within
                [``min_bucket_resolution``, ``max_bucket_resolution``], w·h ≤ ``resolution``². Under DDP each
                rank takes whole batches (disjoint; up to world size − 1 batches repeated to even out the ranks).
            min_bucket_resolution: smallest bucket side (a multiple of ``bucket_step``).
            max_bucket_resolution: largest bucket side (a multiple of ``bucket_step``).
            bucket_step: bucket sides are multiples of this (64 for SD: 8 latent pixels).
            bucket_no_upscale: an image smaller than ``resolution``² in area gets a bucket of its own size
                rounded down to ``bucket_step`` (never upscaled), instead of a predefined bucket.
            cache_latents: encode every training image with the VAE once, before the first batch (progress bar),
                and read the latents from disk afterwards. Entries are keyed by image content, VAE, size and flip
                (with ``flip`` both orientations are encoded); needs ``center_crop``.
            cache_text_encoder_outputs: likewise for the text encoder's outputs, one entry per caption; needs a
                frozen text encoder (``model.train_text_encoder: false``) and fixed captions (no ``shuffle_tags``
                or ``tag_dropout``; ``caption_dropout`` is fine).
            cache_dir: where the caches live (default ``<lycoflow cache>/encodings``); entries are content-keyed,
                so runs share them, and the folder can be deleted at any time.
        """
        super().__init__()
        _check_options(resolution, batch_size, caption_dropout, tag_dropout, keep_tokens, num_workers, seed,
                       caption_extension)
        if bucketing:
            _check_buckets(resolution, min_bucket_resolution, max_bucket_resolution, bucket_step)
        if cache_latents and not center_crop:
            raise ValueError("cache_latents needs center_crop: true (a random crop differs every epoch, so its "
                             "latents could not be reused); set center_crop: true or cache_latents: false")
        if cache_text_encoder_outputs and (shuffle_tags or tag_dropout):
            raise ValueError("cache_text_encoder_outputs needs fixed captions: set shuffle_tags: false and "
                             "tag_dropout: 0, or cache_text_encoder_outputs: false")
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.balance = balance
        self.repeats = dict(repeats or {})
        self.center_crop = center_crop
        self.flip = flip
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.caption_extension = caption_extension
        self.num_workers = num_workers
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.bucketing = bucketing
        self.min_bucket_resolution = min_bucket_resolution
        self.max_bucket_resolution = max_bucket_resolution
        self.bucket_step = bucket_step
        self.bucket_no_upscale = bucket_no_upscale
        self.cache_latents = cache_latents
        self.cache_text_encoder_outputs = cache_text_encoder_outputs
        self.cache_dir = cache_dir
        self.buckets: list[Bucket] = []  # with bucketing: the (w, h) of each sample
        self.concepts: list[Concept] = []  # read by the evaluation callbacks: triggers, eval texts, prompts
        self.samples: list[Sample] = []
        self.skipped: list[tuple[Path, str]] = []
        self.exposures = np.zeros(0)  # mean exposures per concept per epoch
        self.dataset: HierarchicalDataset | None = None
        self.sampler: BalancedSampler | None = None
        self.bucket_sampler: BucketBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        root = Path(self.root).expanduser()
        if self.bucketing and self.bucket_no_upscale:
            # Never upscaled: an image keeps its own size, which no bucket under the smallest can hold.
            min_side = self.min_bucket_resolution
            rule = f"the smallest bucket, min_bucket_resolution {min_side}: use a larger image or lower it"
        else:  # upscaled to cover its square or bucket, as kohya does (the paper's buckets allow it)
            # An image blown up more than 8x holds too little to learn from: a 1x1 image trains as a flat colour.
            min_side = -(-self.resolution // MAX_UPSCALE)
            rule = (f"it would be upscaled more than {MAX_UPSCALE}x to resolution {self.resolution}: use a larger "
                    "image or a lower resolution")
        concepts, samples, skipped = scan(root, self.caption_extension, self.on_bad_file, min_side, rule)
        if self.repeats:
            concepts = apply_repeats(concepts, self.repeats)
        quotas = plan_quotas(samples, concepts, self.balance)
        self.concepts, self.samples, self.skipped = concepts, samples, skipped
        self.exposures = expected_exposures(quotas, samples, len(concepts))
        if self.bucketing:
            sizes = bucket_sizes(self.resolution, self.min_bucket_resolution, self.max_bucket_resolution,
                                 self.bucket_step)
            self.buckets = [assign_bucket(s.size, sizes, self.resolution, self.bucket_step,
                                          self.max_bucket_resolution, self.bucket_no_upscale) for s in samples]
            self.sampler = BalancedSampler(quotas, self.seed, strata=bucket_strata(self.buckets))
            self.bucket_sampler = BucketBatchSampler(self.sampler, self.buckets, self.batch_size)
        else:
            self.sampler = BalancedSampler(quotas, self.seed)
        self.dataset = HierarchicalDataset(samples, concepts, self.resolution, self.center_crop, self.flip,
                                           self.shuffle_tags, self.keep_tokens, self.tag_dropout,
                                           self.caption_dropout, self.buckets or None)
        print_summary(self.concepts, self.exposures, self.skipped)
        if self.bucketing:
            print_buckets(self.buckets)

    def train_dataloader(self) -> DataLoader:
        self._fill_caches()
        if self._ready().bucket_sampler is not None:
            # Whole batches come from the sampler, so Lightning's DDP wrapper shards batches, not images.
            return self._loader(sampler=self.bucket_sampler, batch_size=None)
        return self._loader(sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        """Every image once, in scan order, centre-cropped, unflipped, with its full caption (with bucketing:
        batches of one bucket each, in bucket order)."""
        self._fill_caches()
        if self._ready().buckets:
            batches = batch_by_bucket(range(len(self.buckets)), self.buckets, self.batch_size)
            # Whole batches as the sampler's items, as for training: under DDP each rank takes whole batches.
            return self._loader(sampler=batches, batch_size=None)
        return self._loader(shuffle=False)

    def cache_encodings(self, encoders: EncodingModel, rank: int = 0, world_size: int = 1,
                        barrier: Callable[[], None] | None = None) -> None:
        """Encode what the caches lack and make the loaders read from them.

        Inside a Trainer the loaders call this with the LightningModule (on its device, after it was moved);
        elsewhere call it yourself. Under DDP each rank encodes a share of the missing entries, waits at
        ``barrier``, then encodes whatever it still cannot see (a disk other ranks do not share).
        """
        dataset = self._ready().dataset
        assert dataset is not None
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "encodings"
        cache = EncodingCache(root)
        latent_keys, latent_jobs = self._latent_jobs(encoders, dataset) if self.cache_latents else (None, {})
        text_keys, text_jobs = self._text_jobs(encoders, dataset) if self.cache_text_encoder_outputs else (None, {})

        def encode_missing(share: slice) -> None:
            latents = cache.missing("latent_parameters", latent_jobs)[share]
            texts = cache.missing("encoder_hidden_states", text_jobs)[share]
            show = rank == 0
            if latents:
                self._encode_latents(cache, encoders, dataset, [(k, *latent_jobs[k]) for k in latents], show)
            if texts:
                _encode_texts(cache, encoders, {k: text_jobs[k] for k in texts}, show)

        report_cache(cache.root, {"latents": (len(latent_jobs), len(cache.missing("latent_parameters", latent_jobs))),
                                  "text-encoder outputs": (len(text_jobs),
                                                           len(cache.missing("encoder_hidden_states", text_jobs)))})
        encode_missing(slice(rank, None, world_size))
        if world_size > 1 and barrier is not None:
            barrier()
            encode_missing(slice(None))
        dataset.cache, dataset.latent_keys, dataset.text_keys = cache, latent_keys, text_keys

    def _latent_jobs(self, encoders: EncodingModel, dataset: HierarchicalDataset
                     ) -> tuple[list[tuple[str, str | None]], dict[str, tuple[int, bool]]]:
        """Per sample its (unflipped, flipped) entry keys, and per key what to encode: (sample, flip)."""
        vae = encoders.latent_identity()
        digests = file_digests([sample.path for sample in self.samples])
        keys = [(latent_key(d, vae, dataset.size(i), False), latent_key(d, vae, dataset.size(i), True)
                 if self.flip else None) for i, d in enumerate(digests)]
        return keys, {key: (i, bool(flip)) for i, pair in enumerate(keys) for flip, key in enumerate(pair)
                      if key is not None}

    def _text_jobs(self, encoders: EncodingModel, dataset: HierarchicalDataset
                   ) -> tuple[dict[str, str], dict[str, str]]:
        """Per caption its entry key, and per key the caption: every full caption, and "" with caption dropout."""
        identity = encoders.text_identity()
        if identity is None:
            raise ValueError("cache_text_encoder_outputs needs a frozen text encoder, but the model trains it: set "
                             "model.train_text_encoder: false, or data.init_args.cache_text_encoder_outputs: false")
        captions = [dataset.full_caption(i) for i in range(len(dataset))] + [""] * (self.caption_dropout > 0)
        keys = {caption: text_key(caption, identity) for caption in captions}
        return keys, {key: caption for caption, key in keys.items()}

    def _encode_latents(self, cache: EncodingCache, encoders: EncodingModel, dataset: HierarchicalDataset,
                        jobs: list[tuple[str, int, bool]], show: bool) -> None:
        # One size per VAE call: batches are cut within each training size.
        batches = batch_by_bucket(range(len(jobs)), [dataset.size(index) for _, index, _ in jobs], self.batch_size)
        loader = DataLoader(_LatentInputs(dataset, jobs), batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_collate_latent_inputs)
        fill(cache, "latent_parameters", loader, encoders.latent_parameters, len(jobs), "caching latents", show)

    def _fill_caches(self) -> None:
        """Inside a Trainer: fill the caches with the LightningModule's encoders the first time a loader is asked."""
        wanted = self.cache_latents or self.cache_text_encoder_outputs
        if not wanted or self._ready().dataset.cache is not None:
            return
        if self.trainer is None:
            raise RuntimeError("cache_latents / cache_text_encoder_outputs need encoders: call "
                               "dm.cache_encodings(model) before asking for a loader outside a Trainer")
        model = self.trainer.lightning_module
        if not isinstance(model, EncodingModel):
            raise TypeError(f"cache_latents / cache_text_encoder_outputs need a model that encodes "
                            f"(latent_identity, latent_parameters, text_identity, text_conditioning); "
                            f"{type(model).__name__} does not")
        self.cache_encodings(model, self.trainer.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)

    def _ready(self) -> HierarchicalDataModule:
        if self.dataset is None:
            raise RuntimeError("call setup() before asking HierarchicalDataModule for a data loader")
        return self

    def _loader(self, **kwargs: Any) -> DataLoader:
        kwargs.setdefault("batch_size", self.batch_size)
        return DataLoader(
            self._ready().dataset, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
            # The loader draws its worker base seed from this generator instead of the global RNG.
            generator=torch.Generator().manual_seed(self.seed), **kwargs)


def _encode_texts(cache: EncodingCache, encoders: EncodingModel, captions: dict[str, str], show: bool) -> None:
    """Encode ``captions`` (entry key → caption), :data:`TEXT_BATCH` per text-encoder call."""
    keys = list(captions)
    chunks = [keys[i:i + TEXT_BATCH] for i in range(0, len(keys), TEXT_BATCH)]
    batches = ((chunk, [captions[k] for k in chunk], [{"caption": captions[k]} for k in chunk]) for chunk in chunks)
    fill(cache, "encoder_hidden_states", batches, encoders.text_conditioning, len(keys), "caching text-encoder outputs",
         show)


class _LatentInputs(Dataset):
    """The cropped, maybe flipped images of the latent entries to encode: ``(key, pixels, metadata)``."""

    def __init__(self, dataset: HierarchicalDataset, jobs: Sequence[tuple[str, int, bool]]) -> None:
        self.dataset, self.jobs = dataset, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> tuple[str, torch.Tensor, dict[str, str]]:
        key, index, flip = self.jobs[j]
        (w, h), path = self.dataset.size(index), self.dataset.samples[index].path
        return key, self.dataset.pixels(index, flip=flip), {"image": str(path), "size": f"{w}x{h}", "flip": str(flip)}


def _collate_latent_inputs(rows: list[tuple[str, torch.Tensor, dict[str, str]]]) -> tuple[list, torch.Tensor, list]:
    return [r[0] for r in rows], torch.stack([r[1] for r in rows]), [r[2] for r in rows]


def _check_options(resolution: int, batch_size: int, caption_dropout: float, tag_dropout: float, keep_tokens: int,
                   num_workers: int, seed: int, caption_extension: str) -> None:
    for name, value, low in (("resolution", resolution, 1), ("batch_size", batch_size, 1),
                             ("keep_tokens", keep_tokens, 0), ("num_workers", num_workers, 0), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("caption_dropout", caption_dropout), ("tag_dropout", tag_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {value}")
    if not caption_extension.startswith("."):
        raise ValueError(f"caption_extension must start with a dot, e.g. '.txt', got {caption_extension!r}")


#: The most an image is upscaled to the training resolution before it counts as a bad file.
MAX_UPSCALE = 8


def _check_buckets(resolution: int, min_side: int, max_side: int, step: int) -> None:
    if step < 1 or min_side < step or min_side % step or max_side % step or max_side < min_side:
        raise ValueError(f"bucket sides: need 1 <= bucket_step <= min_bucket_resolution <= max_bucket_resolution, "
                         f"both multiples of bucket_step; got step {step}, min {min_side}, max {max_side}")
    if min_side * min_side > resolution * resolution:
        raise ValueError(f"min_bucket_resolution {min_side} leaves no bucket with w·h <= resolution² "
                         f"(resolution {resolution}); lower it to at most {resolution}")


# ---------------------------------------------------------------- the setup report (rank 0 only)


@rank_zero_only
def report_cache(root: Path, counts: dict[str, tuple[int, int]]) -> None:
    """One line per cache in use: entries wanted, how many to encode, and where they live."""
    for name, (total, missing) in counts.items():
        if total:
            Console().print(f"{name} cache: {total} entries, {total - missing} found, {missing} to encode ({root})",
                            soft_wrap=True, markup=False, highlight=False)


@rank_zero_only
def print_buckets(buckets: Sequence[Bucket]) -> None:
    """One line: each bucket used (w×h) and how many images it holds."""
    counts: dict[Bucket, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    listing = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
    Console().print(f"buckets (w x h: images): {listing}", soft_wrap=True, markup=False, highlight=False)


@rank_zero_only
def print_summary(concepts: Sequence[Concept], exposures: np.ndarray, skipped: Sequence[tuple[Path, str]]) -> None:
    """The setup table: what each concept contributes to an epoch, and what was left out."""
    total = float(exposures.sum())
    table = Table(title=f"training data: {sum(len(c.images) for c in concepts)} images, "
                        f"{total:.0f} samples per epoch")
    for column in ("category", "class", "subclass", "images", "repeats", "share"):
        table.add_column(column, justify="right" if column in ("images", "repeats", "share") else "left")
    for concept, exposure in zip(concepts, exposures):
        repeats = f"{exposure / len(concept.images):.3g}" + (" (fixed)" if concept.repeats is not None else "")
        table.add_row(concept.category, concept.class_name, concept.subclass, str(len(concept.images)), repeats,
                      f"{exposure / total:.1%}")
    console = Console()
    console.print(table)
    if skipped:
        # Plain lines, not a table: a table would shorten long paths, and the path is what the user needs.
        console.print(f"[bold yellow]skipped {len(skipped)} files (on_bad_file: skip):[/]")
        for path, reason in skipped:
            console.print(f"  {path}: {reason}", soft_wrap=True, markup=False, highlight=False)
