"""The metrics of the paper's evaluation (§4.2), one row each: what evaluation writes and analysis ranks.

Kept free of torch, so that ``lycoflow analyze`` reads it without loading the models' stack. A new metric is one
row here and its computation in `lycoflow.evaluation`; the analysis ranks it by this row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Criterion = Literal["fidelity", "controllability", "diversity", "preservation"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name in ``metrics.csv``, the criterion it measures and its direction."""

    name: str
    criterion: Criterion
    higher_is_better: bool
    definition: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("image_similarity", "fidelity", True,
               "mean cosine over all (generated, dataset image) pairs of DINOv2 embeddings"),
    MetricSpec("squared_centroid_distance", "fidelity", False,
               "squared distance between the means of the L2-normalised DINOv2 embeddings of the generated and of "
               "the dataset images"),
    MetricSpec("text_image_similarity", "controllability", True,
               "CLIP cosine of each image and its prompt, the trigger replaced by the class's evaluation text"),
    MetricSpec("vendi_score", "diversity", True,
               "exp(entropy of the eigenvalues of K/n), K the cosine kernel of the DINOv2 embeddings of one "
               "prompt's images; averaged over prompts"),
    MetricSpec("style_loss", "preservation", False,
               "sum of squared differences of VGG19 Gram matrices against the base model's image of the same prompt "
               "and seed"),
)

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}

#: The paper's criteria, in its order, with the metrics that measure each.
CRITERIA: dict[str, tuple[str, ...]] = {
    criterion: tuple(spec.name for spec in METRICS if spec.criterion == criterion)
    for criterion in ("fidelity", "controllability", "diversity", "preservation")
}

#: The columns of ``metrics.csv``: one row per (checkpoint, concept, prompt type, metric); ``protocol`` names the
#: evaluation protocol that measured it (files written before it have no such column).
COLUMNS = ("run", "config", "protocol", "seed", "epoch", "step", "category", "class", "subclass", "prompt_type",
           "metric", "value")
