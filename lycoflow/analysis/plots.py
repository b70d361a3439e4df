"""The report's charts, as PNG bytes: the scatter plots of the paper's Figure 2 and SHAP beeswarm charts of a
CatBoost regressor. matplotlib and catboost are imported when a chart is drawn, not with the package."""

from __future__ import annotations

import importlib
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .runs import Checkpoint, ConceptKey, Dataset, category_name

#: The SHAP charts' features, in the order of a sample's values.
FEATURES = ("algorithm", "preset", "capacity (log2)", "log10 lr", "step")
_CATEGORICAL = ("algorithm", "preset")
INSTALL_HINT = "pip install 'lycoflow[analysis]'"
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
#: The scatter panels: (x metric, x axis, y metric, y axis).
PANELS = (
    ("squared_centroid_distance", "fidelity (SCD score)", "vendi_score", "diversity (Vendi score)"),
    ("image_similarity", "fidelity (image similarity score)", "text_image_similarity", "controllability score"),
)

#: (checkpoint, concept) → score: the `unit_scores` of one category.
Units = dict[tuple[Checkpoint, ConceptKey], float]


def palette(algorithms: Iterable[str]) -> dict[str, str]:
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


def scatter(data: Dataset, units: dict[str, dict[str, Units]], category: str, colours: dict[str, str]
            ) -> bytes | None:
    """The category's two scatter plots as a PNG, or None when neither panel has a point. One point per
    (configuration, epoch), error bars the standard errors across seeds and concepts; a line joins the epochs of
    each configuration, labelled at its last one.

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
    for ax, (x_metric, x_label, y_metric, y_label) in zip(axes, PANELS):
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
    figure.suptitle(f"{category_name(category)}: scores (1 = best), standard errors across seeds and concepts")
    figure.subplots_adjust(right=0.88)
    return _png(figure)


def shap_available() -> bool:
    """Whether catboost, which the SHAP charts need, can be imported."""
    try:
        importlib.import_module("catboost")
    except ImportError:
        return False
    return True


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


def shap_samples(data: Dataset, units: Units) -> tuple[list[list[object]], list[float], int]:
    """The SHAP inputs of one criterion and category: one sample per checkpoint with known features.

    Args:
        units: the category's `unit_scores` for the criterion.

    Returns:
        The features (in `FEATURES` order: capacity as its log2, the learning rate as its log10), the targets
        (the checkpoint's mean score over the category's concepts) and how many checkpoints were left out for want
        of a config.yaml.
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
