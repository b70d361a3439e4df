"""``lycoflow analyze RUN_DIRS... --out REPORT_DIR``: the analysis of evaluated runs (paper §5.3) into a folder.

It reads the ``metrics.csv`` (and ``config.yaml``) of each run folder; the runs must all have been measured with
one evaluation protocol (the ``protocol`` column; files without it are ``generic``), since ranks are only
comparable within one. It writes into REPORT_DIR:

- ``scores.csv`` (``config, epoch, category, prompt_type, metric, score``): the rank scores (see
  `lycoflow.analysis.scores`) averaged over each category's seeds and classes, a class's subclasses first;
- ``configs.csv``: one line per configuration: its runs, seeds, algorithm, preset, capacity, learning rate and
  the label the plots and tables use;
- ``ranking_<criterion>.csv``: the configurations ranked by their mean score on a criterion (fidelity = image
  similarity and squared centroid distance, controllability = text–image similarity, diversity = Vendi score,
  preservation = style loss: the criteria of `lycoflow.metrics.specs`), one column per category, the paper's
  ranking table;
- ``scatter_<category>.png``: fidelity (squared centroid distance) vs diversity and fidelity (image similarity) vs
  controllability, one point per (configuration, epoch), error bars the standard errors across seeds and classes;
- ``shap_<criterion>_<category>.png``: SHAP beeswarm charts of a CatBoost regressor that predicts a checkpoint's
  criterion score from its algorithm, preset, log2 capacity, log10 learning rate and step; needs catboost (which
  computes exact TreeSHAP values itself): ``pip install 'lycoflow[analysis]'``;
- ``report.html``: all of the above in one self-contained page (images embedded), with the runs read and the notes.

Criteria, plots and SHAP charts average over the prompt types the paper evaluates (train, trigger, alter,
style: not the concept-agnostic prompts) unless told otherwise; ``scores.csv`` keeps every prompt type.

Runs measured with the paper's protocol (`lycoflow.analysis.paper`) get the paper's own analysis too, the main
part of report.html (the criterion means above follow it as an extra section):

- ``paper_scatter_<category>_epoch<N>.png``: the paper's three panels at epoch N (``--epoch``; by default the latest
  evaluated epoch up to 30), one point per configuration, error bars the standard errors across seeds and classes;
- ``paper_shap_<metric>_<prompt type>_<category>.png``: SHAP charts of the paper's six targets with its features
  and CatBoost settings (needs catboost).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template

from lycoflow.cache import atomic_path
from lycoflow.metrics.specs import CRITERIA

from .paper import (
    ADAPTER_LRS,
    CAPACITY_LEVELS,
    NATIVE,
    NATIVE_CAPACITY_LEVEL,
    NATIVE_LRS,
    PAPER_CATBOOST,
    PAPER_LATEST_EPOCH,
    PAPER_PANELS,
    PAPER_PROTOCOL,
    PAPER_SHAP,
    PAPER_TARGETS,
    at_epoch,
    default_epoch,
    off_grid,
)
from .plots import (
    GENERIC_SHAP,
    INSTALL_HINT,
    PANELS,
    Measure,
    Panel,
    ShapSetup,
    Units,
    beeswarm,
    palette,
    scatter,
    shap_available,
    shap_samples,
    shap_values,
)
from .runs import CONFIG_FILE, REFERENCE_WIDTH, UNKNOWN, Dataset, category_name, load
from .scores import category_scores, ranking, score_rows, unit_scores

#: The paper leaves the concept-agnostic prompts out of its analysis (§5.2).
DEFAULT_PROMPT_TYPES = ("train", "trigger", "alter", "style")
SCORE_COLUMNS = ("config", "epoch", "category", "prompt_type", "metric", "score")
CONFIG_COLUMNS = ("config", "runs", "seeds", "algorithm", "preset", "capacity", "lr", "label")
#: The page, with the CSS; its ``${name}`` placeholders are filled by `analyze`.
TEMPLATE = "report.html"
#: The scatter plots' standard errors, in their titles.
SPREAD = "scores (1 = best), standard errors across seeds and classes"
#: What comes before the criterion means in a paper-protocol report.
CRITERIA_INTRO = ("<h2>Beyond the paper: criterion means</h2><p>lycoflow's own summary of the same scores: each "
                  "criterion's metrics and the prompt types analysed averaged, over every epoch.</p>")


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
            epochs: Sequence[int] | None = None, log: Callable[[str], None] = print) -> Path:
    """Analyse the evaluated runs in ``run_dirs`` (run folders, or folders of run folders) into ``out``.

    Args:
        run_dirs: run folders (with a metrics.csv), or parent folders whose subfolders are searched one level down.
        out: the report folder (created); see the module's docstring for what it receives.
        prompt_types: the prompt types the criteria (rankings, plots, SHAP) average over; None: all.
            scores.csv keeps every prompt type, and the paper's panels and SHAP targets name their own.
        epochs: the epochs of the paper protocol's panels, one set each (None: `default_epoch`); other protocols
            have no such panels and note that they were not used.
        log: receives one line per run read, folder skipped and missing optional package, and the report's path.

    Returns:
        The path of report.html.

    Raises:
        ValueError: no metric values were found, the runs were measured with more than one protocol, or an epoch
            asked for was not evaluated.
    """
    data = load([Path(p) for p in run_dirs], log)
    if not data.rows:
        raise ValueError(f"no metric values found in {', '.join(map(str, run_dirs))} (nor one level down)")
    protocol = _protocol(data)
    paper = protocol == PAPER_PROTOCOL
    panel_epochs = _panel_epochs(sorted({r.checkpoint[2] for r in data.rows}), epochs) if paper else []
    out.mkdir(parents=True, exist_ok=True)
    notes = data.notes
    if epochs and not paper:
        notes.append(f"epoch(s) {', '.join(map(str, epochs))} not used: only the {PAPER_PROTOCOL} protocol's panels "
                     f"show one epoch, these runs were measured with the {protocol} protocol")
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
    explaining = shap_available()
    if not explaining:
        notes.append(f"SHAP charts skipped: catboost is not installed ({INSTALL_HINT})")
        log(notes[-1])
    floats = [float(s) for s in scores]
    plots, charts = _criterion_charts(data, floats, categories, selected, colours, explaining, out, notes)
    paper_html = (_paper_analysis(data, floats, categories, panel_epochs, colours, explaining, out, notes)
                  if paper else "")

    config_lines = [[c.label, c.digest, c.algorithm, c.preset, UNKNOWN if c.capacity is None else c.capacity,
                     UNKNOWN if c.lr is None else f"{c.lr:g}", ", ".join(sorted(c.seeds)), ", ".join(sorted(c.runs))]
                    for c in sorted(data.configs.values(), key=lambda c: c.label)]
    template = Template(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))
    page = template.substitute(
        run_count=len(data.runs),
        config_count=len(data.configs),
        checkpoint_count=len({r.checkpoint for r in data.rows}),
        protocol=html.escape(protocol),
        categories=html.escape(", ".join(map(category_name, categories))),
        prompt_types=html.escape("all" if selected is None else ", ".join(sorted(selected))),
        notes="".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) or "<li>none</li>",
        paper_analysis=paper_html,
        criteria_intro=CRITERIA_INTRO if paper else "",
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


def _protocol(data: Dataset) -> str:
    """The one evaluation protocol the rows were measured with.

    Raises:
        ValueError: naming each protocol and its runs, when there are several: a rank compares checkpoints measured
            the same way, and different protocols measure differently (prompts, encoders, image counts).
    """
    if len(data.protocols) == 1:
        return next(iter(data.protocols))
    listing = "; ".join(f"{protocol}: {', '.join(folders)}" for protocol, folders in sorted(data.protocols.items()))
    raise ValueError(f"the runs were measured with different evaluation protocols, whose ranks cannot be compared "
                     f"({listing}); analyse each protocol's runs on their own")


def _panel_epochs(evaluated: Sequence[int], asked: Sequence[int] | None) -> list[int]:
    """The epochs of the paper's panels: ``asked`` (each evaluated), else `default_epoch`.

    Raises:
        ValueError: an epoch asked for was not evaluated, naming the evaluated ones.
    """
    if not asked:
        return [default_epoch(evaluated)]
    missing = sorted(set(asked) - set(evaluated))
    if missing:
        raise ValueError(f"epoch(s) {', '.join(map(str, missing))} not evaluated: the runs have epoch(s) "
                         f"{', '.join(map(str, evaluated))}")
    return sorted(set(asked))


def _measure_units(data: Dataset, scores: Sequence[float], measures: Iterable[Measure],
                   prompt_types: Collection[str] | None) -> dict[Measure, dict[str, Units]]:
    """measure → its `unit_scores`: its metric alone, on its prompt type or else on ``prompt_types``."""
    return {m: unit_scores(data.rows, scores, {m.metric}, prompt_types if m.prompt_type is None else {m.prompt_type})
            for m in measures}


def _criterion_charts(data: Dataset, scores: Sequence[float], categories: Sequence[str],
                      prompt_types: Collection[str] | None, colours: dict[str, str], explaining: bool, out: Path,
                      notes: list[str]) -> tuple[list[str], list[str]]:
    """The criterion means' scatter plots (`PANELS`, every epoch) and SHAP charts (`GENERIC_SHAP`, one per
    criterion) of each category, written to ``out``; their HTML."""
    by_measure = _measure_units(data, scores, [m for panel in PANELS for m in panel], prompt_types)
    plots = [html for category in categories
             for html in _scatter_chart(data, PANELS, by_measure, category, colours, category_name(category),
                                        out / f"scatter_{_slug(category_name(category))}.png", notes)]
    if not explaining:
        return plots, []
    targets = [(criterion, f"shap_{criterion}", unit_scores(data.rows, scores, metrics, prompt_types))
               for criterion, metrics in CRITERIA.items()]
    return plots, _shap_charts(data, targets, GENERIC_SHAP, categories, colours, out, notes)


def _scatter_chart(data: Dataset, panels: Sequence[Panel], units: Mapping[Measure, dict[str, Units]],
                   category: str, colours: dict[str, str], name: str, path: Path, notes: list[str],
                   what: str = "scatter plots") -> list[str]:
    """One category's scatter panels written to ``path``: its HTML, or nothing (and a note) when no point has
    both scores of a panel."""
    png = scatter(data, panels, units, category, colours, f"{name}: {SPREAD}")
    if png is None:
        notes.append(f"no {what} for {name}: no checkpoint has both scores of a panel")
        return []
    _write(path, png)
    return [_image_html(png, f"{what} of {name}")]


def _shap_charts(data: Dataset, targets: Sequence[tuple[str, str, Mapping[str, Units]]], setup: ShapSetup,
                 categories: Sequence[str], colours: dict[str, str], out: Path, notes: list[str]) -> list[str]:
    """One SHAP beeswarm chart per target and category, written to ``out``; their HTML.

    Args:
        targets: (name in titles and notes, file name prefix, `unit_scores` by category) of each target.
    """
    charts = []
    for target, prefix, units in targets:
        for category in categories:
            features, values, unknown = shap_samples(data, units.get(category, {}), setup)
            name = f"{target}, {category_name(category)}"
            if unknown:
                notes.append(f"SHAP for {name}: {unknown} checkpoint(s) left out, their configuration has no "
                             f"{CONFIG_FILE} (features unknown)")
            if len(set(values)) < 2:
                if values or unknown:
                    notes.append(f"no SHAP chart for {name}: fewer than two distinct scores to explain")
                continue
            png = beeswarm(shap_values(features, values, setup), features, setup.features,
                           f"{name}: {len(values)} checkpoints", colours)
            _write(out / f"{prefix}_{_slug(category_name(category))}.png", png)
            charts.append(_image_html(png, f"SHAP beeswarm of {name}"))
    return charts


def _paper_method_html() -> str:
    """How the paper's SHAP charts are computed, from the definitions themselves, with the caveat of CatBoost's
    categorical features."""
    capacity = "; ".join(f"{algorithm} {setting} " + ", ".join(f"{v:g}→{level}" for v, level in levels.items())
                         for algorithm, (setting, levels) in CAPACITY_LEVELS.items())
    settings = ", ".join(f"{k}={v!r}" for k, v in PAPER_CATBOOST.items() if k not in ("verbose", "allow_writing_files"))
    lrs = ", ".join(f"{lr:g}" for lr in ADAPTER_LRS)
    return (f"<p>One sample per (configuration, seed, step), its target the score averaged over the category's "
            f"classes; features: {html.escape(', '.join(PAPER_SHAP.features))}. Capacity level: "
            f"{html.escape(capacity)}; native fine-tuning ({NATIVE}) {NATIVE_CAPACITY_LEVEL}. Learning-rate level "
            f"1–3 over {lrs} ({NATIVE}: {', '.join(f'{lr:g}' for lr in NATIVE_LRS)}). A value outside the paper's "
            f"grid is unknown (NaN, below every level for nan_mode 'Min'; see the notes). "
            f"CatBoostRegressor({html.escape(settings)}) with algorithm and preset as native categorical features, "
            f"as the paper ran it.</p><p class=\"note\">Caveat: CatBoost encodes categorical features by target "
            f"statistics that it computes in a different order while training than when explaining, which shifts "
            f"the SHAP values of algorithm and preset by a spurious amount; the criterion charts below one-hot "
            f"encode them instead.</p>")


def _paper_analysis(data: Dataset, scores: Sequence[float], categories: Sequence[str], epochs: Sequence[int],
                    colours: dict[str, str], explaining: bool, out: Path, notes: list[str]) -> str:
    """The paper's panels at each of ``epochs`` and its SHAP charts, written to ``out``; their section of the page."""
    units = _measure_units(data, scores, [m for panel in PAPER_PANELS for m in panel], None)
    plots: list[str] = []
    for epoch in epochs:
        shown = {m: {c: at_epoch(u, epoch) for c, u in by_category.items()} for m, by_category in units.items()}
        for category in categories:
            plots += _scatter_chart(data, PAPER_PANELS, shown, category, colours,
                                    f"{category_name(category)}, epoch {epoch}",
                                    out / f"paper_scatter_{_slug(category_name(category))}_epoch{epoch}.png", notes,
                                    "paper scatter panels")
    charts: list[str] = []
    if explaining:
        for config in sorted(data.configs.values(), key=lambda c: c.label):
            if config.known and (unknown := off_grid(config)):
                notes.append(f"paper SHAP: {config.label} ({config.digest}) is outside the paper's grid: "
                             f"{' and '.join(unknown)} unknown (NaN, which nan_mode 'Min' places below every level)")
        targets = [(m.label, f"paper_shap_{m.metric}_{m.prompt_type}", by_category)
                   for m, by_category in _measure_units(data, scores, PAPER_TARGETS, None).items()]
        charts = _shap_charts(data, targets, PAPER_SHAP, categories, colours, out, notes)
    return (f"<h2>The paper's analysis (§5.3, Figure 2)</h2><h3>Scatter panels, epoch {', '.join(map(str, epochs))}"
            f"</h3><p>Each panel is one metric on one prompt type at one epoch (by default the latest evaluated one up "
            f"to {PAPER_LATEST_EPOCH}, the later epoch of the paper's Figure 2; <code>--epoch</code> chooses); one "
            f"point per configuration, coloured by algorithm; error bars the standard errors across seeds and "
            f"classes.</p>{''.join(plots) or '<p>none</p>'}"
            f"<h3>SHAP (CatBoost, the paper's settings)</h3>{_paper_method_html()}"
            f"{''.join(charts) or '<p>none</p>'}")


