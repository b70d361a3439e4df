"""Reading evaluated runs: the run folders, their ``metrics.csv`` (with the evaluation protocol of each row) and
``config.yaml``, and what the analysis knows of each configuration (algorithm, preset, capacity, learning rate,
label)."""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lycoflow.metrics.specs import COLUMNS

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
#: What a feature the run folders do not tell reads as in the tables.
UNKNOWN = "?"
#: Width of the reference layer capacity is measured on (CLIP ViT-L/14's, SD 1.x's text encoder).
REFERENCE_WIDTH = 768

#: The metrics.csv column naming the evaluation protocol a row was measured with (``paper``, ``generic`` or a
#: user's own); files written before it have none.
PROTOCOL_COLUMN = "protocol"
#: The protocol of a row without one: the only protocol lycoflow had before the column existed.
LEGACY_PROTOCOL = "generic"
#: The columns a metrics.csv must have: all but the later ``protocol``.
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c != PROTOCOL_COLUMN)

Checkpoint = tuple[str, str, int]  # (run folder, run, epoch): one evaluated state of one training run
ConceptKey = tuple[str, str]  # (class, subclass)


@dataclass(slots=True)
class Row:
    """One metric value of metrics.csv."""

    checkpoint: Checkpoint
    config: str
    protocol: str
    seed: str
    step: int
    category: str
    concept: ConceptKey
    prompt_type: str
    metric: str
    value: float


class CheckpointInfo(NamedTuple):
    """What a checkpoint was trained with: its configuration, seed and training step."""

    config: str
    seed: str
    step: int


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
    checkpoints: dict[Checkpoint, CheckpointInfo]
    runs: list[str]  # one line per run folder read
    notes: list[str]
    protocols: dict[str, list[str]]  # evaluation protocol → the run folders with rows measured with it


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

    A file without the ``protocol`` column (written before it existed) or a row with an empty one reads as
    measured with the `LEGACY_PROTOCOL`.

    Raises:
        ValueError: naming the file: it cannot be read as a CSV table, lacks a column or holds a number that
            does not parse.
    """
    try:
        return _read_metrics(folder / METRICS_FILE)
    except (OSError, UnicodeDecodeError, csv.Error) as err:  # the file itself is damaged, not one value
        raise ValueError(f"{folder / METRICS_FILE}: not a readable CSV table ({err})") from None


def _read_metrics(path: Path) -> tuple[list[Row], int]:
    folder = path.parent
    rows: list[Row] = []
    dropped = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
        for line, r in enumerate(reader, start=2):
            try:
                value = float(r["value"])
                epoch, step = int(r["epoch"]), int(r["step"])
            except ValueError as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
            if not math.isfinite(value):
                dropped += 1
                continue
            rows.append(Row((str(folder), r["run"], epoch), r["config"], r.get(PROTOCOL_COLUMN) or LEGACY_PROTOCOL,
                            r["seed"], step, r["category"], (r["class"], r["subclass"]), r["prompt_type"],
                            r["metric"], value))
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

    The reference layer has the width of SD 1.x's text encoder, and the adapter is built by the algorithm itself
    with the run's global hyperparameters (per-layer overrides aside). The count grows with dim for LoRA and LoHa
    and as the factor decreases for LoKr (the paper's two capacity knobs), and puts every algorithm on one scale.

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
    protocols: dict[str, list[str]] = {}
    for folder in folders:
        try:
            found, dropped = read_metrics(folder)
        except ValueError as err:  # names the file and what is wrong with it
            notes.append(str(err))
            log(f"skipped {notes[-1]}")
            continue
        if dropped:
            notes.append(f"{folder}: {dropped} non-finite value(s) left out")
        rows.extend(found)
        for protocol in sorted({r.protocol for r in found}):
            protocols.setdefault(protocol, []).append(str(folder))
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
    return Dataset(rows, configs, {r.checkpoint: CheckpointInfo(r.config, r.seed, r.step) for r in rows}, runs, notes,
                   protocols)


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


def category_name(category: str) -> str:
    """How a category reads in tables, titles and file names: the empty one gets a name."""
    return category or "(no category)"
