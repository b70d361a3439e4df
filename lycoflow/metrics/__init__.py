"""The paper's evaluation metrics (DESIGN §6): functional forms on embeddings (:mod:`.functional`), torchmetrics
``Metric`` classes over them (:mod:`.classes`, DDP-synchronised), and the encoders that make the embeddings
(:mod:`.encoders`: DINOv2, CLIP, VGG19 and tiny untrained stand-ins)."""

from . import functional
from .classes import ImageSimilarity, SquaredCentroidDistance, StyleLoss, TextImageSimilarity, VendiScore
from .encoders import (
    CLIP,
    VGG19,
    DINOv2,
    ImageEmbedder,
    StyleFeatures,
    TextImageEmbedder,
    TinyCLIP,
    TinyDINOv2,
    TinyVGG19,
)
from .functional import (
    gram_matrices,
    image_similarity,
    squared_centroid_distance,
    style_loss,
    text_image_similarity,
    vendi_score,
)

__all__ = [
    "CLIP", "VGG19", "DINOv2", "ImageEmbedder", "ImageSimilarity", "SquaredCentroidDistance", "StyleFeatures",
    "StyleLoss", "TextImageEmbedder", "TextImageSimilarity", "TinyCLIP", "TinyDINOv2", "TinyVGG19", "VendiScore",
    "functional", "gram_matrices", "image_similarity", "squared_centroid_distance", "style_loss",
    "text_image_similarity", "vendi_score",
]