def main(argv: list[str] | None = None) -> int:
    """``lycoflow analyze RUN_DIRS... --out REPORT_DIR``: 0 when the report was written, 2 (a user error, as for
    bad arguments and every other lycoflow command) when there was nothing to analyse, a file was damaged, the runs
    mix evaluation protocols or an epoch asked for was not evaluated."""
    parser = argparse.ArgumentParser(
        prog="lycoflow analyze",
        description="Rank scores, ranking tables, scatter plots and SHAP charts of evaluated runs (paper §5.3).")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIRS",
                        help="run folders (with a metrics.csv), or folders holding run folders")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="where the report goes")
    parser.add_argument("--prompt-types", nargs="+", default=list(DEFAULT_PROMPT_TYPES), metavar="TYPE",
                        help="prompt types the criteria average over ('all': every one; default: %(default)s)")
    parser.add_argument("--epoch", nargs="+", type=int, dest="epochs", metavar="N",
                        help="the epoch(s) of the paper's scatter panels, for runs measured with the paper protocol "
                             "(default: the latest evaluated epoch up to 30, the later epoch of the paper's Figure 2)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    prompt_types = None if args.prompt_types == ["all"] else args.prompt_types
    try:
        report = analyze(args.run_dirs, args.out, prompt_types=prompt_types, epochs=args.epochs)
    except ValueError as err:
        print(f"lycoflow analyze: error: {err}", file=sys.stderr)
        return 2
    print(f"lycoflow analyze: report in {report}")
    return 0
