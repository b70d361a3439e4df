"""The analysis of evaluated runs (paper §5.3), ``lycoflow analyze``: rank scores, ranking tables, scatter plots,
SHAP charts and an HTML report.

- `runs`: finding run folders and reading their ``metrics.csv`` and ``config.yaml`` (configurations, capacity,
  labels);
- `scores`: rank scores, their averages per category and concept, the ranking tables;
- `plots`: the scatter plots and SHAP beeswarm charts;
- `report`: `analyze`, which writes the tables, charts and ``report.html`` (from the template beside it), and the
  command line `main`.

Free of torch unless a configuration's capacity is worked out (building the adapter needs it); matplotlib and
catboost are imported when a chart is drawn.
"""

from __future__ import annotations

from .plots import FEATURES, INSTALL_HINT, beeswarm, scatter, shap_samples, shap_values
from .report import DEFAULT_PROMPT_TYPES, analyze, main
from .runs import Checkpoint, ConceptKey, Config, Dataset, Row, capacity, find_runs, load, read_features, read_metrics
from .scores import category_scores, rank_scores, ranking, score_rows, unit_scores

__all__ = [
    "DEFAULT_PROMPT_TYPES", "FEATURES", "INSTALL_HINT", "Checkpoint", "ConceptKey", "Config", "Dataset", "Row",
    "analyze", "beeswarm", "capacity", "category_scores", "find_runs", "load", "main", "rank_scores", "ranking",
    "read_features", "read_metrics", "scatter", "score_rows", "shap_samples", "shap_values", "unit_scores",
]
