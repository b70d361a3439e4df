"""The paper's evaluation metrics: the table of them (:mod:`.specs`, no torch), their functional forms on
embeddings (:mod:`.functional`) and the encoders that make the embeddings (:mod:`.encoders`: DINOv2, CLIP, VGG19
and tiny untrained stand-ins).

Only the table is imported with the package: ``lycoflow analyze`` reads it without torch. The torch-side names
are imported from their modules when first asked for (``lycoflow.metrics.TinyCLIP`` works as before).
"""

from __future__ import annotations

import importlib
from typing import Any

from .specs import BY_NAME, COLUMNS, CRITERIA, METRICS, MetricSpec

_LAZY = {
    **dict.fromkeys(("CLIP", "OpenCLIP", "VGG19", "DINOv2", "ImageEmbedder", "StyleFeatures", "TextImageEmbedder",
                     "TinyCLIP", "TinyOpenCLIP", "TinyDINOv2", "TinyVGG19", "EncoderError"), "encoders"),
    **dict.fromkeys(("gram_matrices", "image_similarity", "squared_centroid_distance", "style_loss",
                     "text_image_similarity", "vendi_score"), "functional"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("encoders", "functional"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BY_NAME", "COLUMNS", "CRITERIA", "METRICS", "MetricSpec", *_LAZY]
