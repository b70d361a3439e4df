"""The paper's evaluation metrics (DESIGN §6) as torchmetrics ``Metric`` classes, over precomputed embeddings.

Each class accumulates per-process states that torchmetrics reduces across DDP processes, so updating with
the data in chunks, or spread over processes, gives the value of one update with all of it. The math lives in
:mod:`lycoflow.metrics.functional`; the classes only decide what to accumulate.

- fidelity: :class:`ImageSimilarity`, :class:`SquaredCentroidDistance` (generated vs data set images, DINOv2
  in the paper);
- controllability: :class:`TextImageSimilarity` (image vs its prompt, CLIP);
- diversity: :class:`VendiScore` (generated images, grouped by prompt, DINOv2);
- base-model preservation: :class:`StyleLoss` (Gram matrices of fine-tuned vs base images, VGG19).

Use ``update`` and ``compute`` (not ``forward``): the fidelity metrics compare two sets, so a single batch
has no value of its own.

Under DDP a process may see no data at all (e.g. fewer prompts than processes): ``compute`` still gives the
value over everything the other processes saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lycoflow.metrics.functional import (
    check_rows,
    gram_distances,
    normalized_rows,
    paired_cosines,
    vendi_score,
)

# Dtypes a state may have, by the index that _gather_allowing_empty sends in place of the dtype.
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)
# Most dims a gathered state may have (ours have at most 2).
_MAX_DIMS = 8


def _gather_allowing_empty(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """torchmetrics' ``gather_all_tensors``, also for list states that some processes never appended to.

    torchmetrics sends such a state as a 1-D empty tensor of the metric's default dtype. When the other
    processes hold rows ``[k, d]``, or another dtype, the plain gather fails, or aborts the process group. So
    every process first learns the layout of the tensors of the processes that have data, and an empty tensor
    is sent as ``[0, *their trailing dims]`` in their dtype, which concatenates as nothing.

    Args:
        tensor: This process's state (list states arrive here already concatenated).
        group: The process group; None for the whole world.

    Returns:
        Every process's tensor, by rank.
    """
    # [has data, dtype index, ndim, trailing dims...]
    layout = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64, device=tensor.device)
    if tensor.numel():
        layout[:3] = torch.tensor([1, DTYPES.index(tensor.dtype), tensor.ndim])
        layout[3 : 3 + max(tensor.ndim - 1, 0)] = torch.tensor(tensor.shape[1:], dtype=torch.int64)
    layouts = [torch.zeros_like(layout) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(layouts, layout, group=group)
    holders = [other.tolist() for other in layouts if other[0]]
    if not tensor.numel() and holders:
        _, dtype_index, ndim = holders[0][:3]
        trailing = holders[0][3 : 3 + max(ndim - 1, 0)]
        tensor = torch.zeros((0, *trailing), dtype=DTYPES[dtype_index], device=tensor.device)
    return gather_all_tensors(tensor, group)


def _empty_error(metric: Metric, what: str) -> RuntimeError:
    """The error of ``compute`` before any ``what`` was given to ``update``."""
    return RuntimeError(f"{type(metric).__name__}.compute: no {what} yet; call update() with some first")


class _Centroids(Metric):
    """Sums of the L2-normalised generated and reference embeddings, and their counts: all the two fidelity
    metrics need, since both are functions of the two centroids ``mean(ĝ)`` and ``mean(r̂)``."""

    is_differentiable = False
    full_state_update = False
    generated_sums: list[Tensor] | Tensor
    generated_count: Tensor
    reference_sums: list[Tensor] | Tensor
    reference_count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Create empty states.

        Args:
            **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).
        """
        kwargs.setdefault("dist_sync_fn", _gather_allowing_empty)
        super().__init__(**kwargs)
        # The sums are lists of per-update partial sums [1, d], added up in compute, rather than one summed vector:
        # d is unknown until the first update, and a process that never saw one side could not give a vector of
        # the right shape to a sum-reduced DDP sync (list states it can leave empty). Float64 so that many chunks
        # add up to the one-update value, to rounding.
        self.add_state("generated_sums", [], dist_reduce_fx="cat")
        self.add_state("generated_count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("reference_sums", [], dist_reduce_fx="cat")
        self.add_state("reference_count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, embeddings: Tensor, real: bool) -> None:
        """Add embeddings of one side.

        Args:
            embeddings: ``[n, d]`` image embeddings.
            real: True for the data set's (reference) images, False for generated ones.

        Raises:
            ValueError: If ``embeddings`` is not a non-empty ``[n, d]`` matrix, or its ``d`` differs from
                earlier updates'.
        """
        name = type(self).__name__
        check_rows(f"{name}.update", "embeddings", embeddings)
        side = "reference" if real else "generated"
        sums: list[Tensor] = getattr(self, f"{side}_sums")
        if sums and sums[0].shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"{name}.update: embeddings have dimension {embeddings.shape[1]} but earlier {side} embeddings had "
                f"{sums[0].shape[1]}"
            )
        sums.append(normalized_rows(embeddings.detach()).sum(0, keepdim=True))
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + embeddings.shape[0])

    def _centroids(self) -> tuple[Tensor, Tensor]:
        """``mean(ĝ)`` and ``mean(r̂)`` in float64.

        Raises:
            RuntimeError: If either side has no embeddings yet.
            ValueError: If the two sides' widths differ.
        """
        for side in ("generated", "reference"):
            if getattr(self, f"{side}_count") == 0:
                raise _empty_error(self, f"{side} embeddings (update(..., real={side == 'reference'}))")
        generated = dim_zero_cat(self.generated_sums).sum(0) / self.generated_count
        reference = dim_zero_cat(self.reference_sums).sum(0) / self.reference_count
        if generated.shape != reference.shape:
            raise ValueError(
                f"{type(self).__name__}.compute: generated embeddings have dimension {generated.shape[0]} but "
                f"reference embeddings have {reference.shape[0]}; both must come from the same encoder"
            )
        return generated, reference


