"""The analysis of evaluated runs (paper §5.3), ``lycoflow analyze``: rank scores, ranking tables, scatter plots,
SHAP charts and an HTML report.

- `runs`: finding run folders and reading their ``metrics.csv`` (with its evaluation protocol) and ``config.yaml``
  (configurations, capacity, labels);
- `scores`: rank scores, their averages per class (subclasses first) and category, the ranking tables;
- `plots`: the scatter plots and SHAP beeswarm charts, and their points and samples;
- `paper`: the paper's own panels, SHAP targets and features, for runs measured with the paper's protocol;
- `report`: `analyze`, which writes the tables, charts and ``report.html`` (from the template beside it), and the
  command line `main`.

Free of torch unless a configuration's capacity is worked out (building the adapter needs it); matplotlib and
catboost are imported when a chart is drawn.
"""

from __future__ import annotations

from .paper import (
    PAPER_PANELS,
    PAPER_PROTOCOL,
    PAPER_SHAP,
    PAPER_TARGETS,
    capacity_level,
    default_epoch,
    lr_level,
    paper_features,
)
from .plots import (
    FEATURES,
    GENERIC_SHAP,
    INSTALL_HINT,
    PANELS,
    Measure,
    ShapSetup,
    beeswarm,
    panel_points,
    scatter,
    shap_samples,
    shap_values,
)
from .report import DEFAULT_PROMPT_TYPES, analyze, main
from .runs import (
    LEGACY_PROTOCOL,
    Checkpoint,
    CheckpointInfo,
    ConceptKey,
    Config,
    Dataset,
    Row,
    capacity,
    find_runs,
    load,
    read_features,
    read_metrics,
)
from .scores import category_scores, class_scores, rank_scores, ranking, score_rows, unit_scores

__all__ = [
    "DEFAULT_PROMPT_TYPES", "FEATURES", "GENERIC_SHAP", "INSTALL_HINT", "LEGACY_PROTOCOL", "PANELS", "PAPER_PANELS",
    "PAPER_PROTOCOL", "PAPER_SHAP", "PAPER_TARGETS", "Checkpoint", "CheckpointInfo", "ConceptKey", "Config", "Dataset",
    "Measure", "Row", "ShapSetup", "analyze", "beeswarm", "capacity", "capacity_level", "category_scores",
    "class_scores", "default_epoch", "find_runs", "load", "lr_level", "main", "panel_points", "paper_features",
    "rank_scores", "ranking", "read_features", "read_metrics", "scatter", "score_rows", "shap_samples", "shap_values",
    "unit_scores",
]
