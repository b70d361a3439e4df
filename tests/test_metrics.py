"""Evaluation metrics (DESIGN §6): known answers, invariances and shape errors of the functional forms; the
Metric classes against them, chunked, reset, and synced over two real gloo processes."""

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lycoflow.metrics import (
    ImageSimilarity,
    SquaredCentroidDistance,
    StyleLoss,
    TextImageSimilarity,
    VendiScore,
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


# --- Metric classes ---


def data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for every metric, 12 rows each, prompt ids not sorted so that chunks mix prompts."""
    return {
        "generated": randn(12, 8, seed=seed),
        "reference": randn(12, 8, seed=seed + 1) + 0.5,
        "image": randn(12, 8, seed=seed + 2),
        "text": randn(12, 8, seed=seed + 3),
        "prompt_ids": torch.tensor([3, 0, 1, 3, 0, 0, 1, 3, 3, 1, 0, 1]),
        "gram_generated": randn(12, 10, seed=seed + 4),
        "gram_base": randn(12, 10, seed=seed + 5),
    }


def metrics() -> dict[str, object]:
    return {
        "image_similarity": ImageSimilarity(),
        "centroid_distance": SquaredCentroidDistance(),
        "text_similarity": TextImageSimilarity(),
        "vendi": VendiScore(),
        "vendi_q2": VendiScore(q=2.0),
        "style_loss": StyleLoss(),
    }


def update_all(found: dict[str, object], d: dict[str, torch.Tensor], rows: slice) -> None:
    for name in ("image_similarity", "centroid_distance"):
        found[name].update(d["generated"][rows], real=False)
        found[name].update(d["reference"][rows], real=True)
    found["text_similarity"].update(d["image"][rows], d["text"][rows])
    found["vendi"].update(d["generated"][rows], d["prompt_ids"][rows])
    found["vendi_q2"].update(d["generated"][rows], d["prompt_ids"][rows])
    found["style_loss"].update(d["gram_generated"][rows], d["gram_base"][rows])


def functional_values(d: dict[str, torch.Tensor]) -> dict[str, float]:
    def per_prompt(q: float) -> float:
        ids = d["prompt_ids"]
        return sum(vendi_score(d["generated"][ids == p], q).item() for p in ids.unique()) / len(ids.unique())

    return {
        "image_similarity": image_similarity(d["generated"], d["reference"]).item(),
        "centroid_distance": squared_centroid_distance(d["generated"], d["reference"]).item(),
        "text_similarity": text_image_similarity(d["image"], d["text"]).item(),
        "vendi": per_prompt(1.0),
        "vendi_q2": per_prompt(2.0),
        "style_loss": style_loss(d["gram_generated"], d["gram_base"]).item(),
    }


def test_classes_equal_functional_and_chunks_equal_one_update():
    d = data()
    whole, chunked = metrics(), metrics()
    update_all(whole, d, slice(None))
    for rows in (slice(0, 5), slice(5, 7), slice(7, 12)):
        update_all(chunked, d, rows)
    for name, expected in functional_values(d).items():
        assert close(whole[name].compute(), expected), name
        assert close(chunked[name].compute(), expected), name
        assert whole[name].compute().dtype == torch.float32


# torchmetrics warns of compute() before update(), which is what this test does on purpose.
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_reset():
    first, second = data(0), data(10)
    found = metrics()
    update_all(found, first, slice(None))
    for metric in found.values():
        metric.compute()
        metric.reset()
        with pytest.raises(RuntimeError, match="compute: no"):
            metric.compute()
    update_all(found, second, slice(None))
    for name, expected in functional_values(second).items():
        assert close(found[name].compute(), expected), name


def test_vendi_score_averages_per_prompt():
    metric = VendiScore()
    metric.update(torch.eye(2), torch.tensor([0, 0]))  # two orthogonal images: 2
    metric.update(torch.ones(3, 2), torch.tensor([1, 1, 1]))  # one image three times: 1
    metric.update(SIXTY, torch.tensor([7, 7]))  # 60° pair
    assert close(metric.compute(), (2 + 1 + SIXTY_VENDI[1.0]) / 3)
    # Rows of one prompt may come in any order, over several updates.
    metric = VendiScore(q=math.inf)
    metric.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([5, 2]))
    metric.update(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), torch.tensor([5, 2]))
    assert close(metric.compute(), 2.0)


def test_fidelity_needs_both_sides():
    for metric in (ImageSimilarity(), SquaredCentroidDistance()):
        metric.update(randn(3, 4), real=False)
        with pytest.raises(RuntimeError, match="no reference embeddings"):
            metric.compute()
        with pytest.raises(ValueError, match="dimension 5 but earlier generated embeddings had 4"):
            metric.update(randn(3, 5), real=False)
        metric.update(randn(3, 5), real=True)
        with pytest.raises(ValueError, match="generated embeddings have dimension 4 but reference"):
            metric.compute()


def test_update_errors():
    with pytest.raises(ValueError, match="ImageSimilarity.update: embeddings has 1 dims"):
        ImageSimilarity().update(torch.ones(3), real=True)
    with pytest.raises(ValueError, match="one id per embedding"):
        VendiScore().update(torch.ones(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer dtype"):
        VendiScore().update(torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="q >= 0"):
        VendiScore(q=-0.5)
    with pytest.raises(ValueError, match="image has shape"):
        TextImageSimilarity().update(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="gram_a has shape"):
        StyleLoss().update(torch.ones(2, 3), torch.ones(2, 4))


def test_metric_attributes():
    better = {ImageSimilarity: True, SquaredCentroidDistance: False, TextImageSimilarity: True, VendiScore: True,
              StyleLoss: False}
    for cls, higher in better.items():
        assert cls.higher_is_better is higher
        assert cls.is_differentiable is False and cls.full_state_update is False


# --- DDP: two gloo processes on CPU ---


def _ddp_worker(rank: int, port: int, d: dict[str, torch.Tensor], out: Path) -> None:
    # A timeout so that a broken sync fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        found = metrics()
        update_all(found, d, slice(rank * 6, rank * 6 + 6))
        # A process that saw nothing (fewer prompts or references than processes) still syncs.
        lopsided = {"image_similarity_one_sided": ImageSimilarity(), "vendi_one_sided": VendiScore()}
        lopsided["image_similarity_one_sided"].update(d["generated"][rank * 6 : rank * 6 + 6], real=False)
        if rank == 0:
            lopsided["image_similarity_one_sided"].update(d["reference"], real=True)
            lopsided["vendi_one_sided"].update(d["generated"], d["prompt_ids"])
        values = {name: metric.compute().item() for name, metric in {**found, **lopsided}.items()}
        # After compute the states are this process's own again: updating on goes on from them.
        values["local_count"] = found["style_loss"].count.item()
        torch.save(values, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_equals_single_process(tmp_path):
    d = data()
    mp.spawn(_ddp_worker, args=(free_port(), d, tmp_path), nprocs=2, join=True)
    expected = functional_values(d)
    expected["image_similarity_one_sided"] = expected["image_similarity"]
    expected["vendi_one_sided"] = expected["vendi"]
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert values.pop("local_count") == 6
        assert values.keys() == expected.keys()
        for name, value in values.items():
            assert abs(value - expected[name]) <= 1e-6 * max(1.0, abs(expected[name])), (rank, name)