class ImageSimilarity(_Centroids):
    """Fidelity: mean cosine similarity over all pairs of a generated image and a data set image.

    ``mean_{i,j} ĝ_i · r̂_j = mean(ĝ) · mean(r̂)``, with ``ĝ`` and ``r̂`` the L2-normalised embeddings (DINOv2 in
    the paper) of generated and reference images. Higher means the generated images look more like the
    concept's training images.

    ``update(embeddings, real)`` takes ``[n, d]`` embeddings and whether they are of the data set's images
    (True) or of generated ones (False); ``compute()`` returns a float32 scalar in [-1, 1].
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        """``mean(ĝ) · mean(r̂)``.

        Raises:
            RuntimeError: If either side has no embeddings yet.
        """
        generated, reference = self._centroids()
        return (generated @ reference).float()


class SquaredCentroidDistance(_Centroids):
    """Fidelity: squared distance between the centroids of generated and data set images.

    ``‖mean(ĝ) − mean(r̂)‖²``, with ``ĝ`` and ``r̂`` the L2-normalised embeddings (DINOv2 in the paper) of
    generated and reference images. Lower means the generated images are centred on the concept.

    ``update(embeddings, real)`` takes ``[n, d]`` embeddings and whether they are of the data set's images
    (True) or of generated ones (False); ``compute()`` returns a float32 scalar in [0, 4].
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        """``‖mean(ĝ) − mean(r̂)‖²``.

        Raises:
            RuntimeError: If either side has no embeddings yet.
        """
        generated, reference = self._centroids()
        difference = generated - reference
        return (difference @ difference).float()


