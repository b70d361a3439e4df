"""The paper's evaluation metrics (§4.2) as functions of embeddings, in the style of torchmetrics' functional API.

Each function takes embeddings already computed by an encoder (DINOv2 for fidelity and diversity, CLIP for
controllability, VGG19 feature maps for base-model preservation) and returns a 0-dim tensor, except
:func:`gram_matrices`, which turns feature maps into the per-image vectors that :func:`style_loss` compares.

Reductions run in float64: the metrics are means over many pairs or eigenvalues of a kernel, and the values of
checkpoints that the analysis ranks against each other can differ only in the third or fourth decimal. Results
come back in the input's floating dtype promoted to at least float32 (so float16/bfloat16 embeddings give
float32, float64 embeddings float64).

Rows that are all zeros have no direction: L2 normalisation leaves them at zero, so they count as cosine 0
against everything (and add nothing to a Vendi kernel's trace).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gram_distances",
    "gram_matrices",
    "image_similarity",
    "normalized_rows",
    "paired_cosines",
    "squared_centroid_distance",
    "style_loss",
    "text_image_similarity",
    "vendi_score",
]


def _result_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a metric computed from ``x``: its floating dtype, at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def check_rows(name: str, argument: str, x: Tensor, layout: str = "[n, d]") -> None:
    """Raise unless ``x`` is a non-empty matrix (``layout`` names its dims in the message)."""
    if x.ndim != 2:
        raise ValueError(f"{name}: {argument} has {x.ndim} dims, expected {layout}")
    if x.numel() == 0:
        raise ValueError(f"{name}: {argument} is empty (shape {tuple(x.shape)}), expected {layout} with no zero dim")


def _check_same_width(name: str, a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    """Raise unless two ``[n, d]`` matrices have the same ``d``."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name}: {a_name} has dimension {a.shape[1]} but {b_name} has {b.shape[1]}; "
            "both must come from the same encoder"
        )


