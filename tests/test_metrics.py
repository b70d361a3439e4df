"""Evaluation metrics (paper §4.2): known answers, invariances and shape errors of the functional forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from lycoflow.metrics.functional import (
    gram_matrices,
    image_similarity,
    squared_centroid_distance,
    style_loss,
    text_image_similarity,
    vendi_score,
)

QS = [0.0, 0.5, 1.0, 2.0, math.inf]
# Two unit vectors at 60°: kernel [[1, ½], [½, 1]] / 2 has eigenvalues ¾ and ¼.
SIXTY = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
SIXTY_VENDI = {
    0.0: 2.0,  # number of nonzero eigenvalues
    0.5: (math.sqrt(0.75) + math.sqrt(0.25)) ** 2,
    1.0: math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
    2.0: 1 / (0.75**2 + 0.25**2),  # 1.6
    math.inf: 1 / 0.75,
}


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return value.ndim == 0 and abs(value.item() - expected) <= tol * max(1.0, abs(expected))


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n orthonormal rows in d dims (n <= d)."""
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.float()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- functional: known answers ---


def test_image_similarity_hand_computed():
    # cos((1,0),(0,1)) = 0, cos((1,1),(0,1)) = 1/√2.
    assert close(image_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0]])), 1 / (2 * 2**0.5))
    # Every pair at 45°.
    assert close(image_similarity(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 3.0]])), 2**-0.5)


def test_image_similarity_is_mean_over_all_pairs():
    generated, reference = randn(7, 5, seed=1), randn(4, 5, seed=2)
    pairs = F.cosine_similarity(generated[:, None].double(), reference[None].double(), dim=-1)
    assert close(image_similarity(generated, reference), pairs.mean().item())


def test_identical_sets():
    x = randn(6, 8)
    assert close(squared_centroid_distance(x, x), 0.0)
    assert close(text_image_similarity(x, x), 1.0)
    # Mean cosine over all pairs is 1 only when every embedding points the same way.
    same_direction = torch.tensor([[1.0, 2.0]]) * torch.tensor([[0.5], [1.0], [4.0]])
    assert close(image_similarity(same_direction, same_direction), 1.0)
    grams = gram_matrices([randn(3, 4, 5, 5)])
    assert close(style_loss(grams, grams), 0.0)


def test_squared_centroid_distance_hand_computed():
    assert close(squared_centroid_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])), 2.0)
    # Normalised generated rows (1,0), (0,1): centroid (½,½); reference (-1,0): difference (1.5, 0.5).
    generated, reference = torch.tensor([[2.0, 0.0], [0.0, 5.0]]), torch.tensor([[-1.0, 0.0]])
    assert close(squared_centroid_distance(generated, reference), 2.5)


def test_text_image_similarity_hand_computed():
    image, text = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert close(text_image_similarity(image, text), (1 + 2**-0.5) / 2)
    # Row i goes with row i only: swapping the text rows changes the value.
    assert close(text_image_similarity(image, text.flip(0)), (0 + 2**-0.5) / 2)


@pytest.mark.parametrize("q", QS)
def test_vendi_sixty_degrees(q):
    assert close(vendi_score(SIXTY, q), SIXTY_VENDI[q])


@pytest.mark.parametrize("q", QS)
def test_vendi_orthonormal_is_n(q):
    assert close(vendi_score(orthonormal(5, 9), q), 5.0)
    assert close(vendi_score(torch.eye(3), q), 3.0)


@pytest.mark.parametrize("q", QS)
def test_vendi_repeated_embedding_is_one(q):
    x = randn(1, 6).repeat(10, 1) * torch.arange(1.0, 11.0)[:, None]
    assert close(vendi_score(x, q), 1.0)
    assert close(vendi_score(x[:1], q), 1.0)


@pytest.mark.parametrize("q", QS)
def test_vendi_more_rows_than_dims(q):
    # d < n takes the d×d kernel: 3 copies each of e1 and e2 give eigenvalues ½, ½.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1)
    assert close(vendi_score(x, q), 2.0)
    # Zero padding changes no cosine but makes d >= n: both kernels must agree.
    x = randn(10, 3)
    assert close(vendi_score(x, q), vendi_score(F.pad(x, (0, 17)), q).item())


