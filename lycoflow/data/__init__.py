"""The hierarchical, class-balanced, captioned training data of the paper (§5.1), and its encoding caches.

A data set is a folder tree ``category/class[/subclass]/`` of images with caption files beside them and an
optional ``dataset.yaml``; :class:`HierarchicalDataModule` turns it into balanced, seeded, optionally bucketed
batches. Modules, bottom to top (each imports only from those before it):

- ``images``: image files in, training tensors out.
- ``manifest``: ``dataset.yaml`` and :class:`Concept`.
- ``captions``: caption files' tags and the caption built from them.
- ``folders``: the folder scan, kohya ``N_name`` folders, bad files (:func:`scan`, :class:`Sample`).
- ``balance``: repeats, balanced quotas, the seeded samplers, aspect-ratio buckets.
- ``encodings``: the on-disk latent and text-encoder caches.
- ``dataset``: :class:`HierarchicalDataset`, one item per key.
- ``datamodule``: :class:`HierarchicalDataModule` and its setup report.
- ``synthetic``: the generated quickstart data set, :class:`SyntheticConcepts`.
"""

from .balance import (
    Balance,
    BalancedSampler,
    Bucket,
    BucketBatchSampler,
    Quota,
    apply_repeats,
    assign_bucket,
    batch_by_bucket,
    bucket_sizes,
    bucket_strata,
    expected_exposures,
    plan_quotas,
)
from .captions import build_caption, clean_tags, read_tags
from .datamodule import HierarchicalDataModule, print_buckets, print_summary, report_cache
from .dataset import HierarchicalDataset
from .folders import IMAGE_EXTENSIONS, OnBadFile, Sample, scan
from .images import cover_crop, letterbox, load_rgb, probe_image, square_crop, to_tensor
from .manifest import ENTRY_FIELDS, MANIFEST, Concept, load_manifest
from .synthetic import SyntheticConcepts

__all__ = [
    "ENTRY_FIELDS", "IMAGE_EXTENSIONS", "MANIFEST", "Balance", "BalancedSampler", "Bucket", "BucketBatchSampler",
    "Concept", "HierarchicalDataModule", "HierarchicalDataset", "OnBadFile", "Quota", "Sample", "SyntheticConcepts",
    "apply_repeats", "assign_bucket", "batch_by_bucket", "bucket_sizes", "bucket_strata", "build_caption",
    "clean_tags", "cover_crop", "expected_exposures", "letterbox", "load_manifest", "load_rgb", "plan_quotas",
    "print_buckets", "print_summary", "probe_image", "read_tags", "report_cache", "scan", "square_crop", "to_tensor",
]