def normalized_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` scaled to unit L2 norm, in float64 (zero rows stay zero)."""
    return F.normalize(x.to(torch.float64), dim=1)


def image_similarity(generated: Tensor, reference: Tensor) -> Tensor:
    """Mean cosine similarity over all (generated, reference) pairs — the paper's fidelity "image similarity".

    The mean of ``ĝ_i · r̂_j`` over all ``n·m`` pairs factorises into ``mean(ĝ) · mean(r̂)``, so it costs
    ``O((n + m)·d)`` instead of building the ``n × m`` similarity matrix.

    Args:
        generated: Embeddings ``[n, d]`` of generated images.
        reference: Embeddings ``[m, d]`` of the data set's images, from the same encoder.

    Returns:
        A 0-dim tensor in [-1, 1]; 1 when every embedding points the same way.

    Raises:
        ValueError: If an input is not a non-empty ``[n, d]`` matrix, or their ``d`` differ.
    """
    check_rows("image_similarity", "generated", generated)
    check_rows("image_similarity", "reference", reference)
    _check_same_width("image_similarity", "generated", generated, "reference", reference)
    value = normalized_rows(generated).mean(0) @ normalized_rows(reference).mean(0)
    return value.to(_result_dtype(generated))


def squared_centroid_distance(generated: Tensor, reference: Tensor) -> Tensor:
    """Squared distance between the centroids of L2-normalised embeddings: ``‖mean(ĝ) − mean(r̂)‖²`` (fidelity).

    Args:
        generated: Embeddings ``[n, d]`` of generated images.
        reference: Embeddings ``[m, d]`` of the data set's images, from the same encoder.

    Returns:
        A 0-dim tensor in [0, 4]; 0 when both sets have the same centroid.

    Raises:
        ValueError: If an input is not a non-empty ``[n, d]`` matrix, or their ``d`` differ.
    """
    check_rows("squared_centroid_distance", "generated", generated)
    check_rows("squared_centroid_distance", "reference", reference)
    _check_same_width("squared_centroid_distance", "generated", generated, "reference", reference)
    difference = normalized_rows(generated).mean(0) - normalized_rows(reference).mean(0)
    return (difference @ difference).to(_result_dtype(generated))


def paired_cosines(image: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of row ``i`` of ``image`` and row ``i`` of ``text``, for every ``i``, in float64.

    Args:
        image: Image embeddings ``[n, d]``.
        text: Text embeddings ``[n, d]``.

    Returns:
        ``[n]`` cosines (the terms that :func:`text_image_similarity` averages).

    Raises:
        ValueError: If an input is not a non-empty ``[n, d]`` matrix, or the shapes differ.
    """
    check_rows("text_image_similarity", "image", image)
    check_rows("text_image_similarity", "text", text)
    if image.shape != text.shape:
        raise ValueError(
            f"text_image_similarity: image has shape {tuple(image.shape)} but text has {tuple(text.shape)}; "
            "expected one text embedding per image, from the same encoder"
        )
    return (normalized_rows(image) * normalized_rows(text)).sum(1)


def text_image_similarity(image: Tensor, text: Tensor) -> Tensor:
    """Mean cosine similarity between each image embedding and the embedding of its own prompt (controllability).

    Args:
        image: CLIP image embeddings ``[n, d]``.
        text: CLIP text embeddings ``[n, d]``; row ``i`` is the prompt that image ``i`` was generated from.

    Returns:
        A 0-dim tensor in [-1, 1].

    Raises:
        ValueError: If an input is not a non-empty ``[n, d]`` matrix, or the shapes differ.
    """
    return paired_cosines(image, text).mean().to(_result_dtype(image))


def vendi_score(x: Tensor, q: float = 1.0) -> Tensor:
    """Vendi score of order ``q``: the effective number of distinct embeddings among the rows of ``x`` (diversity).

    With ``X̂`` the L2-normalised rows and ``λ`` the eigenvalues of the cosine kernel ``X̂X̂ᵀ / n`` (they sum to
    1), the score is the exponential of the Rényi entropy of order ``q`` of ``λ``:

    - ``q = 1``: ``exp(−Σ λ log λ)`` (the paper's choice);
    - ``q = inf``: ``1 / max λ``;
    - otherwise: ``(Σ λ^q)^(1 / (1 − q))``.

    ``n`` mutually orthogonal embeddings score ``n``, one embedding repeated any number of times scores 1.

    Args:
        x: Embeddings ``[n, d]``, e.g. of the images generated from one prompt.
        q: Order of the entropy, ``>= 0`` (``math.inf`` allowed). Small ``q`` weighs rare directions more.

    Returns:
        A 0-dim tensor in [1, min(n, d)] when no row is zero (0 if every row is).

    Raises:
        ValueError: If ``x`` is not a non-empty ``[n, d]`` matrix or ``q`` is negative or NaN.
    """
    check_rows("vendi_score", "x", x)
    if not q >= 0:  # also rejects NaN
        raise ValueError(f"vendi_score: q={q}, expected q >= 0")
    rows = normalized_rows(x)
    n, d = rows.shape
    # X̂X̂ᵀ and X̂ᵀX̂ share their nonzero eigenvalues, so decompose whichever is smaller.
    kernel = rows.T @ rows if d < n else rows @ rows.T
    eigenvalues = torch.linalg.eigvalsh(kernel / n)
    # Eigenvalues of a rank-deficient kernel come back as ±(rounding noise); below eigvalsh's accuracy (relative
    # to the largest, as in matrix_rank's default tolerance) they are zeros, and must not count for small q.
    tolerance = eigenvalues.max().clamp_min(0) * kernel.shape[0] * torch.finfo(torch.float64).eps
    eigenvalues = eigenvalues[eigenvalues > tolerance]
    if eigenvalues.numel() == 0:
        return torch.zeros((), dtype=_result_dtype(x), device=x.device)
    if q == 1:
        score = torch.exp(-(eigenvalues * eigenvalues.log()).sum())
    elif math.isinf(q):
        score = 1 / eigenvalues.max()
    else:
        score = eigenvalues.pow(q).sum().pow(1 / (1 - q))
    return score.to(_result_dtype(x))


def gram_matrices(feature_maps: list[Tensor]) -> Tensor:
    """Per-image Gram matrices of feature maps, flattened and concatenated: the style representation of
    :func:`style_loss`.

    Each map ``F`` of shape ``[b, C, H, W]`` is reshaped to ``[b, C, H·W]`` and divided by ``√(C·H·W)`` (the
    paper's normalisation, which keeps the layers' Gram entries on comparable scales), and ``G = F Fᵀ`` is its
    ``[b, C, C]`` Gram matrix.

    The products run in the maps' dtype promoted to at least float32, not float64: VGG's early maps are large
    (64 channels over every pixel), float32 accumulation is accurate enough for them, and :func:`style_loss`
    does its own reduction in float64.

    Args:
        feature_maps: Feature maps ``[b, C_k, H_k, W_k]`` of the same ``b`` images, e.g. VGG19's conv1_1…conv5_1
            outputs before ReLU.

    Returns:
        ``[b, Σ_k C_k²]``: row ``i`` holds image ``i``'s Gram matrices, row-major, in the order of the list.

    Raises:
        ValueError: If the list is empty, a map is not 4-dim or is empty, or the batch sizes differ.
    """
    if not feature_maps:
        raise ValueError("gram_matrices: no feature maps given")
    for k, fmap in enumerate(feature_maps):
        if fmap.ndim != 4:
            raise ValueError(f"gram_matrices: feature map {k} has {fmap.ndim} dims, expected [b, c, h, w]")
        if fmap.numel() == 0:
            raise ValueError(f"gram_matrices: feature map {k} is empty (shape {tuple(fmap.shape)})")
        if fmap.shape[0] != feature_maps[0].shape[0]:
            raise ValueError(
                f"gram_matrices: feature map {k} has batch size {fmap.shape[0]} "
                f"but feature map 0 has {feature_maps[0].shape[0]}"
            )
    grams = []
    for fmap in feature_maps:
        b, c, h, w = fmap.shape
        flat = fmap.to(_result_dtype(fmap)).reshape(b, c, h * w) / math.sqrt(c * h * w)
        grams.append((flat @ flat.transpose(1, 2)).reshape(b, c * c))
    return torch.cat(grams, dim=1)


def gram_distances(gram_a: Tensor, gram_b: Tensor) -> Tensor:
    """Squared Euclidean distance between the Gram rows of each pair of images, in float64.

    Args:
        gram_a: ``[b, k]`` from :func:`gram_matrices`.
        gram_b: ``[b, k]`` of the paired images, in the same order.

    Returns:
        ``[b]`` distances (the terms that :func:`style_loss` averages).

    Raises:
        ValueError: If an input is not a non-empty ``[b, k]`` matrix or the shapes differ.
    """
    check_rows("style_loss", "gram_a", gram_a, "[b, k]")
    check_rows("style_loss", "gram_b", gram_b, "[b, k]")
    if gram_a.shape != gram_b.shape:
        raise ValueError(
            f"style_loss: gram_a has shape {tuple(gram_a.shape)} but gram_b has {tuple(gram_b.shape)}; "
            "expected the Gram matrices of paired images from the same feature layers"
        )
    return (gram_a.to(torch.float64) - gram_b.to(torch.float64)).square().sum(1)


def style_loss(gram_a: Tensor, gram_b: Tensor) -> Tensor:
    """Mean over images of the squared Euclidean distance between their Gram matrices (base-model preservation).

    The paper compares images of the fine-tuned and the base model generated from the same prompt and seed:
    a small loss means fine-tuning left the base model's style for that prompt intact.

    Args:
        gram_a: ``[b, k]`` from :func:`gram_matrices`, e.g. of the fine-tuned model's images.
        gram_b: ``[b, k]`` of the paired images, in the same order.

    Returns:
        A 0-dim tensor ``mean_i Σ_j (gram_a[i, j] − gram_b[i, j])²``, >= 0.

    Raises:
        ValueError: If an input is not a non-empty ``[b, k]`` matrix or the shapes differ.
    """
    return gram_distances(gram_a, gram_b).mean().to(_result_dtype(gram_a))
