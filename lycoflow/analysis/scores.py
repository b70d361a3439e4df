"""Rank scores and what is averaged from them (paper §5.3).

Every metric value becomes a score in [0, 1] by its rank among all checkpoints (every configuration, seed and
epoch) measured on the same (category, class, subclass, prompt type, metric): ``(rank - 1) / (n - 1)``, rank 1 the
worst, tied values sharing their average rank, the order reversed for the metrics where lower is better (by
`lycoflow.metrics.specs`) so that 1 is always best. A value alone in its group (n = 1) scores 1/2: it is neither
better nor worse than anything, and the midpoint keeps it neutral in the averages. The scores are then averaged
as the paper does: the subclasses of a class into the class first, then the classes and seeds into the category,
so that a class weighs the same whether it has one subclass, many or none.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from fractions import Fraction
from typing import TypeVar

import numpy as np

from lycoflow.metrics.specs import BY_NAME

from .runs import Checkpoint, ConceptKey, Config, Row

#: (config, epoch, category, prompt type, metric): the key of a `category_scores` score, a line of scores.csv.
ScoreKey = tuple[str, int, str, str, str]
#: (config, checkpoint, category, class, prompt type, metric): the key of a `class_scores` score.
ClassKey = tuple[str, Checkpoint, str, str, str, str]
#: A score: exact (Fraction) for the tables, float for the plots and SHAP targets.
Score = TypeVar("Score", Fraction, float)


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


def _mean(values: Sequence[Score]) -> Score:
    """The mean, exact for Fractions."""
    return sum(values[1:], values[0]) / len(values)


def class_scores(rows: Iterable[Row], scores: Iterable[Score]) -> dict[ClassKey, Score]:
    """(config, checkpoint, category, class, prompt type, metric) → the mean score over the class's subclasses:
    the paper's first averaging step, so that a class counts once however many subclasses it has."""
    groups: dict[ClassKey, list[Score]] = {}
    for row, score in zip(rows, scores):
        key = (row.config, row.checkpoint, row.category, row.concept[0], row.prompt_type, row.metric)
        groups.setdefault(key, []).append(score)
    return {key: _mean(values) for key, values in groups.items()}


def category_scores(rows: Sequence[Row], scores: Sequence[Fraction]) -> dict[ScoreKey, Fraction]:
    """(config, epoch, category, prompt type, metric) → the mean score over its seeds and classes, each class the
    mean of its subclasses (`class_scores`)."""
    groups: dict[ScoreKey, list[Fraction]] = {}
    for (config, checkpoint, category, _, prompt_type, metric), score in class_scores(rows, scores).items():
        groups.setdefault((config, checkpoint[2], category, prompt_type, metric), []).append(score)
    return {key: _mean(values) for key, values in sorted(groups.items())}


def unit_scores(rows: Sequence[Row], scores: Sequence[float], metrics: Collection[str],
                prompt_types: Collection[str] | None) -> dict[str, dict[tuple[Checkpoint, str], float]]:
    """category → (checkpoint, class) → the mean over ``metrics`` and ``prompt_types`` (None: all) of the class's
    score (`class_scores`, its subclasses averaged first): the units whose spread over seeds and classes gives the
    plots' standard errors and whose means are the SHAP targets."""
    chosen = [i for i, row in enumerate(rows)
              if row.metric in metrics and (prompt_types is None or row.prompt_type in prompt_types)]
    means = class_scores([rows[i] for i in chosen], [scores[i] for i in chosen])
    groups: dict[str, dict[tuple[Checkpoint, str], list[float]]] = {}
    for (_, checkpoint, category, cls, _, _), score in means.items():
        groups.setdefault(category, {}).setdefault((checkpoint, cls), []).append(score)
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
