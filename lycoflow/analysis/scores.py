"""Rank scores and what is averaged from them (paper §5.3).

Every metric value becomes a score in [0, 1] by its rank among all checkpoints (every configuration, seed and
epoch) measured on the same (category, class, subclass, prompt type, metric): ``(rank - 1) / (n - 1)``, rank 1 the
worst, tied values sharing their average rank, the order reversed for the metrics where lower is better (by
`lycoflow.metrics.specs`) so that 1 is always best. A value alone in its group (n = 1) scores 1/2: it is neither
better nor worse than anything, and the midpoint keeps it neutral in the averages. The scores are then averaged
over the seeds and the concepts ((class, subclass) pairs, each counting once) of each category.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from fractions import Fraction

import numpy as np

from lycoflow.metrics.specs import BY_NAME

from .runs import Checkpoint, ConceptKey, Config, Row

#: (config, epoch, category, prompt type, metric): the key of a `category_scores` score, a line of scores.csv.
ScoreKey = tuple[str, int, str, str, str]


def is_lower_better(metric: str) -> bool:
    """Whether a lower value of ``metric`` is the better one; a metric outside the table ranks as higher-is-better."""
    spec = BY_NAME.get(metric)
    return spec is not None and not spec.higher_is_better


def rank_scores(values: Sequence[float], lower_is_better: bool = False) -> list[Fraction]:
    """The score of each value by its rank among ``values``: (rank − 1)/(n − 1), rank 1 the worst.

    Tied values share their average rank; a lone value scores 1/2 (neither better nor worse than anything).
    """
    n = len(values)
    if n == 1:
        return [Fraction(1, 2)]
    # Worst first: ascending values, or descending where lower is better.
    order = sorted(range(n), key=lambda i: -values[i] if lower_is_better else values[i])
    scores = [Fraction(0)] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        # Positions start..end (from 0) hold ranks start+1..end+1, whose average minus one is (start+end)/2.
        for i in order[start:end + 1]:
            scores[i] = Fraction(start + end, 2 * (n - 1))
        start = end + 1
    return scores


def score_rows(rows: Sequence[Row]) -> list[Fraction]:
    """The rank score of every row among the rows of the same (category, class, subclass, prompt type, metric)."""
    groups: dict[tuple[str, ConceptKey, str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.category, row.concept, row.prompt_type, row.metric), []).append(i)
    scores = [Fraction(0)] * len(rows)
    for (_, _, _, metric), members in groups.items():
        for i, score in zip(members, rank_scores([rows[i].value for i in members], is_lower_better(metric))):
            scores[i] = score
    return scores


def category_scores(rows: Sequence[Row], scores: Sequence[Fraction]) -> dict[ScoreKey, Fraction]:
    """(config, epoch, category, prompt type, metric) → the mean score over its seeds and concepts."""
    groups: dict[ScoreKey, list[Fraction]] = {}
    for row, score in zip(rows, scores):
        groups.setdefault((row.config, row.checkpoint[2], row.category, row.prompt_type, row.metric),
                          []).append(score)
    return {key: sum(values, Fraction(0)) / len(values) for key, values in sorted(groups.items())}


def unit_scores(rows: Sequence[Row], scores: Sequence[float], metrics: Collection[str],
                prompt_types: Collection[str] | None) -> dict[str, dict[tuple[Checkpoint, ConceptKey], float]]:
    """category → (checkpoint, concept) → the mean score over ``metrics`` and ``prompt_types`` (None: all): the
    units whose spread gives the plots' standard errors and whose means are the SHAP targets."""
    groups: dict[str, dict[tuple[Checkpoint, ConceptKey], list[float]]] = {}
    for row, score in zip(rows, scores):
        if row.metric in metrics and (prompt_types is None or row.prompt_type in prompt_types):
            groups.setdefault(row.category, {}).setdefault((row.checkpoint, row.concept), []).append(score)
    return {category: {key: float(np.mean(values)) for key, values in units.items()}
            for category, units in groups.items()}


def ranking(table: dict[ScoreKey, Fraction], configs: dict[str, Config], metrics: Collection[str],
            prompt_types: Collection[str] | None) -> tuple[list[str], list[list[object]]]:
    """The configurations ranked by their mean score over ``metrics`` (paper's ranking table).

    Returns:
        The categories (columns) and the rows ``[rank, config, label, per category…, mean]``, best first; a
        category a configuration was not measured on is None.
    """
    cells: dict[tuple[str, str], list[Fraction]] = {}
    for (config, _, category, prompt_type, metric), score in table.items():
        if metric in metrics and (prompt_types is None or prompt_type in prompt_types):
            cells.setdefault((config, category), []).append(score)
    categories = sorted({category for _, category in cells})
    lines = []
    for config in sorted({config for config, _ in cells}):
        means = [float(sum(cells[config, c]) / len(cells[config, c])) if (config, c) in cells else None
                 for c in categories]
        known = [m for m in means if m is not None]
        lines.append([config, configs[config].label, *means, sum(known) / len(known)])
    lines.sort(key=lambda line: (-line[-1], line[1], line[0]))
    return categories, [[rank, *line] for rank, line in enumerate(lines, start=1)]
