"""The analysis of evaluated runs (paper §5.3, DESIGN §6): rank scores, ranking tables, scatter plots, SHAP charts.

``lycoflow analyze RUN_DIRS... --out REPORT_DIR`` reads the ``metrics.csv`` (and ``config.yaml``) of each run
folder and writes into REPORT_DIR:

- ``scores.csv`` (``config, epoch, category, prompt_type, metric, score``): every metric value becomes a score in
  [0, 1] by its rank among all checkpoints (every configuration, seed and epoch) measured on the same
  (category, class, subclass, prompt type, metric): ``(rank - 1) / (n - 1)``, rank 1 the worst, tied values sharing
  their average rank, the order reversed for the metrics where lower is better (squared centroid distance, style
  loss) so that 1 is always best. A value alone in its group (n = 1) scores 1/2: it is neither better nor worse
  than anything, and the midpoint keeps it neutral in the averages. The scores are then averaged over the seeds
  and the concepts ((class, subclass) pairs, each counting once) of each category;
- ``configs.csv``: one line per configuration: its runs, seeds, algorithm, preset, capacity, learning rate and
  the label the plots and tables use;
- ``ranking_<criterion>.csv``: the configurations ranked by their mean score on a criterion (fidelity = image
  similarity and squared centroid distance, controllability = text–image similarity, diversity = Vendi score,
  preservation = style loss), one column per category, the paper's ranking table;
- ``scatter_<category>.png``: fidelity (squared centroid distance) vs diversity and fidelity (image similarity) vs
  controllability, one point per (configuration, epoch), error bars the standard errors across seeds and concepts
  (as in the paper's Figure 2);
- ``shap_<criterion>_<category>.png``: SHAP beeswarm charts of a CatBoost regressor that predicts a checkpoint's
  criterion score from its algorithm, preset, capacity, log10 learning rate and step; needs catboost (which computes
  exact TreeSHAP values itself): ``pip install 'lycoflow[analysis]'``;
- ``report.html``: all of the above in one self-contained page (images embedded), with the runs read and the notes.

Criteria, plots and SHAP charts average over the prompt types the paper evaluates (train, trigger, alter,
style: not the concept-agnostic prompts) unless told otherwise; ``scores.csv`` keeps every prompt type.

Capacity is the number of trainable parameters the adapter puts on a reference 768×768 linear layer (the width of
SD 1.x's text encoder), built by the algorithm itself with the run's global hyperparameters (per-layer overrides
aside). It grows with dim for LoRA and LoHa and as the factor decreases for LoKr (the paper's two capacity knobs)
and puts every algorithm on one scale; the SHAP charts use its log2.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import importlib
import io
import itertools
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .cache import atomic_path

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
#: Metrics where a lower value is the better one: their ranking is reversed.
LOWER_IS_BETTER = frozenset({"squared_centroid_distance", "style_loss"})
#: The paper's criteria (§4.2) and the metrics that measure them.
CRITERIA: dict[str, tuple[str, ...]] = {
    "fidelity": ("image_similarity", "squared_centroid_distance"),
    "controllability": ("text_image_similarity",),
    "diversity": ("vendi_score",),
    "preservation": ("style_loss",),
}
#: The paper leaves the concept-agnostic prompts out of its analysis (§5.2).
DEFAULT_PROMPT_TYPES = ("train", "trigger", "alter", "style")
SCORE_COLUMNS = ("config", "epoch", "category", "prompt_type", "metric", "score")
CONFIG_COLUMNS = ("config", "runs", "seeds", "algorithm", "preset", "capacity", "lr", "label")
FEATURES = ("algorithm", "preset", "capacity (log2)", "log10 lr", "step")
_CATEGORICAL = ("algorithm", "preset")
#: The metrics.csv columns the analysis reads (lycoflow.evaluation.COLUMNS has them all).
_NEEDED = ("run", "config", "seed", "epoch", "step", "category", "class", "subclass", "prompt_type", "metric", "value")
UNKNOWN = "?"
INSTALL_HINT = "pip install 'lycoflow[analysis]'"
#: Width of the reference layer capacity is measured on (CLIP ViT-L/14's, SD 1.x's text encoder).
REFERENCE_WIDTH = 768
#: The paper's colours (Figure 2): LoRA blue, LoHa purple, LoKr purple red, native fine-tuning red.
ALGORITHM_COLOURS = {"LoRA": "tab:blue", "LoHa": "tab:purple", "LoKr": "mediumvioletred", "Full": "tab:red"}
_SPARE_COLOURS = ("tab:orange", "tab:green", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray", "gold")
_PRESET_COLOURS = ("darkgreen", "darkorange", "teal", "saddlebrown", "slategray", "olive")
_EPOCH_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: CatBoost settings: small trees and a modest number of rounds suit a few hundred checkpoints at most. Categorical
#: features are one-hot encoded (they have a handful of levels): CatBoost's default target statistics for them are
#: computed in a different order while training than when explaining, which shifts every SHAP value of the
#: feature by the same spurious amount.
_CATBOOST = {"iterations": 300, "depth": 4, "learning_rate": 0.05, "one_hot_max_size": 255, "random_seed": 0,
             "verbose": False, "allow_writing_files": False}

Checkpoint = tuple[str, str, int]  # (run folder, run, epoch): one evaluated state of one training run
Concept = tuple[str, str]  # (class, subclass)


@dataclass(slots=True)
class Row:
    """One metric value of metrics.csv."""

    checkpoint: Checkpoint
    config: str
    seed: str
    step: int
    category: str
    concept: Concept
    prompt_type: str
    metric: str
    value: float


@dataclass
class Config:
    """One configuration (the ``config`` column): its runs and, where a config.yaml was found, its features."""

    digest: str
    runs: set[str] = field(default_factory=set)
    seeds: set[str] = field(default_factory=set)
    known: bool = False  # features read from a config.yaml
    algorithm: str = UNKNOWN
    preset: str = UNKNOWN
    capacity: int | None = None  # trainable parameters on the reference layer
    lr: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the adapter's scalar arguments and lr, for labels
    label: str = ""


@dataclass
class Dataset:
    """Everything read from the run folders."""

    rows: list[Row]
    configs: dict[str, Config]
    checkpoints: dict[Checkpoint, tuple[str, int]]  # → (config, step)
    runs: list[str]  # one line per run folder read
    notes: list[str]


# -- reading ------------------------------------------------------------------------------------------------------
def find_runs(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """The run folders among ``paths`` and, for folders without metrics.csv, their subfolders that have one.

    Returns:
        The run folders (each once) and one note per path or subfolder skipped. Subfolders whose name starts
        with a dot are passed over silently (caches, editor folders).
    """
    found: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            found.append(path)
        elif not path.is_dir():
            skipped.append(f"{path}: not a folder")
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            runs = [c for c in children if (c / METRICS_FILE).is_file()]
            if not runs:
                skipped.append(f"{path}: no {METRICS_FILE} in it or in its subfolders")
            else:
                found.extend(runs)
                # Among run folders, one without results is worth a word (a crashed or never evaluated run).
                skipped.extend(f"{c}: no {METRICS_FILE}" for c in children if c not in runs)
    unique: dict[Path, Path] = {}
    for run in found:
        unique.setdefault(run.resolve(), run)
    return list(unique.values()), skipped


def read_metrics(folder: Path) -> tuple[list[Row], int]:
    """The rows of ``folder``'s metrics.csv, and how many non-finite values were left out.

    Raises:
        ValueError: the file lacks a column or holds a number that does not parse.
    """
    rows: list[Row] = []
    dropped = 0
    with open(folder / METRICS_FILE, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{folder / METRICS_FILE} lacks the column(s) {', '.join(missing)}")
        for line, r in enumerate(reader, start=2):
            try:
                value = float(r["value"])
                epoch, step = int(r["epoch"]), int(r["step"])
            except ValueError as err:
                raise ValueError(f"{folder / METRICS_FILE}, line {line}: {err}") from None
            if not math.isfinite(value):
                dropped += 1
                continue
            rows.append(Row((str(folder), r["run"], epoch), r["config"], r["seed"], step, r["category"],
                            (r["class"], r["subclass"]), r["prompt_type"], r["metric"], value))
    return rows, dropped


def read_features(folder: Path, config: Config) -> str | None:
    """Fill ``config``'s features from ``folder``'s config.yaml (the resolved recipe of the run).

    Returns:
        A note when something could not be worked out, else None.

    Raises:
        OSError, yaml.YAMLError, AttributeError, TypeError, ValueError: the file is not a readable recipe.
    """
    recipe = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    model = recipe.get("model") or {}
    adapter = model.get("adapter") or {}
    class_path = str(adapter.get("class_path") or "")
    init = dict(adapter.get("init_args") or {})
    if not class_path:
        return f"{folder / CONFIG_FILE}: no model.adapter, so no features"
    lr = float(model["lr"]) if model.get("lr") is not None else None
    config.known = True
    config.algorithm = class_path.rpartition(".")[2] + ("+DoRA" if init.get("weight_decompose") else "")
    config.preset = str(init.get("preset") or ("custom" if init.get("targets") else "all"))
    config.lr = lr
    config.settings = {k: v for k, v in init.items() if isinstance(v, (bool, int, float, str)) or v is None}
    config.settings["lr"] = config.lr
    config.capacity, note = capacity(class_path, init)
    return f"{folder / CONFIG_FILE}: {note}" if note else None


def capacity(class_path: str, init_args: dict[str, Any]) -> tuple[int | None, str | None]:
    """Trainable parameters the adapter ``class_path(**init_args)`` puts on a 768×768 linear layer.

    Only the algorithms of the bundled ``lycoris`` package are built (a recipe names any class; importing what a
    results folder names is not the analysis's business).

    Returns:
        The count (None when it cannot be worked out) and a note saying why not.
    """
    # torch comes with lycoris: imported here so that reading tables alone stays light.
    import torch.nn as nn

    import lycoris

    module, _, name = class_path.rpartition(".")
    strategy_class = getattr(lycoris, name, None) if module.split(".")[0] == "lycoris" else None
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, lycoris.Strategy)):
        return None, f"capacity unknown: {class_path} is not a lycoris algorithm"
    try:
        strategy = strategy_class(**init_args)
        alpha = strategy.dim if strategy.alpha is None else strategy.alpha
        adapter = strategy.make_adapter(nn.Linear(REFERENCE_WIDTH, REFERENCE_WIDTH), strategy.dim, alpha)
    except (TypeError, ValueError, RuntimeError) as err:
        return None, f"capacity unknown: {class_path} does not build on the reference layer ({err})"
    return sum(p.numel() for p in adapter.parameters()), None


def load(paths: Sequence[Path], log: Callable[[str], None]) -> Dataset:
    """Read every run folder among ``paths`` (see `find_runs`), reporting each run read and each folder skipped."""
    folders, notes = find_runs(paths)
    for note in notes:
        log(f"skipped {note}")
    rows: list[Row] = []
    configs: dict[str, Config] = {}
    runs: list[str] = []
    for folder in folders:
        try:
            found, dropped = read_metrics(folder)
        except (OSError, ValueError, csv.Error) as err:
            notes.append(f"{folder}: unreadable ({err})")
            log(f"skipped {notes[-1]}")
            continue
        if dropped:
            notes.append(f"{folder}: {dropped} non-finite value(s) left out")
        rows.extend(found)
        digests = sorted({r.config for r in found})
        for row in found:
            config = configs.setdefault(row.config, Config(row.config))
            config.runs.add(row.checkpoint[1])
            config.seeds.add(row.seed)
        has_config = (folder / CONFIG_FILE).is_file()
        for digest in digests:
            if has_config and not configs[digest].known:
                try:
                    note = read_features(folder, configs[digest])
                except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as err:  # not a recipe
                    note = f"{folder / CONFIG_FILE}: unreadable ({err})"
                if note:
                    notes.append(note)
        epochs = sorted({r.checkpoint[2] for r in found})
        runs.append(f"{folder}: run {', '.join(sorted({r.checkpoint[1] for r in found}))}, config "
                    f"{', '.join(digests)}, epochs {', '.join(map(str, epochs))}, {len(found)} values"
                    + ("" if has_config else f" (no {CONFIG_FILE}: features unknown)"))
        log(f"read {runs[-1]}")
    _label(configs.values())
    return Dataset(rows, configs, {r.checkpoint: (r.config, r.step) for r in rows}, runs, notes)


def _label(configs: Iterable[Config]) -> None:
    """Name each configuration by its algorithm and its settings that depart from the most common one among the
    configurations of that algorithm (``LoRA dim=16``; the paper varies one setting at a time from a default),
    falling back on the digest where that does not tell configurations apart."""
    by_algorithm: dict[str, list[Config]] = {}
    for config in configs:
        if config.known:
            by_algorithm.setdefault(config.algorithm, []).append(config)
        else:
            config.label = config.digest
    for algorithm, group in by_algorithm.items():
        keys = sorted({k for c in group for k in c.settings})
        shown: dict[str, set[str]] = {c.digest: set() for c in group}
        for key in keys:
            counts = Counter(_short(c.settings.get(key)) for c in group)  # 4 and 4.0 alike
            (common, most), *rest = counts.most_common() + [("", 0)]
            usual = common if most > rest[0][1] else None  # no usual value where the most common ones tie
            for config in group:
                if len(counts) > 1 and _short(config.settings.get(key)) != usual:
                    shown[config.digest].add(key)
        for config in group:
            config.label = " ".join([algorithm, *(f"{k}={_short(config.settings.get(k))}"
                                                  for k in keys if k in shown[config.digest])])
    labelled = [c for group in by_algorithm.values() for c in group]
    counts = {label: sum(c.label == label for c in labelled) for label in {c.label for c in labelled}}
    for config in labelled:
        if counts[config.label] > 1:
            config.label += f" #{config.digest}"


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- scoring ------------------------------------------------------------------------------------------------------
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
    groups: dict[tuple[str, Concept, str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.category, row.concept, row.prompt_type, row.metric), []).append(i)
    scores = [Fraction(0)] * len(rows)
    for (_, _, _, metric), members in groups.items():
        for i, score in zip(members, rank_scores([rows[i].value for i in members], metric in LOWER_IS_BETTER)):
            scores[i] = score
    return scores


def category_scores(rows: Sequence[Row], scores: Sequence[Fraction]
                    ) -> dict[tuple[str, int, str, str, str], Fraction]:
    """(config, epoch, category, prompt type, metric) → the mean score over its seeds and concepts."""
    groups: dict[tuple[str, int, str, str, str], list[Fraction]] = {}
    for row, score in zip(rows, scores):
        groups.setdefault((row.config, row.checkpoint[2], row.category, row.prompt_type, row.metric),
                          []).append(score)
    return {key: sum(values, Fraction(0)) / len(values) for key, values in sorted(groups.items())}


def unit_scores(rows: Sequence[Row], scores: Sequence[float], metrics: Collection[str],
                prompt_types: Collection[str] | None) -> dict[str, dict[tuple[Checkpoint, Concept], float]]:
    """category → (checkpoint, concept) → the mean score over ``metrics`` and ``prompt_types`` (None: all): the
    units whose spread gives the plots' standard errors and whose means are the SHAP targets."""
    groups: dict[str, dict[tuple[Checkpoint, Concept], list[float]]] = {}
    for row, score in zip(rows, scores):
        if row.metric in metrics and (prompt_types is None or row.prompt_type in prompt_types):
            groups.setdefault(row.category, {}).setdefault((row.checkpoint, row.concept), []).append(score)
    return {category: {key: float(np.mean(values)) for key, values in units.items()}
            for category, units in groups.items()}


def ranking(table: dict[tuple[str, int, str, str, str], Fraction], configs: dict[str, Config],
            metrics: Collection[str], prompt_types: Collection[str] | None) -> tuple[list[str], list[list[object]]]:
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


# -- writing ------------------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_csv(path: Path, header: Sequence[str], lines: Iterable[Sequence[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in line] for line in lines)
    _write(path, buffer.getvalue().encode("utf-8"))


def _category_name(category: str) -> str:
    return category or "(no category)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "none"


def _colours(algorithms: Iterable[str]) -> dict[str, str]:
    """The paper's colour for its algorithms, spare ones for the rest (stable: assigned in sorted order)."""
    colours = dict(ALGORITHM_COLOURS)
    spare = itertools.cycle(_SPARE_COLOURS)
    for algorithm in sorted(set(algorithms) - colours.keys()):
        colours[algorithm] = next(spare)
    return colours


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return mean, se


#: The scatter panels: (x metric, x axis, y metric, y axis).
_PANELS = (
    ("squared_centroid_distance", "fidelity (SCD score)", "vendi_score", "diversity (Vendi score)"),
    ("image_similarity", "fidelity (image similarity score)", "text_image_similarity", "controllability score"),
)


def scatter(data: Dataset, units: dict[str, dict[str, dict[tuple[Checkpoint, Concept], float]]], category: str,
            colours: dict[str, str]) -> bytes | None:
    """The category's two scatter plots as a PNG, or None when neither panel has a point. A line joins the epochs
    of each configuration, labelled at its last one.

    Args:
        units: metric → `unit_scores` of that metric alone.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    epochs = sorted({checkpoint[2] for by_category in units.values()
                     for checkpoint, _ in by_category.get(category, {})})
    markers = {e: _EPOCH_MARKERS[i % len(_EPOCH_MARKERS)] for i, e in enumerate(epochs)}
    figure = Figure(figsize=(14, 6))
    axes = figure.subplots(1, 2)
    drawn = False
    for ax, (x_metric, x_label, y_metric, y_label) in zip(axes, _PANELS):
        per_point: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for axis, metric in enumerate((x_metric, y_metric)):
            for (checkpoint, _), value in units.get(metric, {}).get(category, {}).items():
                config = data.checkpoints[checkpoint][0]
                per_point.setdefault((config, checkpoint[2]), ([], []))[axis].append(value)
        paths: dict[str, list[tuple[float, float]]] = {}
        for (config, epoch), (xs, ys) in sorted(per_point.items()):
            if not xs or not ys:
                continue
            (x, x_se), (y, y_se) = _mean_se(xs), _mean_se(ys)
            colour = colours.get(data.configs[config].algorithm, "black")
            ax.errorbar(x, y, xerr=x_se, yerr=y_se, fmt=markers[epoch], color=colour, ecolor=colour, alpha=0.8,
                        elinewidth=0.8, capsize=2, markersize=6)
            paths.setdefault(config, []).append((x, y))
        for config, path in paths.items():
            colour = colours.get(data.configs[config].algorithm, "black")
            ax.plot(*zip(*path), color=colour, alpha=0.35, linewidth=0.8)
            ax.annotate(data.configs[config].label, path[-1], fontsize=6, xytext=(3, 3), textcoords="offset points")
        drawn = drawn or bool(paths)
        ax.set(xlabel=x_label, ylabel=y_label, xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    algorithms = sorted({c.algorithm for c in data.configs.values()})
    handles = [Line2D([], [], color=colours.get(a, "black"), marker="o", linestyle="", label=a) for a in algorithms]
    handles += [Line2D([], [], color="gray", marker=markers[e], linestyle="", label=f"epoch {e}") for e in epochs]
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.suptitle(f"{_category_name(category)}: scores (1 = best), standard errors across seeds and concepts")
    figure.subplots_adjust(right=0.88)
    return _png(figure)


def shap_values(features: list[list[object]], targets: list[float]) -> np.ndarray:
    """Exact TreeSHAP values (samples × features) of a CatBoost regressor fitted to ``targets``."""
    from catboost import CatBoostRegressor, Pool

    categorical = [FEATURES.index(f) for f in _CATEGORICAL]
    pool = Pool(features, targets, cat_features=categorical, feature_names=list(FEATURES))
    model = CatBoostRegressor(**_CATBOOST)
    model.fit(pool)
    # The last column is the expected value (the model's mean prediction), not a feature's share.
    return np.asarray(model.get_feature_importance(data=pool, type="ShapValues"))[:, :-1]


def _swarm(values: np.ndarray, half_width: float = 0.4, bins: int = 60) -> np.ndarray:
    """Vertical offsets that spread points of similar value apart: the beeswarm layout."""
    low, high = float(values.min()), float(values.max())
    slots = np.floor((values - low) / ((high - low) or 1.0) * (bins - 1)).astype(int)
    offsets = np.zeros(len(values))
    crowd = max(int(np.bincount(slots).max()), 1)
    step = min(0.08, 2 * half_width / crowd)
    for slot in np.unique(slots):
        members = np.flatnonzero(slots == slot)
        members = members[np.argsort(values[members], kind="stable")]
        # Alternate above and below the line, moving outwards: 0, +1, -1, +2, -2, ...
        for j, i in enumerate(members):
            offsets[i] = (j + 1) // 2 * (1 if j % 2 else -1) * step
    return offsets


def beeswarm(shap: np.ndarray, features: list[list[object]], title: str, colours: dict[str, str]) -> bytes:
    """A SHAP beeswarm chart as a PNG: one row per feature, most influential on top; categorical features coloured
    by their level (algorithms in the paper's colours), numeric ones by their value (blue low, red high)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    columns = list(zip(*features))
    presets = sorted({str(p) for p in columns[FEATURES.index("preset")]})
    preset_colours = {p: _PRESET_COLOURS[i % len(_PRESET_COLOURS)] for i, p in enumerate(presets)}
    cmap = "coolwarm"
    order = np.argsort(np.abs(shap).mean(axis=0))  # least influential first: drawn at the bottom
    figure = Figure(figsize=(9, 1 + 0.8 * len(FEATURES)))
    ax = figure.subplots()
    for row, f in enumerate(order):
        name = FEATURES[f]
        if name == "algorithm":
            colour: Any = [colours.get(str(v), "black") for v in columns[f]]
        elif name == "preset":
            colour = [preset_colours[str(v)] for v in columns[f]]
        else:
            numbers = np.array(columns[f], dtype=float)
            finite = numbers[np.isfinite(numbers)]
            norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
            mapper = ScalarMappable(norm=norm, cmap=cmap)
            colour = [mapper.to_rgba(v) if math.isfinite(v) else "lightgray" for v in numbers]
        ax.scatter(shap[:, f], row + _swarm(shap[:, f]), c=colour, s=14, alpha=0.85, linewidths=0)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(order)), [FEATURES[f] for f in order])
    ax.set(xlabel="SHAP value (effect on the predicted score)", title=title)
    handles = [Line2D([], [], color=colours.get(a, "black"), marker="o", linestyle="", label=f"algorithm: {a}")
               for a in sorted({str(v) for v in columns[FEATURES.index("algorithm")]})]
    handles += [Line2D([], [], color=c, marker="o", linestyle="", label=f"preset: {p}")
                for p, c in preset_colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.18, 1.0), fontsize=7)
    bar = figure.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=ax, ticks=[0, 1], pad=0.02)
    bar.ax.set_yticklabels(["low", "high"])
    bar.set_label("numeric feature value", fontsize=8)
    return _png(figure)


