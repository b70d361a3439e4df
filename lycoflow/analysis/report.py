"""``lycoflow analyze RUN_DIRS... --out REPORT_DIR``: the analysis of evaluated runs (paper §5.3) into a folder.

It reads the ``metrics.csv`` (and ``config.yaml``) of each run folder and writes into REPORT_DIR:

- ``scores.csv`` (``config, epoch, category, prompt_type, metric, score``): the rank scores (see
  `lycoflow.analysis.scores`) averaged over the seeds and concepts of each category;
- ``configs.csv``: one line per configuration: its runs, seeds, algorithm, preset, capacity, learning rate and
  the label the plots and tables use;
- ``ranking_<criterion>.csv``: the configurations ranked by their mean score on a criterion (fidelity = image
  similarity and squared centroid distance, controllability = text–image similarity, diversity = Vendi score,
  preservation = style loss: the criteria of `lycoflow.metrics.specs`), one column per category, the paper's
  ranking table;
- ``scatter_<category>.png``: fidelity (squared centroid distance) vs diversity and fidelity (image similarity) vs
  controllability, one point per (configuration, epoch), error bars the standard errors across seeds and concepts
  (as in the paper's Figure 2);
- ``shap_<criterion>_<category>.png``: SHAP beeswarm charts of a CatBoost regressor that predicts a checkpoint's
  criterion score from its algorithm, preset, log2 capacity, log10 learning rate and step; needs catboost (which
  computes exact TreeSHAP values itself): ``pip install 'lycoflow[analysis]'``;
- ``report.html``: all of the above in one self-contained page (images embedded), with the runs read and the notes.

Criteria, plots and SHAP charts average over the prompt types the paper evaluates (train, trigger, alter,
style: not the concept-agnostic prompts) unless told otherwise; ``scores.csv`` keeps every prompt type.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from importlib import resources
from pathlib import Path
from string import Template

from lycoflow.cache import atomic_path
from lycoflow.metrics.specs import CRITERIA

from .plots import INSTALL_HINT, PANELS, beeswarm, palette, scatter, shap_available, shap_samples, shap_values
from .runs import CONFIG_FILE, REFERENCE_WIDTH, UNKNOWN, Dataset, category_name, load
from .scores import category_scores, ranking, score_rows, unit_scores

#: The paper leaves the concept-agnostic prompts out of its analysis (§5.2).
DEFAULT_PROMPT_TYPES = ("train", "trigger", "alter", "style")
SCORE_COLUMNS = ("config", "epoch", "category", "prompt_type", "metric", "score")
CONFIG_COLUMNS = ("config", "runs", "seeds", "algorithm", "preset", "capacity", "lr", "label")
#: The page, with the CSS; its ``${name}`` placeholders are filled by `analyze`.
TEMPLATE = "report.html"


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "none"


def _table_html(header: Sequence[str], lines: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return "" if value is None else html.escape(f"{value:.3f}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


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
        columns = [*map(category_name, categories), "mean"]
        _write_csv(out / f"ranking_{criterion}.csv", ["rank", "config", "label", *columns], lines)
        # The label first in the page: it is what a reader recognises.
        rankings.append(f"<h3>{criterion} ({', '.join(metrics)})</h3>" + _table_html(
            ["rank", "label", "config", *columns], ([r, lab, cfg, *rest] for r, cfg, lab, *rest in lines)))

    categories = sorted({r.category for r in data.rows})
    colours = palette(c.algorithm for c in data.configs.values())
    plots: list[str] = []
    charts: list[str] = []
    explaining = shap_available()
    if not explaining:
        notes.append(f"SHAP charts skipped: catboost is not installed ({INSTALL_HINT})")
        log(notes[-1])
    floats = [float(s) for s in scores]
    by_metric = {m: unit_scores(data.rows, floats, {m}, selected) for p in PANELS for m in (p[0], p[2])}
    for category in categories:
        png = scatter(data, by_metric, category, colours)
        if png is None:
            notes.append(f"no scatter plot for {category_name(category)}: no checkpoint has both scores of a panel")
            continue
        _write(out / f"scatter_{_slug(category_name(category))}.png", png)
        plots.append(_image_html(png, f"scatter plots of {category_name(category)}"))
    if explaining:
        charts = _shap_charts(data, floats, categories, selected, colours, out, notes)

    config_lines = [[c.label, c.digest, c.algorithm, c.preset, UNKNOWN if c.capacity is None else c.capacity,
                     UNKNOWN if c.lr is None else f"{c.lr:g}", ", ".join(sorted(c.seeds)), ", ".join(sorted(c.runs))]
                    for c in sorted(data.configs.values(), key=lambda c: c.label)]
    template = Template(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))
    page = template.substitute(
        run_count=len(data.runs),
        config_count=len(data.configs),
        checkpoint_count=len({r.checkpoint for r in data.rows}),
        categories=html.escape(", ".join(map(category_name, categories))),
        prompt_types=html.escape("all" if selected is None else ", ".join(sorted(selected))),
        notes="".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) or "<li>none</li>",
        rankings="".join(rankings),
        scatter_plots="".join(plots) or "<p>none</p>",
        shap_charts="".join(charts) or "<p>none</p>",
        configurations=_table_html(["label", "config", "algorithm", "preset",
                                    f"capacity (parameters on a {REFERENCE_WIDTH}² layer)", "lr", "seeds", "runs"],
                                   config_lines),
        runs="".join(f"<li>{html.escape(r)}</li>" for r in data.runs),
    )
    report = out / "report.html"
    _write(report, page.encode("utf-8"))
    log(f"wrote {report}")
    return report


def _shap_charts(data: Dataset, scores: Sequence[float], categories: Sequence[str],
                 prompt_types: Collection[str] | None, colours: dict[str, str], out: Path, notes: list[str]
                 ) -> list[str]:
    """One SHAP beeswarm chart per criterion and category, written to ``out``; their HTML."""
    charts = []
    for criterion, metrics in CRITERIA.items():
        units = unit_scores(data.rows, scores, metrics, prompt_types)
        for category in categories:
            features, targets, unknown = shap_samples(data, units.get(category, {}))
            name = f"{criterion}, {category_name(category)}"
            if unknown:
                notes.append(f"SHAP for {name}: {unknown} checkpoint(s) left out, their configuration has no "
                             f"{CONFIG_FILE} (features unknown)")
            if len(set(targets)) < 2:
                if targets or unknown:
                    notes.append(f"no SHAP chart for {name}: fewer than two distinct scores to explain")
                continue
            png = beeswarm(shap_values(features, targets), features,
                           f"{name}: {len(targets)} checkpoints", colours)
            _write(out / f"shap_{criterion}_{_slug(category_name(category))}.png", png)
            charts.append(_image_html(png, f"SHAP beeswarm of {name}"))
    return charts


def main(argv: list[str] | None = None) -> int:
    """``lycoflow analyze RUN_DIRS... --out REPORT_DIR``: 0 when the report was written, 2 (a user error, as for
    bad arguments and every other lycoflow command) when there was nothing to analyse or a file was damaged."""
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
        return 2
    print(f"lycoflow analyze: report in {report}")
    return 0
