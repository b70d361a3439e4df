"""The metrics table, ``<run>/metrics.csv``: one row per (checkpoint, concept, prompt type, metric), in the columns
of `lycoflow.metrics.COLUMNS`; and `config_id`, its ``config`` column."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import MOVED
from ..cache import atomic_path
from ..metrics import COLUMNS
from .measuring import ConceptValues

# Recipe keys that differ between the seeds of one configuration (left out of its config id).
_SEED_KEYS = (("model", "seed"), ("data", "init_args", "seed"), ("trainer", "default_root_dir"))


def table_rows(values: Iterable[ConceptValues], run: str, config: str, protocol: str, seed: int, epoch: int,
               step: int) -> list[dict[str, object]]:
    """The rows of one checkpoint's values."""
    return [{"run": run, "config": config, "protocol": protocol, "seed": seed, "epoch": epoch, "step": step,
             "category": concept.prompt.category, "class": concept.prompt.class_name,
             "subclass": concept.prompt.subclass, "prompt_type": concept.prompt.prompt_type, "metric": metric,
             "value": value}
            for concept in values for metric, value in concept.values.items()]


def write_metrics(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Add ``rows`` to the CSV table at ``path``, replacing earlier rows of the same run and epoch (a resumed
    run re-evaluating an epoch), atomically."""
    kept: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            done = {(str(r["run"]), str(r["epoch"])) for r in rows}
            kept = [r for r in csv.DictReader(f) if (r["run"], r["epoch"]) not in done]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows(rows)


#: What `summary` shows, criterion by criterion: (column, metric, prompt type). Diversity is Vendi on the trigger
#: prompt, as the paper's analysis reads it (its scatter and SHAP targets): alter scores one Vendi per prompt, and a
#: short evaluation has one image per alter prompt, whose Vendi is always 1.
SUMMARY_COLUMNS = (
    ("fidelity", "image_similarity", "trigger"), ("controllability", "text_image_similarity", "alter"),
    ("diversity", "vendi_score", "trigger"), ("style loss", "style_loss", "style"),
)


def summary(path: Path, run: str) -> str:
    """One line per evaluated epoch of ``run`` in the metrics table at ``path``: each `SUMMARY_COLUMNS` metric on
    its prompt type, averaged over the subclasses of each class, then over the classes (as the analysis does)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == run]
    epochs = sorted({int(r["epoch"]) for r in rows})
    header = ["epoch", *(f"{name} ({metric}, {kind})" for name, metric, kind in SUMMARY_COLUMNS)]
    lines = [header]
    for epoch in epochs:
        cells = [f"{epoch} (base)" if epoch == 0 else str(epoch)]
        for _, metric, kind in SUMMARY_COLUMNS:
            leaves: dict[tuple[str, str], list[float]] = {}
            for r in rows:
                if int(r["epoch"]) == epoch and r["metric"] == metric and r["prompt_type"] == kind:
                    leaves.setdefault((r["category"], r["class"]), []).append(float(r["value"]))
            means = [sum(v) / len(v) for v in leaves.values()]
            cells.append(f"{sum(means) / len(means):.3f}" if means else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def config_id(recipe: str | None) -> str:
    """A short digest of the resolved recipe without its seeds and run folder: one id per configuration."""
    if not recipe:
        return "unnamed"
    # Only what is built counts: fit's own options (ckpt_path on a resume, ...) do not change the configuration.
    config = {k: _old_class_paths(v) for k, v in (yaml.safe_load(recipe) or {}).items()
              if k in ("model", "data", "trainer")}
    for path in _SEED_KEYS:
        node = config
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    model = config.get("model")
    if isinstance(model, dict) and model.get("max_token_length") == 75:  # the length every run had before the option
        model.pop("max_token_length")
    # SDXL's second encoder, zero terminal SNR, the 8-bit base: unset, as runs had them before the options.
    for key in ("text_encoder_2_adapter", "text_encoder_2_lr", "zero_terminal_snr", "quantize_base"):
        if isinstance(model, dict) and key in model and model[key] is None:
            model.pop(key)
    if isinstance(model, dict):  # compiling changes how, not what, is computed: runs with and without are one
        model.pop("compile", None)
    for adapter in ("adapter", "text_encoder_adapter"):
        node = model.get(adapter) if isinstance(model, dict) else None
        init = node.get("init_args") if isinstance(node, dict) else None
        # Without DoRA the orientation of its magnitudes builds nothing: runs recorded before the option
        # existed stay one configuration with today's.
        if isinstance(init, dict) and not init.get("weight_decompose"):
            init.pop("dora_on_output", None)
        # train_norm unset means "as the preset says": no norms but for preset full, what runs recorded before the
        # option did too (their full-preset runs trained no norms, so those keep a different id).
        if isinstance(init, dict) and init.get("train_norm", False) is None and init.get("preset") != "full":
            init.pop("train_norm")
    trainer = config.get("trainer")
    logger = trainer.get("logger") if isinstance(trainer, dict) else None
    init = logger.get("init_args") if isinstance(logger, dict) else None
    if isinstance(init, dict):  # how long W&B may take to start trains nothing (and came after runs were recorded)
        init.pop("init_timeout", None)
    callbacks = (trainer.get("callbacks") or []) if isinstance(trainer, dict) else []
    for callback in callbacks:
        init = callback.get("init_args") if isinstance(callback, dict) else None
        # Evaluating the base as epoch 0 trains nothing and changes no other epoch's numbers (and came after runs
        # were recorded): runs with and without it are one configuration.
        if isinstance(init, dict) and str(callback.get("class_path", "")).endswith(".Evaluation"):
            init.pop("base", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _old_class_paths(node: Any) -> Any:
    """``node`` with every ``class_path`` in a moved module named by its old module (`lycoflow.MOVED`): runs
    recorded before and after the move are one configuration."""
    if isinstance(node, list):
        return [_old_class_paths(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _old_class_paths(value) for key, value in node.items()}
    path = out.get("class_path")
    if isinstance(path, str):
        out["class_path"] = next((old + path[len(new):] for old, new in MOVED.items()
                                  if path.startswith(new + ".")), path)
    return out