def shap_samples(data: Dataset, units: dict[tuple[Checkpoint, Concept], float]
                 ) -> tuple[list[list[object]], list[float], int]:
    """The SHAP inputs of one criterion and category: one sample per checkpoint with known features.

    Args:
        units: the category's `unit_scores` for the criterion.

    Returns:
        The features (in `FEATURES` order), the targets (the checkpoint's mean score over the category's
        concepts) and how many checkpoints were left out for want of a config.yaml.
    """
    per_checkpoint: dict[Checkpoint, list[float]] = {}
    for (checkpoint, _), value in units.items():
        per_checkpoint.setdefault(checkpoint, []).append(value)
    features, targets, unknown = [], [], 0
    for checkpoint, values in sorted(per_checkpoint.items()):
        digest, step = data.checkpoints[checkpoint]
        config = data.configs[digest]
        if not config.known:
            unknown += 1
            continue
        features.append([config.algorithm, config.preset,
                         math.log2(config.capacity) if config.capacity else math.nan,
                         math.log10(config.lr) if config.lr and config.lr > 0 else math.nan, float(step)])
        targets.append(float(np.mean(values)))
    return features, targets, unknown


def _table_html(header: Sequence[str], lines: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return "" if value is None else html.escape(f"{value:.3f}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+3),th{text-align:left}
img{max-width:100%;display:block;margin:1em 0}.note{color:#a40}"""


# -- the whole analysis -------------------------------------------------------------------------------------------
def analyze(run_dirs: Sequence[Path], out: Path, *, prompt_types: Collection[str] | None = DEFAULT_PROMPT_TYPES,
            log: Callable[[str], None] = print) -> Path:
    """Analyse the evaluated runs in ``run_dirs`` (run folders, or folders of run folders) into ``out``.

    Args:
        run_dirs: run folders (with a metrics.csv), or parent folders whose subfolders are searched one level down.
        out: the report folder (created); see the module's docstring for what it receives.
        prompt_types: the prompt types the criteria (rankings, plots, SHAP) average over; None: all.
            scores.csv keeps every prompt type.
        log: receives one line per run read, folder skipped and missing optional package, and the report's path.

    Returns:
        The path of report.html.

    Raises:
        ValueError: no metric values were found.
    """
    data = load([Path(p) for p in run_dirs], log)
    if not data.rows:
        raise ValueError(f"no metric values found in {', '.join(map(str, run_dirs))} (nor one level down)")
    out.mkdir(parents=True, exist_ok=True)
    notes = data.notes
    scores = score_rows(data.rows)
    table = category_scores(data.rows, scores)
    _write_csv(out / "scores.csv", SCORE_COLUMNS, [[*key, float(score)] for key, score in table.items()])
    _write_csv(out / "configs.csv", CONFIG_COLUMNS, [
        [c.digest, ";".join(sorted(c.runs)), ";".join(sorted(c.seeds)), c.algorithm, c.preset,
         UNKNOWN if c.capacity is None else c.capacity, UNKNOWN if c.lr is None else c.lr, c.label]
        for c in sorted(data.configs.values(), key=lambda c: c.digest)])
    selected = None if prompt_types is None else set(prompt_types)
    unmeasured = {m for m in {r.metric for r in data.rows} if not any(m in ms for ms in CRITERIA.values())}
    if unmeasured:
        notes.append(f"metrics outside the criteria (in scores.csv only): {', '.join(sorted(unmeasured))}")

    rankings: list[str] = []
    for criterion, metrics in CRITERIA.items():
        categories, lines = ranking(table, data.configs, metrics, selected)
        if not lines:
            notes.append(f"no {criterion} scores ({', '.join(metrics)}) for the prompt types analysed")
            continue
        columns = [*map(_category_name, categories), "mean"]
        _write_csv(out / f"ranking_{criterion}.csv", ["rank", "config", "label", *columns], lines)
        # The label first in the page: it is what a reader recognises.
        rankings.append(f"<h3>{criterion} ({', '.join(metrics)})</h3>" + _table_html(
            ["rank", "label", "config", *columns], ([r, lab, cfg, *rest] for r, cfg, lab, *rest in lines)))

    categories = sorted({r.category for r in data.rows})
    colours = _colours(c.algorithm for c in data.configs.values())
    plots: list[str] = []
    charts: list[str] = []
    explaining = _importable("catboost")
    if not explaining:
        notes.append(f"SHAP charts skipped: catboost is not installed ({INSTALL_HINT})")
        log(notes[-1])
    floats = [float(s) for s in scores]
    by_metric = {m: unit_scores(data.rows, floats, {m}, selected) for p in _PANELS for m in (p[0], p[2])}
    for category in categories:
        png = scatter(data, by_metric, category, colours)
        if png is None:
            notes.append(f"no scatter plot for {_category_name(category)}: no checkpoint has both scores of a panel")
            continue
        _write(out / f"scatter_{_slug(_category_name(category))}.png", png)
        plots.append(_image_html(png, f"scatter plots of {_category_name(category)}"))
    if explaining:
        charts = _shap_charts(data, floats, categories, selected, colours, out, notes)

    runs = "".join(f"<li>{html.escape(r)}</li>" for r in data.runs)
    config_lines = [[c.label, c.digest, c.algorithm, c.preset, UNKNOWN if c.capacity is None else c.capacity,
                     UNKNOWN if c.lr is None else f"{c.lr:g}", ", ".join(sorted(c.seeds)), ", ".join(sorted(c.runs))]
                    for c in sorted(data.configs.values(), key=lambda c: c.label)]
    note_list = "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) or "<li>none</li>"
    types = "all" if selected is None else ", ".join(sorted(selected))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lycoflow analysis</title><style>{_STYLE}</style></head><body>
<h1>lycoflow analysis</h1>
<p>{len(data.runs)} run(s), {len(data.configs)} configuration(s), {len({r.checkpoint for r in data.rows})}
checkpoint(s), categories: {html.escape(", ".join(map(_category_name, categories)))}.
Prompt types analysed: {html.escape(types)}.</p>
<p>Each metric value is scored in [0, 1] by its rank among all checkpoints measured on the same concept, prompt type
and metric (1 = best; ties share their average rank; a value alone scores 0.5), then averaged over seeds and
concepts (scores.csv) and here over epochs, prompt types and a criterion's metrics.</p>
<h2>Notes</h2><ul>{note_list}</ul>
<h2>Ranking</h2>{"".join(rankings)}
<h2>Scatter plots</h2>{"".join(plots) or "<p>none</p>"}
<h2>SHAP (CatBoost)</h2>{"".join(charts) or "<p>none</p>"}
<h2>Configurations</h2>{_table_html(["label", "config", "algorithm", "preset",
                                     f"capacity (parameters on a {REFERENCE_WIDTH}² layer)", "lr", "seeds", "runs"],
                                    config_lines)}
<h2>Runs read</h2><ul>{runs}</ul>
</body></html>
"""
    report = out / "report.html"
    _write(report, page.encode("utf-8"))
    log(f"wrote {report}")
    return report


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _shap_charts(data: Dataset, scores: Sequence[float], categories: Sequence[str],
                 prompt_types: Collection[str] | None, colours: dict[str, str], out: Path, notes: list[str]
                 ) -> list[str]:
    """One SHAP beeswarm chart per criterion and category, written to ``out``; their HTML."""
    charts = []
    for criterion, metrics in CRITERIA.items():
        units = unit_scores(data.rows, scores, metrics, prompt_types)
        for category in categories:
            features, targets, unknown = shap_samples(data, units.get(category, {}))
            name = f"{criterion}, {_category_name(category)}"
            if unknown:
                notes.append(f"SHAP for {name}: {unknown} checkpoint(s) left out, their configuration has no "
                             f"{CONFIG_FILE} (features unknown)")
            if len(set(targets)) < 2:
                if targets or unknown:
                    notes.append(f"no SHAP chart for {name}: fewer than two distinct scores to explain")
                continue
            png = beeswarm(shap_values(features, targets), features,
                           f"{name}: {len(targets)} checkpoints", colours)
            _write(out / f"shap_{criterion}_{_slug(_category_name(category))}.png", png)
            charts.append(_image_html(png, f"SHAP beeswarm of {name}"))
    return charts


def main(argv: list[str] | None = None) -> int:
    """``lycoflow analyze RUN_DIRS... --out REPORT_DIR``: 0 when the report was written, 1 when there was nothing
    to analyse (argparse exits with 2 on bad arguments)."""
    parser = argparse.ArgumentParser(
        prog="lycoflow analyze",
        description="Rank scores, ranking tables, scatter plots and SHAP charts of evaluated runs (paper §5.3).")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIRS",
                        help="run folders (with a metrics.csv), or folders holding run folders")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="where the report goes")
    parser.add_argument("--prompt-types", nargs="+", default=list(DEFAULT_PROMPT_TYPES), metavar="TYPE",
                        help="prompt types the criteria average over ('all': every one; default: %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    prompt_types = None if args.prompt_types == ["all"] else args.prompt_types
    try:
        report = analyze(args.run_dirs, args.out, prompt_types=prompt_types)
    except ValueError as err:
        print(f"lycoflow analyze: error: {err}", file=sys.stderr)
        return 1
    print(f"lycoflow analyze: report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
