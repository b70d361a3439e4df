"""The paper's own analysis (§5.3, Figure 2), for runs measured with the paper's evaluation protocol.

- three scatter panels, each one metric on one prompt type at one epoch (`PAPER_PANELS`);
- six SHAP targets (`PAPER_TARGETS`), explained by the paper's features — algorithm, preset, step and two ordinal
  levels, of capacity and of learning rate, over the values of the paper's grid (`capacity_level`, `lr_level`) —
  with CatBoost as the paper ran it (`PAPER_SHAP`).

The levels are the paper's: a configuration outside its grid (another dim, factor, learning rate or algorithm)
gets NaN, which CatBoost's ``nan_mode='Min'`` places below every level.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from .plots import Measure, Panel, ShapSetup, Units
from .runs import Config

#: The ``protocol`` of the rows measured with the paper's protocol.
PAPER_PROTOCOL = "paper"
#: The paper's scatter panels (x, y): fidelity against controllability on the alteration prompts, against diversity
#: on the trigger prompt, and against base-model preservation (style loss of the style prompts vs the base model).
PAPER_PANELS: tuple[Panel, ...] = (
    (Measure("image_similarity", "alter", "image similarity score (alter)"),
     Measure("text_image_similarity", "alter", "text similarity score (alter)")),
    (Measure("squared_centroid_distance", "trigger", "SCD score (trigger)"),
     Measure("vendi_score", "trigger", "Vendi score (trigger)")),
    (Measure("image_similarity", "train", "image similarity score (train)"),
     Measure("style_loss", "style", "style loss score (style, vs base)")),
)
#: The paper's SHAP targets.
PAPER_TARGETS: tuple[Measure, ...] = (
    Measure("image_similarity", "alter", "image similarity (alter)"),
    Measure("image_similarity", "trigger", "image similarity (trigger)"),
    Measure("image_similarity", "train", "image similarity (train)"),
    Measure("text_image_similarity", "alter", "text similarity (alter)"),
    Measure("vendi_score", "trigger", "Vendi (trigger)"),
    Measure("style_loss", "style", "style loss (style)"),
)
#: The epoch the panels default to is the latest evaluated one up to this: the later of the two epochs of the
#: paper's Figure 2 (30 for movie characters, 10 for scenes), the middle of its three checkpoints (10, 30, 50).
PAPER_LATEST_EPOCH = 30

#: The algorithm name (`Config.algorithm`) of native fine-tuning.
NATIVE = "Full"
#: The paper's capacity levels: per adapter, the setting that sets its capacity and the level of each value (LoKr's
#: capacity grows as its factor decreases). Native fine-tuning is a level above all, so that its capacity is
#: folded into the algorithm.
CAPACITY_LEVELS: dict[str, tuple[str, dict[float, int]]] = {
    "LoRA": ("dim", {8: 2, 32: 3}),
    "LoHa": ("dim", {4: 2, 16: 3}),
    "LoKr": ("factor", {12: 1, 8: 2, 4: 3}),
}
NATIVE_CAPACITY_LEVEL = 4
#: The paper's learning rates, levels 1 to 3: the adapters' and native fine-tuning's.
ADAPTER_LRS = (1e-4, 5e-4, 1e-3)
NATIVE_LRS = (5e-7, 1e-6, 5e-6)
#: CatBoost as the paper ran it; algorithm and preset are native categorical features.
PAPER_CATBOOST = {"iterations": 300, "learning_rate": 0.1, "random_seed": 123, "nan_mode": "Min", "verbose": False,
                  "allow_writing_files": False}


def capacity_level(config: Config) -> float:
    """The paper's capacity level of ``config`` (`CAPACITY_LEVELS`), NaN outside the paper's grid."""
    if config.algorithm == NATIVE:
        return float(NATIVE_CAPACITY_LEVEL)
    setting, levels = CAPACITY_LEVELS.get(config.algorithm, ("", {}))
    value = config.settings.get(setting)
    # A bool is an int to Python, never a dim or factor.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in levels:
        return float(levels[value])  # 8.0 finds 8
    return math.nan


def lr_level(config: Config) -> float:
    """The paper's learning-rate level of ``config``: 1 to 3 on native fine-tuning's learning rates or on the
    adapters' (any other algorithm's), NaN for any other learning rate."""
    if config.lr is None:
        return math.nan
    lrs = NATIVE_LRS if config.algorithm == NATIVE else ADAPTER_LRS
    # Recipes write 5e-4 or 0.0005, YAML may read either back with rounding.
    return next((float(level) for level, lr in enumerate(lrs, start=1) if math.isclose(config.lr, lr, rel_tol=1e-6)),
                math.nan)


def paper_features(config: Config, step: int) -> list[object]:
    """A sample's features, in `PAPER_SHAP` order."""
    return [config.algorithm, config.preset, float(step), capacity_level(config), lr_level(config)]


#: The paper's SHAP setup.
PAPER_SHAP = ShapSetup(("algorithm", "preset", "step", "capacity level", "lr level"), ("algorithm", "preset"),
                       PAPER_CATBOOST, paper_features)


def off_grid(config: Config) -> list[str]:
    """The levels ``config`` has none of (outside the paper's grid): which features its samples have as NaN."""
    return [name for name, level in (("capacity level", capacity_level(config)), ("lr level", lr_level(config)))
            if math.isnan(level)]


def default_epoch(epochs: Collection[int]) -> int:
    """The epoch of the panels when none is asked for: the latest of ``epochs`` up to `PAPER_LATEST_EPOCH`, else
    the earliest (runs evaluated only later)."""
    early = [e for e in epochs if e <= PAPER_LATEST_EPOCH]
    return max(early) if early else min(epochs)


def at_epoch(units: Units, epoch: int) -> Units:
    """The ``units`` of the checkpoints at ``epoch``: the paper's panels show one epoch."""
    return {key: value for key, value in units.items() if key[0][2] == epoch}
