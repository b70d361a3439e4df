"""The report's charts, as PNG bytes: the scatter plots of the paper's Figure 2 and SHAP beeswarm charts of a
CatBoost regressor, and what they are drawn from (the points, the SHAP samples). matplotlib and catboost are
imported when a chart is drawn, not with the package."""

from __future__ import annotations

import importlib
import io
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .runs import Checkpoint, Config, Dataset

#: The SHAP charts' features, in the order of a sample's values.
FEATURES = ("algorithm", "preset", "capacity (log2)", "log10 lr", "step")
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


@dataclass(frozen=True)
class Measure:
    """A scatter plot's axis or a SHAP chart's target: a metric's scores on a prompt type (None: on each prompt
    type analysed, averaged)."""

    metric: str
    prompt_type: str | None
    label: str


#: A scatter panel: its (x, y) axes.
Panel = tuple[Measure, Measure]
#: The criterion means' scatter panels, in every report (the paper protocol's own panels are
#: `lycoflow.analysis.paper.PAPER_PANELS`).
PANELS: tuple[Panel, ...] = (
    (Measure("squared_centroid_distance", None, "fidelity (SCD score)"),
     Measure("vendi_score", None, "diversity (Vendi score)")),
    (Measure("image_similarity", None, "fidelity (image similarity score)"),
     Measure("text_image_similarity", None, "controllability score")),
)

#: (checkpoint, class) → score: the `unit_scores` of one category.
Units = dict[tuple[Checkpoint, str], float]
#: (mean, standard error) of a point on one axis.
MeanSE = tuple[float, float]


def _generic_features(config: Config, step: int) -> list[object]:
    """A sample's `FEATURES`: capacity as its log2 and the learning rate as its log10 (NaN where unknown), so that
    any adapter and learning rate has a place on one scale."""
    return [config.algorithm, config.preset, math.log2(config.capacity) if config.capacity else math.nan,
            math.log10(config.lr) if config.lr and config.lr > 0 else math.nan, float(step)]


@dataclass(frozen=True)
class ShapSetup:
    """How the SHAP charts encode and explain a sample: its features (names, in a sample's order), which of them
    are categorical, the CatBoostRegressor arguments and the encoding of a configuration at a training step."""

    features: tuple[str, ...]
    categorical: tuple[str, ...]
    catboost: Mapping[str, object]
    encode: Callable[[Config, int], list[object]]


#: The SHAP setup of every protocol but the paper's (`lycoflow.analysis.paper.PAPER_SHAP`).
GENERIC_SHAP = ShapSetup(FEATURES, ("algorithm", "preset"), _CATBOOST, _generic_features)


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


def _mean_se(values: Sequence[float]) -> MeanSE:
    """Mean and standard error (0 for a single value)."""
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return mean, se


def panel_points(data: Dataset, x: Units, y: Units) -> dict[tuple[str, int], tuple[MeanSE, MeanSE]]:
    """(configuration, epoch) → the (mean, standard error) of its x and of its y units, over its seeds and classes:
    a scatter panel's points, those measured on both axes."""
    per_point: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for axis, units in enumerate((x, y)):
        for (checkpoint, _), value in units.items():
            per_point.setdefault((data.checkpoints[checkpoint].config, checkpoint[2]), ([], []))[axis].append(value)
    return {point: (_mean_se(xs), _mean_se(ys)) for point, (xs, ys) in sorted(per_point.items()) if xs and ys}