class TextImageSimilarity(Metric):
    """Controllability: mean cosine similarity between each generated image and the prompt it came from.

    ``mean_i cos(image_i, text_i)`` over CLIP image embeddings and CLIP text embeddings of their prompts (in
    the paper, with the concept's trigger replaced by the class's evaluation text). Higher means the images
    follow their prompts more closely.

    ``update(image, text)`` takes ``[n, d]`` image embeddings and the ``[n, d]`` embeddings of their prompts,
    row by row; ``compute()`` returns a float32 scalar in [-1, 1].
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    cosine_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Create empty states.

        Args:
            **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).
        """
        super().__init__(**kwargs)
        self.add_state("cosine_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, image: Tensor, text: Tensor) -> None:
        """Add image embeddings and the embeddings of their prompts.

        Args:
            image: ``[n, d]`` image embeddings.
            text: ``[n, d]`` text embeddings; row ``i`` is image ``i``'s prompt.

        Raises:
            ValueError: If the inputs are not non-empty ``[n, d]`` matrices of the same shape.
        """
        cosines = paired_cosines(image.detach(), text.detach())
        self.cosine_sum = self.cosine_sum + cosines.sum()
        self.count = self.count + cosines.shape[0]

    def compute(self) -> Tensor:
        """The mean cosine similarity.

        Raises:
            RuntimeError: If no embeddings were given yet.
        """
        if self.count == 0:
            raise _empty_error(self, "embeddings")
        return (self.cosine_sum / self.count).float()


class VendiScore(Metric):
    """Diversity: Vendi score of the images generated from each prompt, averaged over prompts.

    For the ``n`` images of one prompt, with ``X̂`` their L2-normalised embeddings (DINOv2 in the paper) and
    ``λ`` the eigenvalues of ``X̂X̂ᵀ / n``, the score of order ``q`` is ``exp(−Σ λ log λ)`` for ``q = 1``,
    ``1 / max λ`` for ``q = inf`` and ``(Σ λ^q)^(1/(1−q))`` otherwise: the effective number of distinct images,
    from 1 (all alike) to ``n``. Higher means more varied outputs for the same prompt.

    ``update(embeddings, prompt_ids)`` takes ``[n, d]`` embeddings and the ``[n]`` integer id of the prompt each
    image came from (ids are arbitrary, e.g. indices into a prompt list; rows of one id may arrive over several
    updates or processes); ``compute()`` returns a float32 scalar.

    The embeddings are kept until ``reset``: the score of a prompt needs all its images together.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    embeddings: list[Tensor] | Tensor
    prompt_ids: list[Tensor] | Tensor

    def __init__(self, q: float = 1.0, **kwargs: Any) -> None:
        """Create empty states.

        Args:
            q: Order of the score, ``>= 0`` or ``math.inf``; the paper uses 1.
            **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).

        Raises:
            ValueError: If ``q`` is negative or NaN.
        """
        kwargs.setdefault("dist_sync_fn", _gather_allowing_empty)
        super().__init__(**kwargs)
        if not q >= 0:  # also rejects NaN
            raise ValueError(f"VendiScore: q={q}, expected q >= 0")
        self.q = q
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("prompt_ids", [], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, prompt_ids: Tensor) -> None:
        """Add embeddings of generated images and the prompts they came from.

        Args:
            embeddings: ``[n, d]`` image embeddings.
            prompt_ids: ``[n]`` integer prompt ids.

        Raises:
            ValueError: If ``embeddings`` is not a non-empty ``[n, d]`` matrix, ``prompt_ids`` is not an
                integer vector of length ``n``, or ``d`` differs from earlier updates'.
        """
        check_rows("VendiScore.update", "embeddings", embeddings)
        if prompt_ids.ndim != 1 or prompt_ids.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"VendiScore.update: prompt_ids has shape {tuple(prompt_ids.shape)}, expected "
                f"[{embeddings.shape[0]}] (one id per embedding)"
            )
        if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
            raise ValueError(f"VendiScore.update: prompt_ids has dtype {prompt_ids.dtype}, expected an integer dtype")
        if self.embeddings and self.embeddings[0].shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"VendiScore.update: embeddings have dimension {embeddings.shape[1]} but earlier ones had "
                f"{self.embeddings[0].shape[1]}"
            )
        # At least float32, so every update (and every process) stores one dtype and the states concatenate.
        self.embeddings.append(embeddings.detach().to(torch.promote_types(embeddings.dtype, torch.float32)))
        self.prompt_ids.append(prompt_ids.detach().to(torch.int64))

    def compute(self) -> Tensor:
        """The mean over prompts of the Vendi score of each prompt's images.

        Raises:
            RuntimeError: If no embeddings were given yet.
        """
        # Lists of updates, or after a DDP sync one tensor each (empty if no process had any).
        updates = self.prompt_ids if isinstance(self.prompt_ids, list) else [self.prompt_ids]
        if not sum(ids.numel() for ids in updates):
            raise _empty_error(self, "embeddings")
        # float64 embeddings make the per-prompt scores float64 too, so their mean is not rounded twice.
        embeddings = dim_zero_cat(self.embeddings).to(torch.float64)
        prompt_ids = dim_zero_cat(self.prompt_ids)
        scores = [vendi_score(embeddings[prompt_ids == prompt], self.q) for prompt in prompt_ids.unique()]
        return torch.stack(scores).mean().float()


class StyleLoss(Metric):
    """Base-model preservation: how far fine-tuning moved the style of images away from the base model's.

    ``mean_i Σ (G_ft,i − G_base,i)²`` over pairs of images generated by the fine-tuned and the base model from
    the same prompt and seed, with ``G`` the images' Gram matrices (VGG19 conv1_1…conv5_1 before ReLU in the
    paper, from :func:`~lycoflow.metrics.functional.gram_matrices`). Lower means the base model's behaviour is
    better preserved.

    ``update(gram_generated, gram_base)`` takes the ``[b, k]`` Gram rows of the fine-tuned model's images and
    of the paired base-model images, in the same order; ``compute()`` returns a float32 scalar >= 0.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    loss_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Create empty states.

        Args:
            **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).
        """
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, gram_generated: Tensor, gram_base: Tensor) -> None:
        """Add the Gram matrices of paired images.

        Args:
            gram_generated: ``[b, k]`` Gram rows of the fine-tuned model's images.
            gram_base: ``[b, k]`` Gram rows of the base model's images from the same prompts and seeds.

        Raises:
            ValueError: If the inputs are not non-empty ``[b, k]`` matrices of the same shape.
        """
        distances = gram_distances(gram_generated.detach(), gram_base.detach())
        self.loss_sum = self.loss_sum + distances.sum()
        self.count = self.count + distances.shape[0]

    def compute(self) -> Tensor:
        """The mean per-image style loss.

        Raises:
            RuntimeError: If no Gram matrices were given yet.
        """
        if self.count == 0:
            raise _empty_error(self, "Gram matrices")
        return (self.loss_sum / self.count).float()
