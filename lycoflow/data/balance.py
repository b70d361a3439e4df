"""What an epoch holds and in which order: repeats, class-balanced quotas, the seeded sampler, aspect-ratio buckets.

Balance: each epoch gives every group (leaf concept, class or category, per ``balance``) exactly as many
exposures as the largest group has images; within a group every image is seen ``⌊T/n⌋`` times and
``T mod n`` images chosen afresh each epoch once more. Concepts with explicit repeats are left out of the
balancing and get exactly ``repeats`` exposures per image.

Determinism: the sampler draws the epoch's order and one 63-bit seed per position from (seed, epoch)
alone, and yields ``(image index, sample seed)``; the dataset derives the crop, flip, tag shuffle and
dropouts from that sample seed. Nothing reads the global RNG, so batches do not depend on worker count,
on earlier epochs, or on what else the process drew (which is what resuming from a checkpoint needs).

Aspect-ratio buckets (kohya's scheme): every (w, h) in multiples of ``bucket_step`` within [min, max] on each
side with w·h ≤ resolution²; each image goes to the bucket nearest its aspect ratio (with ``bucket_no_upscale``,
an image under resolution² in area gets its own size rounded down to the step), is resized to cover it and
cropped. :class:`BucketBatchSampler` cuts the epoch plan into batches of one bucket and shuffles their order
from (seed, epoch); the loader takes it as its *sampler* with ``batch_size=None``, so under DDP Lightning wraps
it like the plain sampler and rank r gets whole batches r, r+W, ... (disjoint; the last few repeated so that
every rank takes as many steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

import numpy as np
from torch.utils.data import Sampler

from .folders import Sample
from .manifest import Concept

Bucket = tuple[int, int]  # (width, height) of the training image
Balance = Literal["none", "category", "class", "subclass"]
Quota = tuple[np.ndarray, int]  # sample indices, and how many exposures they share per epoch
T = TypeVar("T")


# ---------------------------------------------------------------- repeats and quotas


def apply_repeats(concepts: Sequence[Concept], repeats: dict[str, int]) -> list[Concept]:
    """Explicit repeats by folder key (a concept's key or an ancestor's; the deepest match wins)."""
    ancestry = {c.key: _ancestors(c.key) for c in concepts}
    known = {k for keys in ancestry.values() for k in keys}
    by_key = {}
    for key, value in repeats.items():
        if key.strip("/") not in known:
            raise ValueError(f"repeats: unknown folder {key!r}; use one of: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"repeats: {key!r} must be a whole number >= 1, got {value!r}")
        by_key[key.strip("/")] = value
    out = []
    for concept in concepts:
        hits = [by_key[k] for k in ancestry[concept.key] if k in by_key]
        out.append(replace(concept, repeats=hits[-1]) if hits else concept)
    return out


def _ancestors(key: str) -> list[str]:
    """``"a/b/c"`` → ``["a", "a/b", "a/b/c"]``."""
    parts = key.split("/")
    return ["/".join(parts[:d]) for d in range(1, len(parts) + 1)]


def plan_quotas(samples: Sequence[Sample], concepts: Sequence[Concept], balance: Balance) -> list[Quota]:
    """Split the epoch into groups with fixed exposure counts (see the module docstring)."""
    fixed: list[Quota] = []
    groups: dict[Any, list[int]] = {}
    members: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        members.setdefault(sample.concept, []).append(i)
    for c, indices in members.items():
        concept = concepts[c]
        if concept.repeats is not None:
            fixed.append((np.asarray(indices), concept.repeats * len(indices)))
            continue
        for i in indices:
            groups.setdefault(_group_key(concept, balance, i), []).append(i)
    target = max((len(g) for g in groups.values()), default=0)
    return fixed + [(np.asarray(g), target) for g in groups.values()]


def _group_key(concept: Concept, balance: Balance, index: int) -> Any:
    if balance == "none":
        return index
    if balance == "category":
        return concept.category
    if balance == "class":
        return concept.category, concept.class_name
    return concept.key


def expected_exposures(quotas: Sequence[Quota], samples: Sequence[Sample], n_concepts: int) -> np.ndarray:
    """Mean exposures per concept per epoch (exact for leaf balancing and explicit repeats)."""
    out = np.zeros(n_concepts)
    for indices, exposures in quotas:
        for i in indices:
            out[samples[i].concept] += exposures / len(indices)
    return out


# ---------------------------------------------------------------- the sampler


class BalancedSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, sample seed)``; the epoch's content depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` before every epoch (also through its ``DistributedSamplerWrapper``,
    which then gives rank r the positions r, r+W, ... of this same list: disjoint shards).
    """

    def __init__(self, quotas: Sequence[Quota], seed: int = 0, strata: Sequence[int] | None = None) -> None:
        """``strata`` (one integer per sample, e.g. its bucket) fixes how many exposures each stratum of a group
        gets, the same every epoch (see :func:`_spread`); None draws the extra exposures from the whole group."""
        self.quotas = [(np.asarray(indices, dtype=np.int64), int(exposures)) for indices, exposures in quotas]
        self.seed = seed
        self.epoch = 0
        self.strata = None if strata is None else np.asarray(strata, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(exposures for _, exposures in self.quotas)

    def epoch_plan(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.concatenate([_spread(indices, exposures, rng, self.strata) for indices, exposures in self.quotas])
        order = order[rng.permutation(len(order))]
        seeds = rng.integers(0, 2**63 - 1, size=len(order), dtype=np.int64)
        return list(zip(order.tolist(), seeds.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_plan())


def _spread(indices: np.ndarray, exposures: int, rng: np.random.Generator,
            strata: np.ndarray | None = None) -> np.ndarray:
    """Each index ⌊E/n⌋ times, plus once more for E mod n of them picked at random.

    With ``strata`` the E mod n extras are first shared among the strata in proportion to their sizes (largest
    remainders, fixed across epochs) and then drawn within each stratum, so that every stratum's exposures, and
    hence the number of bucket batches, are the same in every epoch.
    """
    base, extra = divmod(exposures, len(indices))
    counts = np.full(len(indices), base)
    if strata is None:
        counts[rng.choice(len(indices), extra, replace=False)] += 1
    else:
        for members, share in _stratum_extras(strata[indices], extra):
            counts[members[rng.choice(len(members), share, replace=False)]] += 1
    return np.repeat(indices, counts)


def _stratum_extras(labels: np.ndarray, extra: int) -> list[tuple[np.ndarray, int]]:
    """(positions of each stratum, its share of ``extra``): proportional, largest remainders, ties by label."""
    strata = np.unique(labels)
    members = [np.flatnonzero(labels == s) for s in strata]
    # Integer arithmetic: share = extra·m // n, and the leftover extras go to the largest remainders.
    shares = [extra * len(m) // len(labels) for m in members]
    remainders = [extra * len(m) % len(labels) for m in members]
    for j in sorted(range(len(members)), key=lambda j: -remainders[j])[: extra - sum(shares)]:
        shares[j] += 1
    return list(zip(members, shares))


def _stratum_counts(quotas: Sequence[Quota], strata: np.ndarray) -> dict[int, int]:
    """Exposures per stratum per epoch under :func:`_spread` with ``strata`` (the same every epoch)."""
    counts: dict[int, int] = {}
    for indices, exposures in quotas:
        indices = np.asarray(indices, dtype=np.int64)
        base, extra = divmod(int(exposures), len(indices))
        for members, share in _stratum_extras(strata[indices], extra):
            label = int(strata[indices[members[0]]])
            counts[label] = counts.get(label, 0) + base * len(members) + share
    return counts


# ---------------------------------------------------------------- aspect-ratio buckets


def bucket_sizes(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[Bucket]:
    """kohya's buckets: for each width w (a multiple of ``step`` in [min, max]) the tallest h ≤ max with
    w·h ≤ resolution², both orientations, plus the largest square; sorted."""
    area = resolution * resolution
    sizes = set()
    square = resolution // step * step
    if min_side <= square <= max_side:
        sizes.add((square, square))
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def assign_bucket(size: tuple[int, int], buckets: Sequence[Bucket], resolution: int, step: int,
                  max_side: int, no_upscale: bool = False) -> Bucket:
    """The bucket of an image of ``size`` (w, h): the one nearest its aspect ratio (in log ratio); with
    ``no_upscale``, an image under resolution² in area keeps its own size rounded down to the step."""
    w, h = size
    if no_upscale and w * h < resolution * resolution:
        return min(max_side, w // step * step), min(max_side, h // step * step)
    log_ratio = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))


def bucket_strata(buckets: Sequence[Bucket]) -> list[int]:
    """One integer per sample: its bucket's rank among the distinct buckets (the sampler's strata)."""
    labels = {b: i for i, b in enumerate(sorted(set(buckets)))}
    return [labels[b] for b in buckets]


def batch_by_bucket(items: Sequence[T], buckets: Sequence[Bucket], batch_size: int) -> list[list[T]]:
    """Batches of one bucket each (``buckets[i]`` is item i's): buckets in sorted order, items in the given order
    within each, cut into ``batch_size`` (a bucket's last batch may be smaller)."""
    by_bucket: dict[Bucket, list[T]] = {}
    for item, bucket in zip(items, buckets):
        by_bucket.setdefault(bucket, []).append(item)
    return [group[i:i + batch_size] for _, group in sorted(by_bucket.items())
            for i in range(0, len(group), batch_size)]


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(sample index, sample seed)`` from one bucket each; the epoch depends only on (seed, epoch).

    Takes the :class:`BalancedSampler`'s epoch plan (built with the buckets as strata, so that each bucket gets
    the same number of exposures every epoch and ``len`` is exact), cuts each bucket's share, in plan order,
    into batches of ``batch_size`` (a bucket's last batch may be smaller), then shuffles the batch order.
    Used as the loader's *sampler* (``batch_size=None``), so Lightning's ``DistributedSamplerWrapper`` shards
    whole batches across ranks and forwards :meth:`set_epoch` here.
    """

    def __init__(self, sampler: BalancedSampler, buckets: Sequence[Bucket], batch_size: int) -> None:
        self.sampler = sampler
        self.buckets = list(buckets)  # one per sample index
        self.batch_size = batch_size
        strata = np.asarray(bucket_strata(self.buckets), dtype=np.int64)
        if sampler.strata is None or not np.array_equal(sampler.strata, strata):
            raise ValueError("the BalancedSampler must be built with strata=bucket_strata(buckets)")
        self.counts = _stratum_counts(sampler.quotas, strata)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.counts.values())

    def epoch_batches(self) -> list[list[tuple[int, int]]]:
        plan = self.sampler.epoch_plan()
        batches = batch_by_bucket(plan, [self.buckets[index] for index, _ in plan], self.batch_size)
        # A stream of its own (the trailing 1), so the batch order does not disturb the plan's draws.
        rng = np.random.default_rng([self.sampler.seed, self.sampler.epoch, 1])
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.epoch_batches())