def scatter(data: Dataset, panels: Sequence[Panel], units: Mapping[Measure, dict[str, Units]], category: str,
            colours: dict[str, str], title: str) -> bytes | None:
    """The category's scatter ``panels`` side by side as a PNG, or None when no panel has a point. One point per
    (configuration, epoch) (`panel_points`), coloured by algorithm; a line joins the epochs of each configuration,
    labelled at its last one.

    Args:
        units: measure → `unit_scores` of that measure alone.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    epochs = sorted({checkpoint[2] for by_category in units.values()
                     for checkpoint, _ in by_category.get(category, {})})
    markers = {e: _EPOCH_MARKERS[i % len(_EPOCH_MARKERS)] for i, e in enumerate(epochs)}
    figure = Figure(figsize=(7 * len(panels), 6))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    drawn = False
    for ax, (x_measure, y_measure) in zip(axes, panels):
        points = panel_points(data, units.get(x_measure, {}).get(category, {}),
                              units.get(y_measure, {}).get(category, {}))
        paths: dict[str, list[tuple[float, float]]] = {}
        for (config, epoch), ((x, x_se), (y, y_se)) in points.items():
            colour = colours.get(data.configs[config].algorithm, "black")
            ax.errorbar(x, y, xerr=x_se, yerr=y_se, fmt=markers[epoch], color=colour, ecolor=colour, alpha=0.8,
                        elinewidth=0.8, capsize=2, markersize=6)
            paths.setdefault(config, []).append((x, y))
        for config, path in paths.items():
            colour = colours.get(data.configs[config].algorithm, "black")
            ax.plot(*zip(*path), color=colour, alpha=0.35, linewidth=0.8)
            ax.annotate(data.configs[config].label, path[-1], fontsize=6, xytext=(3, 3), textcoords="offset points")
        drawn = drawn or bool(paths)
        ax.set(xlabel=x_measure.label, ylabel=y_measure.label, xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    algorithms = sorted({c.algorithm for c in data.configs.values()})
    handles = [Line2D([], [], color=colours.get(a, "black"), marker="o", linestyle="", label=a) for a in algorithms]
    handles += [Line2D([], [], color="gray", marker=markers[e], linestyle="", label=f"epoch {e}") for e in epochs]
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.suptitle(title)
    figure.subplots_adjust(right=0.88)
    return _png(figure)


def shap_available() -> bool:
    """Whether catboost, which the SHAP charts need, can be imported."""
    try:
        importlib.import_module("catboost")
    except ImportError:
        return False
    return True


def shap_values(features: list[list[object]], targets: list[float], setup: ShapSetup) -> np.ndarray:
    """Exact TreeSHAP values (samples × features) of a CatBoost regressor (``setup``'s) fitted to ``targets``."""
    from catboost import CatBoostRegressor, Pool

    categorical = [setup.features.index(f) for f in setup.categorical]
    pool = Pool(features, targets, cat_features=categorical, feature_names=list(setup.features))
    model = CatBoostRegressor(**setup.catboost)
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


def beeswarm(shap: np.ndarray, features: list[list[object]], names: Sequence[str], title: str,
             colours: dict[str, str]) -> bytes:
    """A SHAP beeswarm chart as a PNG: one row per feature (``names``, in a sample's order; among them algorithm and
    preset), most influential on top; algorithm and preset coloured by their level (algorithms in the paper's
    colours), the other features by their value (blue low, red high, black unknown: the colour map's middle is
    grey, so grey would pass for a middle value)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    columns = list(zip(*features))
    presets = sorted({str(p) for p in columns[names.index("preset")]})
    preset_colours = {p: _PRESET_COLOURS[i % len(_PRESET_COLOURS)] for i, p in enumerate(presets)}
    cmap = "coolwarm"
    order = np.argsort(np.abs(shap).mean(axis=0))  # least influential first: drawn at the bottom
    figure = Figure(figsize=(9, 1 + 0.8 * len(names)))
    ax = figure.subplots()
    unknown = False
    for row, f in enumerate(order):
        name = names[f]
        if name == "algorithm":
            colour: Any = [colours.get(str(v), "black") for v in columns[f]]
        elif name == "preset":
            colour = [preset_colours[str(v)] for v in columns[f]]
        else:
            numbers = np.array(columns[f], dtype=float)
            finite = numbers[np.isfinite(numbers)]
            norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
            mapper = ScalarMappable(norm=norm, cmap=cmap)
            colour = [mapper.to_rgba(v) if math.isfinite(v) else "black" for v in numbers]
            unknown = unknown or finite.size < numbers.size
        ax.scatter(shap[:, f], row + _swarm(shap[:, f]), c=colour, s=14, alpha=0.85, linewidths=0)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(order)), [names[f] for f in order])
    ax.set(xlabel="SHAP value (effect on the predicted score)", title=title)
    handles = [Line2D([], [], color=colours.get(a, "black"), marker="o", linestyle="", label=f"algorithm: {a}")
               for a in sorted({str(v) for v in columns[names.index("algorithm")]})]
    handles += [Line2D([], [], color=c, marker="o", linestyle="", label=f"preset: {p}")
                for p, c in preset_colours.items()]
    if unknown:
        handles.append(Line2D([], [], color="black", marker="o", linestyle="", label="numeric value unknown"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.18, 1.0), fontsize=7)
    bar = figure.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=ax, ticks=[0, 1], pad=0.02)
    bar.ax.set_yticklabels(["low", "high"])
    bar.set_label("numeric feature value", fontsize=8)
    return _png(figure)


def shap_samples(data: Dataset, units: Units, setup: ShapSetup) -> tuple[list[list[object]], list[float], int]:
    """The SHAP inputs of one target and category: one sample per (configuration, seed, step) with known features,
    as the paper has them.

    Args:
        units: the category's `unit_scores` for the target.

    Returns:
        The features (``setup.encode``'s, in ``setup.features`` order), the targets (the sample's mean score over
        its classes, each class the mean of its subclasses) and how many samples were left out for want of a
        config.yaml.
    """
    per_sample: dict[tuple[str, str, int], list[float]] = {}
    for (checkpoint, _), value in units.items():
        per_sample.setdefault(data.checkpoints[checkpoint], []).append(value)
    features, targets, unknown = [], [], 0
    for (digest, _, step), values in sorted(per_sample.items()):
        config = data.configs[digest]
        if not config.known:
            unknown += 1
            continue
        features.append(setup.encode(config, step))
        targets.append(float(np.mean(values)))
    return features, targets, unknown