def test_gram_matrices_hand_computed():
    # Channels (1, 2) and (3, 4) over a 1×2 map, divided by √(C·H·W) = 2.
    fmap = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    expected = torch.tensor([[1.25, 2.75, 2.75, 6.25]])
    torch.testing.assert_close(gram_matrices([fmap]), expected)
    # A second map (one channel of ones over 2×2, divided by 2) adds one entry: 4 · ¼.
    two_maps = gram_matrices([fmap, torch.ones(1, 1, 2, 2)])
    torch.testing.assert_close(two_maps, torch.tensor([[1.25, 2.75, 2.75, 6.25, 1.0]]))


def test_gram_matrices_per_image():
    maps = [randn(3, 4, 5, 6, seed=1), randn(3, 2, 3, 3, seed=2)]
    grams = gram_matrices(maps)
    assert grams.shape == (3, 16 + 4)
    torch.testing.assert_close(grams[1:2], gram_matrices([m[1:2] for m in maps]))


def test_style_loss_hand_computed():
    a, b = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert close(style_loss(a, b), (5 + 9) / 2)
    assert close(style_loss(b, a), 7.0)


def test_scale_invariance():
    g, r, t = randn(6, 5, seed=1), randn(4, 5, seed=2), randn(6, 5, seed=3)
    assert close(image_similarity(3 * g, r), image_similarity(g, r).item())
    assert close(squared_centroid_distance(g, 3 * r), squared_centroid_distance(g, r).item())
    assert close(text_image_similarity(3 * g, t), text_image_similarity(g, t).item())
    for q in QS:
        assert close(vendi_score(3 * g, q), vendi_score(g, q).item())


def test_zero_rows_count_as_cosine_zero():
    assert close(image_similarity(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])), 0.0)
    assert close(vendi_score(torch.zeros(3, 2)), 0.0)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)
def test_result_dtype(dtype, expected):
    x = randn(4, 3).to(dtype)
    grams = gram_matrices([x[None, None]])
    for value in (image_similarity(x, x), squared_centroid_distance(x, x), text_image_similarity(x, x),
                  vendi_score(x), style_loss(grams, grams)):
        assert value.dtype == expected and value.ndim == 0
    assert grams.dtype == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_similarity(torch.zeros(2, 3, 4), torch.ones(2, 4)), "image_similarity: generated has 3 dims"),
        (lambda: image_similarity(torch.ones(2, 4), torch.ones(4)), "image_similarity: reference has 1 dims"),
        (lambda: image_similarity(torch.ones(2, 4), torch.ones(2, 5)), "generated has dimension 4 but reference has 5"),
        (lambda: image_similarity(torch.ones(0, 4), torch.ones(2, 4)), "generated is empty"),
        (lambda: squared_centroid_distance(torch.ones(2, 3), torch.ones(2, 4)), "squared_centroid_distance:"),
        (lambda: text_image_similarity(torch.ones(2, 4), torch.ones(3, 4)), "image has shape \\(2, 4\\) but text"),
        (lambda: vendi_score(torch.ones(4)), "vendi_score: x has 1 dims"),
        (lambda: vendi_score(torch.ones(2, 0)), "vendi_score: x is empty"),
        (lambda: vendi_score(torch.ones(2, 2), q=-1), "q >= 0"),
        (lambda: vendi_score(torch.ones(2, 2), q=math.nan), "q >= 0"),
        (lambda: gram_matrices([]), "no feature maps"),
        (lambda: gram_matrices([torch.ones(1, 2, 3)]), "feature map 0 has 3 dims"),
        (lambda: gram_matrices([torch.ones(2, 1, 2, 2), torch.ones(3, 1, 2, 2)]), "feature map 1 has batch size 3"),
        (lambda: style_loss(torch.ones(2, 4), torch.ones(2, 5)), "style_loss: gram_a has shape"),
        (lambda: style_loss(torch.ones(2, 4, 1), torch.ones(2, 4)), "expected \\[b, k\\]"),
    ],
)
def test_shape_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
