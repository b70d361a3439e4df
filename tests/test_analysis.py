"""lycoflow analyze on real files: a synthetic metrics table whose rank scores are worked out by hand.

Three configurations (LoRA, LoHa, LoKr) × 2 seeds × 2 epochs = 12 checkpoints, numbered k = 4c + 2s + (e − 1), are
measured on the category "toys" (classes bear and cat/tabby); one checkpoint alone is also measured on "sky", the
n = 1 case. Each metric's values are chosen so that its scores have a closed form (see `expected_scores`). These
files have no ``protocol`` column (written before it existed): they read as the generic protocol.

The paper protocol's runs (`write_paper_runs`) are four configurations × 2 seeds × epochs 10, 30, 50 on "toys" with
a class of two subclasses; the averaging, panel points, levels and SHAP samples are also checked on hand-made
tables.
"""

import csv
import html
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from lycoflow.analysis import (
    INSTALL_HINT,
    PAPER_PANELS,
    PAPER_SHAP,
    PAPER_TARGETS,
    CheckpointInfo,
    Config,
    Dataset,
    Row,
    analyze,
    capacity_level,
    category_scores,
    default_epoch,
    lr_level,
    main,
    panel_points,
    rank_scores,
    read_features,
    read_metrics,
    shap_samples,
    unit_scores,
)
from lycoflow.analysis.paper import at_epoch
from lycoflow.analysis.plots import shap_available

#: metrics.csv as lycoflow.evaluation.write_metrics wrote it before the ``protocol`` column.
COLUMNS = ("run", "config", "seed", "epoch", "step", "category", "class", "subclass", "prompt_type", "metric",
           "value")
#: metrics.csv with the protocol each row was measured with.
PROTOCOL_COLUMNS = ("run", "config", "protocol", *COLUMNS[2:])
#: (config digest, adapter class path, adapter arguments, lr, trainable parameters on a 768×768 layer).
CONFIGS = [
    ("cfg-lora", "lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp"}, 1e-4, 2 * 768 * 8),
    ("cfg-loha", "lycoris.LoHa", {"dim": 2, "alpha": 1, "preset": "attn-mlp"}, 1e-4, 4 * 768 * 2),
    ("cfg-lokr", "lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-only"}, 5e-4, 8**2 + 96**2),
]
LABELS = {"cfg-lora": "LoRA", "cfg-loha": "LoHa", "cfg-lokr": "LoKr"}
CONCEPTS = [("bear", ""), ("cat", "tabby")]
SHAP_CHARTS = [f"shap_{c}_toys.png" for c in ("fidelity", "controllability", "diversity", "preservation")]


def checkpoint_rows(c: int, s: int, e: int) -> list[dict[str, object]]:
    """The metrics of configuration c, seed s, epoch e."""
    k = 4 * c + 2 * s + (e - 1)
    digest = CONFIGS[c][0]
    context = {"run": f"{digest}-s{s}", "config": digest, "seed": s, "epoch": e, "step": 10 * e, "category": "toys"}
    rows = []
    for cls, subclass in CONCEPTS:
        values = [
            ("trigger", "image_similarity", k / 100),  # all distinct, ascending in k
            ("trigger", "squared_centroid_distance", c / 100),  # lower is better; a configuration's 4 tie
            ("trigger", "text_image_similarity", (0.3, 0.3, 0.2)[c]),  # LoRA and LoHa tie
            ("agnostic", "text_image_similarity", (0.1, 0.2, 0.3)[c]),
            ("trigger", "vendi_score", 1.0 + k if cls == "bear" else float(e)),  # cat: epochs tie
            ("style", "style_loss", (1.0, 2.0, 2.0)[c]),  # lower is better, LoHa and LoKr tie
        ]
        rows += [{**context, "class": cls, "subclass": subclass, "prompt_type": p, "metric": m, "value": v}
                 for p, m, v in values]
    if (c, s, e) == (2, 0, 2):
        rows.append({**context, "category": "sky", "class": "moon", "subclass": "", "prompt_type": "trigger",
                     "metric": "image_similarity", "value": 0.9})
    return rows


def expected_scores() -> dict[tuple[str, str, str, str, str], Fraction]:
    """(config, epoch, category, prompt type, metric) → score, by hand: among 12 checkpoints, rank r scores
    (r − 1)/11; averaging over the two seeds (k and k + 2) and the two concepts gives the closed forms."""
    out = {}
    for c, (digest, *_) in enumerate(CONFIGS):
        for e in (1, 2):
            key = (digest, str(e), "toys")
            out[key + ("trigger", "image_similarity")] = Fraction(4 * c + e, 11)
            # Worst first: LoKr ×4 on ranks 1–4 (mean 2.5), LoHa on 5–8 (mean 6.5), LoRA on 9–12 (mean 10.5).
            out[key + ("trigger", "squared_centroid_distance")] = Fraction(19 - 8 * c, 22)
            # 0.2 ×4 take ranks 1–4 (mean 2.5), 0.3 ×8 take ranks 5–12 (mean 8.5).
            out[key + ("trigger", "text_image_similarity")] = Fraction(15, 22) if c < 2 else Fraction(3, 22)
            out[key + ("agnostic", "text_image_similarity")] = (Fraction(3, 22), Fraction(1, 2), Fraction(19, 22))[c]
            # bear: (4c + e)/11; cat: epoch 1 ties on ranks 1–6 (5/22), epoch 2 on ranks 7–12 (17/22).
            out[key + ("trigger", "vendi_score")] = Fraction(8 * c + (7 if e == 1 else 21), 44)
            # Worst first: 2.0 ×8 on ranks 1–8 (mean 4.5), 1.0 ×4 on ranks 9–12 (mean 10.5).
            out[key + ("style", "style_loss")] = Fraction(19, 22) if c == 0 else Fraction(7, 22)
    out["cfg-lokr", "2", "sky", "trigger", "image_similarity"] = Fraction(1, 2)  # alone: n = 1
    return out


def write_metrics(folder: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = COLUMNS) -> None:
    """``folder``/metrics.csv with ``rows`` (created with its parents)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_recipe(folder: Path, class_path: str, init_args: dict[str, object], lr: float, seed: int = 0) -> None:
    """``folder``/config.yaml as a run's resolved recipe has the adapter and learning rate."""
    recipe = {"seed_everything": seed, "model": {"adapter": {"class_path": class_path, "init_args": init_args},
                                                 "lr": lr}}
    (folder / "config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")


def write_runs(root: Path, with_config: bool = True) -> list[Path]:
    """The 6 run folders (configuration × seed), each with metrics.csv for epochs 1 and 2 and config.yaml."""
    folders = []
    for c, (digest, class_path, init_args, lr, _) in enumerate(CONFIGS):
        for s in (0, 1):
            folder = root / f"{digest}-s{s}"
            write_metrics(folder, [row for e in (1, 2) for row in checkpoint_rows(c, s, e)])
            if with_config:
                write_recipe(folder, class_path, init_args, lr, s)
            folders.append(folder)
    return folders


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_rank_scores():
    assert rank_scores([3.0, 1.0, 2.0]) == [1, 0, Fraction(1, 2)]
    assert rank_scores([3.0, 1.0, 2.0], lower_is_better=True) == [0, 1, Fraction(1, 2)]
    # Ranks 1.5, 1.5, 3, 4 out of 4.
    assert rank_scores([1.0, 1.0, 2.0, 3.0]) == [Fraction(1, 6), Fraction(1, 6), Fraction(2, 3), 1]
    assert rank_scores([5.0, 5.0]) == [Fraction(1, 2), Fraction(1, 2)]
    assert rank_scores([7.0]) == [Fraction(1, 2)]


def test_analyze(tmp_path):
    runs = write_runs(tmp_path / "runs")
    lines: list[str] = []
    report = analyze(runs, tmp_path / "report", log=lines.append)
    out = tmp_path / "report"
    assert report == out / "report.html"

    table = read_csv(out / "scores.csv")
    assert table[0] == ["config", "epoch", "category", "prompt_type", "metric", "score"]
    expected = expected_scores()
    assert [tuple(line[:5]) for line in table[1:]] == sorted(expected, key=lambda k: (*k[:1], int(k[1]), *k[2:]))
    assert {tuple(line[:5]): float(line[5]) for line in table[1:]} == {k: float(v) for k, v in expected.items()}

    configs = {line[0]: line for line in read_csv(out / "configs.csv")[1:]}
    assert read_csv(out / "configs.csv")[0] == ["config", "runs", "seeds", "algorithm", "preset", "capacity", "lr",
                                                "label"]
    for digest, class_path, init_args, lr, parameters in CONFIGS:
        assert configs[digest] == [digest, f"{digest}-s0;{digest}-s1", "0;1", class_path.split(".")[1],
                                   init_args["preset"], str(parameters), str(lr), LABELS[digest]]

    # Diversity per configuration: the mean of its two epochs, (4c + 7)/22; LoKr best.
    diversity = read_csv(out / "ranking_diversity.csv")
    assert diversity[0] == ["rank", "config", "label", "toys", "mean"]
    assert [(line[1], float(line[3])) for line in diversity[1:]] == [
        ("cfg-lokr", float(Fraction(15, 22))), ("cfg-loha", float(Fraction(11, 22))),
        ("cfg-lora", float(Fraction(7, 22)))]
    # The agnostic prompts stay out by default: LoHa and LoRA tie (ordered by label), LoKr last.
    controllability = read_csv(out / "ranking_controllability.csv")
    assert [(line[0], line[2], float(line[4])) for line in controllability[1:]] == [
        ("1", "LoHa", float(Fraction(15, 22))), ("2", "LoRA", float(Fraction(15, 22))),
        ("3", "LoKr", float(Fraction(3, 22)))]
    fidelity = read_csv(out / "ranking_fidelity.csv")
    assert fidelity[0] == ["rank", "config", "label", "sky", "toys", "mean"]
    assert {line[1]: line[3] for line in fidelity[1:]} == {"cfg-lokr": "0.5", "cfg-loha": "", "cfg-lora": ""}

    page = report.read_text(encoding="utf-8")
    for digest, label in LABELS.items():
        assert digest in page and label in page
    assert (out / "scatter_toys.png").stat().st_size > 1000
    assert not (out / "scatter_sky.png").exists()  # one point, and no scores to pair it with
    assert 'src="data:image/png;base64,' in page
    assert all(str(run) in page for run in runs)
    assert any(line.startswith("read ") for line in lines) and lines[-1] == f"wrote {report}"
    # Files without the protocol column are the generic protocol's: no paper analysis.
    assert "measured with the generic evaluation protocol" in page
    assert "The paper's analysis" not in page
    assert not list(out.glob("paper_*"))
    # catboost comes with the dev extra (lycoflow[analysis]); its absence is tested below.
    if not shap_available():
        pytest.skip(f"catboost is not installed ({INSTALL_HINT}): the SHAP charts are not checked")
    for chart in SHAP_CHARTS:
        assert (out / chart).stat().st_size > 1000
    assert "no SHAP chart for fidelity, sky" in page


def test_main_with_a_parent_folder(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    (tmp_path / "runs" / "crashed").mkdir()  # a run folder with nothing evaluated
    (tmp_path / "empty").mkdir()
    # A `lycoflow evaluate` output without the recipe: its configuration's features are unknown.
    evaluated = tmp_path / "runs" / "eval-adapter"
    write_metrics(evaluated, [{**r, "run": "eval-adapter", "config": "cfg-eval"} for r in checkpoint_rows(0, 0, 1)])

    assert main([str(tmp_path / "runs"), str(tmp_path / "empty"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {tmp_path / 'runs' / 'crashed'}: no metrics.csv" in printed
    assert f"skipped {tmp_path / 'empty'}: no metrics.csv in it or in its subfolders" in printed
    assert printed.count("\nread ") + printed.startswith("read ") == 7
    configs = {line[0]: line for line in read_csv(tmp_path / "report" / "configs.csv")[1:]}
    assert configs["cfg-eval"][3:7] == ["?", "?", "?", "?"]
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert f"{tmp_path / 'empty'}: no metrics.csv in it or in its subfolders" in page
    assert "(no config.yaml: features unknown)" in page
    assert "1 checkpoint(s) left out, their configuration has no config.yaml" in page


def test_main_without_runs(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "no metric values found" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_damaged_metrics_file_is_named(tmp_path, capsys):
    for name, content in (("binary", b"\xb9\x00\xff" * 50), ("columns", b"run,value\na,1\n"),
                          ("number", ",".join(COLUMNS).encode() + b"\na,b,0,one,1,c,d,,train,vendi_score,2\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_bytes(content)
    assert main([str(tmp_path / n) for n in ("binary", "columns", "number")] + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr()
    printed = err.out + err.err
    assert f"skipped {tmp_path / 'binary' / 'metrics.csv'}: not a readable CSV table" in printed
    assert f"skipped {tmp_path / 'columns' / 'metrics.csv'} lacks the column(s) config" in printed
    assert f"skipped {tmp_path / 'number' / 'metrics.csv'}, line 2: invalid literal for int()" in printed


def test_without_the_optional_dependencies(tmp_path, monkeypatch):
    runs = write_runs(tmp_path / "runs")
    monkeypatch.setitem(sys.modules, "catboost", None)  # import catboost now raises ImportError
    report = analyze(runs, tmp_path / "no-catboost", prompt_types=None, log=lambda _: None)
    page = html.unescape(report.read_text(encoding="utf-8"))
    assert f"SHAP charts skipped: catboost is not installed ({INSTALL_HINT})" in page
    assert not list((tmp_path / "no-catboost").glob("shap_*.png"))
    # Every prompt type: controllability is the mean of trigger and agnostic.
    controllability = read_csv(tmp_path / "no-catboost" / "ranking_controllability.csv")
    assert [(line[2], float(line[4])) for line in controllability[1:]] == [
        ("LoHa", float(Fraction(13, 22))), ("LoKr", float(Fraction(11, 22))), ("LoRA", float(Fraction(9, 22)))]
    assert (tmp_path / "no-catboost" / "scatter_toys.png").stat().st_size > 1000


@pytest.mark.parametrize(("class_path", "init_args", "parameters"), [
    ("lycoris.LoKr", {"factor": 4, "dim": 10000}, 4**2 + 192**2),
    ("lycoris.Full", {}, 768 * 768 + 768),
    ("mypackage.MyAdapter", {}, None),
])
def test_capacity(class_path, init_args, parameters):
    from lycoflow.analysis import capacity

    assert capacity(class_path, init_args)[0] == parameters


def test_import_without_torch():
    # `lycoflow analyze` reads tables: loading the package must not pull in the models' stack.
    code = "import lycoflow.analysis, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- The paper's averaging, panels and SHAP, on hand-made tables -------------------------------------------------


def leaf_row(config: str, seed: int, epoch: int, leaf: tuple[str, str], prompt_type: str, metric: str) -> Row:
    """A row of ``config``'s run of ``seed`` at ``epoch`` (step 100 per epoch) on the category "toys"; the value is
    not used (the tests give the scores)."""
    return Row((f"runs/{config}-s{seed}", f"{config}-s{seed}", epoch), config, "paper", str(seed), 100 * epoch,
               "toys", leaf, prompt_type, metric, 0.0)


def dataset(rows: list[Row], configs: list[Config]) -> Dataset:
    return Dataset(rows, {c.digest: c for c in configs},
                   {r.checkpoint: CheckpointInfo(r.config, r.seed, r.step) for r in rows}, [], [],
                   {"paper": sorted({r.checkpoint[0] for r in rows})})


def test_subclasses_are_averaged_into_their_class_first():
    # Class A has subclasses a1 and a2, class B none. Seed 0 scores a1 = a2 = 1, B = 0; seed 1 a1 = 0, a2 = 1/2,
    # B = 1. Class first: A = 1, B = 0, A = 1/4, B = 1, mean 9/16; each leaf equal would give 7/12.
    a1, a2, b = ("A", "a1"), ("A", "a2"), ("B", "")
    leaves = {0: {a1: Fraction(1), a2: Fraction(1), b: Fraction(0)},
              1: {a1: Fraction(0), a2: Fraction(1, 2), b: Fraction(1)}}
    rows = [leaf_row("cfg", seed, 1, leaf, "trigger", "vendi_score") for seed in leaves for leaf in leaves[seed]]
    scores = [leaves[int(r.seed)][r.concept] for r in rows]
    assert category_scores(rows, scores) == {("cfg", 1, "toys", "trigger", "vendi_score"): Fraction(9, 16)}
    assert sum(scores) / len(scores) == Fraction(7, 12)  # what each leaf weighing the same gives

    # A second metric measured on a1 alone (score 0): its class A is a1, and each unit averages the class's means
    # over the metrics (seed 0, A: (1 + 0)/2, not (1 + 1 + 0)/3).
    rows.append(leaf_row("cfg", 0, 1, a1, "trigger", "image_similarity"))
    scores.append(Fraction(0))
    units = unit_scores(rows, [float(x) for x in scores], {"vendi_score", "image_similarity"}, {"trigger"})
    checkpoint = {seed: (f"runs/cfg-s{seed}", f"cfg-s{seed}", 1) for seed in leaves}
    assert units == {"toys": {(checkpoint[0], "A"): 0.5, (checkpoint[0], "B"): 0.0, (checkpoint[1], "A"): 0.25,
                              (checkpoint[1], "B"): 1.0}}
    assert unit_scores(rows, [float(x) for x in scores], {"vendi_score"}, {"alter"}) == {}


def test_the_paper_panel_points():
    # X at epoch 30, image similarity (alter): seed 0 A = (1 + 0)/2, B = 1; seed 1 A = (1/2 + 1/2)/2, B = 0, so the
    # units 1/2, 1, 1/2, 0: mean 1/2, sample variance (1/4 + 1/4)/3 = 1/6, standard error √(1/6)/2 = √(1/24).
    # Its text similarity (alter) is 3/4 everywhere. Y has no text similarity: no point. Epoch 10 is not shown.
    x_measure, y_measure = PAPER_PANELS[0]
    a1, a2, b = ("A", "a1"), ("A", "a2"), ("B", "")
    x_scores = {0: {a1: 1.0, a2: 0.0, b: 1.0}, 1: {a1: 0.5, a2: 0.5, b: 0.0}}
    rows, scores = [], []
    for config in ("X", "Y"):
        for epoch in (10, 30):
            for seed, by_leaf in x_scores.items():
                for leaf, score in by_leaf.items():
                    rows.append(leaf_row(config, seed, epoch, leaf, "alter", "image_similarity"))
                    scores.append(score if epoch == 30 else 0.9)
                    if config == "X":
                        rows.append(leaf_row(config, seed, epoch, leaf, "alter", "text_image_similarity"))
                        scores.append(0.75)
                    rows.append(leaf_row(config, seed, epoch, leaf, "trigger", "text_image_similarity"))
                    scores.append(0.0)  # another prompt type: not in the panel
    data = dataset(rows, [Config("X", known=True, algorithm="LoRA"), Config("Y", known=True, algorithm="LoHa")])
    x = unit_scores(rows, scores, {x_measure.metric}, {x_measure.prompt_type})["toys"]
    y = unit_scores(rows, scores, {y_measure.metric}, {y_measure.prompt_type})["toys"]
    points = panel_points(data, at_epoch(x, 30), at_epoch(y, 30))
    assert points.keys() == {("X", 30)}
    (x_mean, x_se), (y_mean, y_se) = points["X", 30]
    assert (x_mean, y_mean, y_se) == (0.5, 0.75, 0.0)
    assert x_se == pytest.approx(math.sqrt(1 / 24), rel=1e-12)


def paper_config(digest: str, algorithm: str, lr: float, preset: str = "attn-mlp", **settings: object) -> Config:
    return Config(digest, known=True, algorithm=algorithm, preset=preset, lr=lr,
                  settings={**settings, "preset": preset, "lr": lr})


def without_nan(features: list[list[object]]) -> list[list[object]]:
    """NaN (never equal to itself) as None, so that samples compare."""
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in sample] for sample in features]


def test_the_paper_shap_samples():
    configs = [
        paper_config("lora", "LoRA", 5e-4, dim=8, alpha=4),
        paper_config("lokr", "LoKr", 1e-4, "attn-only", factor=12, dim=10000, alpha=1),
        paper_config("native", "Full", 5e-6, "full"),
        paper_config("lora16", "LoRA", 2e-4, dim=16, alpha=8),  # outside the paper's grid: both levels unknown
        Config("nofile"),  # no config.yaml: left out
    ]
    rows, scores = [], []
    for c, config in enumerate(configs):
        for seed in (0, 1):
            for epoch in (10, 30):
                for leaf, score in ((("A", "a1"), 0.0), (("A", "a2"), 1.0), (("B", ""), c / 4 + seed / 8)):
                    rows.append(leaf_row(config.digest, seed, epoch, leaf, "alter", "image_similarity"))
                    scores.append(score + epoch / 100)
    # A second run of lora with seed 0 (another folder): the same (config, seed, step), one sample of both.
    again = [Row(("runs/again", "lora-again", 10), "lora", "paper", "0", 1000, "toys", leaf, "alter",
                 "image_similarity", 0.0) for leaf in (("A", "a1"), ("B", ""))]
    rows += again
    scores += [1.0, 0.3]
    data = dataset(rows, configs)
    units = unit_scores(rows, scores, {"image_similarity"}, {"alter"})["toys"]
    features, targets, unknown = shap_samples(data, units, PAPER_SHAP)
    assert PAPER_SHAP.features == ("algorithm", "preset", "step", "capacity level", "lr level")
    nan = None
    assert without_nan(features) == [
        ["LoKr", "attn-only", 1000.0, 1.0, 1.0], ["LoKr", "attn-only", 3000.0, 1.0, 1.0],
        ["LoKr", "attn-only", 1000.0, 1.0, 1.0], ["LoKr", "attn-only", 3000.0, 1.0, 1.0],
        ["LoRA", "attn-mlp", 1000.0, 2.0, 2.0], ["LoRA", "attn-mlp", 3000.0, 2.0, 2.0],
        ["LoRA", "attn-mlp", 1000.0, 2.0, 2.0], ["LoRA", "attn-mlp", 3000.0, 2.0, 2.0],
        ["LoRA", "attn-mlp", 1000.0, nan, nan], ["LoRA", "attn-mlp", 3000.0, nan, nan],
        ["LoRA", "attn-mlp", 1000.0, nan, nan], ["LoRA", "attn-mlp", 3000.0, nan, nan],
        ["Full", "full", 1000.0, 4.0, 3.0], ["Full", "full", 3000.0, 4.0, 3.0],
        ["Full", "full", 1000.0, 4.0, 3.0], ["Full", "full", 3000.0, 4.0, 3.0],
    ]
    # Target: the mean of class A (a1, a2: 1/2 + epoch/100) and class B (c/4 + seed/8 + epoch/100); lora, seed 0,
    # epoch 10 also has the second run's A = 1 and B = 0.3.
    # Samples in (config digest, seed, step) order: lokr, lora, lora16, native.
    expected = []
    for c, seed, epoch in [(c, seed, epoch) for c in (1, 0, 3, 2) for seed in (0, 1) for epoch in (10, 30)]:
        units_of_sample = [0.5 + epoch / 100, c / 4 + seed / 8 + epoch / 100]
        if (c, seed, epoch) == (0, 0, 10):
            units_of_sample += [1.0, 0.3]
        expected.append(sum(units_of_sample) / len(units_of_sample))
    assert targets == pytest.approx(expected, rel=1e-12)
    assert unknown == 4  # nofile: 2 seeds × 2 steps


#: The paper's 26 configurations (§5.2; PAPER-EVAL §5) as their config.yaml has them: (class path, adapter
#: arguments, lr, capacity level, lr level).
PAPER_GRID = [
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp"}, 5e-4, 2, 2),
    ("lycoris.LoRA", {"dim": 32, "alpha": 16, "preset": "attn-mlp"}, 5e-4, 3, 2),
    ("lycoris.LoRA", {"dim": 32, "alpha": 1, "preset": "attn-mlp"}, 5e-4, 3, 2),
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "conv_dim": 8, "conv_alpha": 4, "preset": "full"}, 5e-4, 2, 2),
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-only"}, 5e-4, 2, 2),
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp"}, 1e-4, 2, 1),
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp"}, 1e-3, 2, 3),
    ("lycoris.LoHa", {"dim": 4, "alpha": 2, "preset": "attn-mlp"}, 5e-4, 2, 2),
    ("lycoris.LoHa", {"dim": 16, "alpha": 8, "preset": "attn-mlp"}, 5e-4, 3, 2),
    ("lycoris.LoHa", {"dim": 16, "alpha": 1, "preset": "attn-mlp"}, 5e-4, 3, 2),
    ("lycoris.LoHa", {"dim": 4, "alpha": 2, "conv_dim": 4, "conv_alpha": 2, "preset": "full"}, 5e-4, 2, 2),
    ("lycoris.LoHa", {"dim": 4, "alpha": 2, "preset": "attn-only"}, 5e-4, 2, 2),
    ("lycoris.LoHa", {"dim": 4, "alpha": 2, "preset": "attn-mlp"}, 1e-3, 2, 3),
    ("lycoris.LoHa", {"dim": 4, "alpha": 2, "preset": "attn-mlp"}, 1e-4, 2, 1),
    ("lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 5e-4, 2, 2),
    ("lycoris.LoKr", {"factor": 4, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 5e-4, 3, 2),
    ("lycoris.LoKr", {"factor": 12, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 5e-4, 1, 2),
    ("lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "conv_dim": 10000, "preset": "full"}, 5e-4, 2, 2),
    ("lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-only"}, 5e-4, 2, 2),
    ("lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 1e-3, 2, 3),
    ("lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 1e-4, 2, 1),
    ("lycoris.Full", {"preset": "attn-mlp"}, 1e-6, 4, 2),
    ("lycoris.Full", {"preset": "full"}, 1e-6, 4, 2),
    ("lycoris.Full", {"preset": "attn-only"}, 1e-6, 4, 2),
    ("lycoris.Full", {"preset": "attn-mlp"}, 5e-6, 4, 3),
    ("lycoris.Full", {"preset": "attn-mlp"}, 5e-7, 4, 1),
]


@pytest.mark.parametrize(("class_path", "init_args", "lr", "capacity", "lr_levels"), [
    *PAPER_GRID,
    # Outside the paper's grid: unknown (None here, NaN in the samples).
    ("lycoris.LoRA", {"dim": 16, "alpha": 8, "preset": "attn-mlp"}, 5e-4, None, 2),
    ("lycoris.LoKr", {"factor": 16, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 2e-4, None, None),
    ("lycoris.LoRA", {"dim": 8, "alpha": 4, "weight_decompose": True, "preset": "attn-mlp"}, 5e-4, None, 2),
    ("lycoris.OFT", {"dim": 4, "preset": "attn-mlp"}, 1e-4, None, 1),  # the adapters' learning rates
    ("lycoris.Full", {"preset": "attn-mlp"}, 5e-4, 4, None),  # an adapter's learning rate, not native's
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_the_paper_levels_of_a_recipe(tmp_path, class_path, init_args, lr, capacity, lr_levels):
    write_recipe(tmp_path, class_path, init_args, lr)
    config = Config("cfg")
    read_features(tmp_path, config)
    levels = [None if math.isnan(v) else v for v in (capacity_level(config), lr_level(config))]
    assert levels == [capacity, lr_levels]


def test_the_paper_grid_has_26_distinct_configurations():
    assert len({repr(config[:3]) for config in PAPER_GRID}) == len(PAPER_GRID) == 26


def test_the_default_epoch_of_the_panels():
    assert default_epoch([10, 30, 50]) == 30  # the paper's checkpoints
    assert default_epoch([10, 20, 30, 40, 50]) == 30
    assert default_epoch([1, 2]) == 2
    assert default_epoch([40, 50]) == 40


def test_reading_the_protocol_column(tmp_path):
    rows = checkpoint_rows(0, 0, 1)[:2]
    write_metrics(tmp_path / "before", rows)  # written before the column existed
    write_metrics(tmp_path / "paper", [{**rows[0], "protocol": "paper"}, {**rows[1], "protocol": ""}],
                  PROTOCOL_COLUMNS)
    write_metrics(tmp_path / "mine", [{**r, "protocol": "mine"} for r in rows], PROTOCOL_COLUMNS)
    assert [r.protocol for r in read_metrics(tmp_path / "before")[0]] == ["generic", "generic"]
    assert [r.protocol for r in read_metrics(tmp_path / "paper")[0]] == ["paper", "generic"]  # empty: as before it
    assert [r.protocol for r in read_metrics(tmp_path / "mine")[0]] == ["mine", "mine"]
    assert [r.value for r in read_metrics(tmp_path / "mine")[0]] == [r["value"] for r in rows]


def test_mixed_protocols_are_refused(tmp_path, capsys):
    rows = checkpoint_rows(0, 0, 1)
    write_metrics(tmp_path / "runs" / "old", rows)
    write_metrics(tmp_path / "runs" / "new", [{**r, "run": "new", "protocol": "paper"} for r in rows],
                  PROTOCOL_COLUMNS)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "lycoflow analyze: error: the runs were measured with different evaluation protocols" in err
    assert f"generic: {tmp_path / 'runs' / 'old'}; paper: {tmp_path / 'runs' / 'new'}" in err
    assert not (tmp_path / "report").exists()


# --- The paper protocol's report -----------------------------------------------------------------------------------

#: (config digest, adapter class path, adapter arguments, lr) of the paper protocol's runs; c is the index.
PAPER_CONFIGS = [
    ("p-lora", "lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp"}, 5e-4),
    ("p-lokr", "lycoris.LoKr", {"factor": 4, "dim": 10000, "alpha": 1, "preset": "attn-mlp"}, 1e-3),
    ("p-native", "lycoris.Full", {"preset": "attn-only"}, 1e-6),
    ("p-lora16", "lycoris.LoRA", {"dim": 16, "alpha": 8, "preset": "attn-mlp"}, 5e-4),  # outside the paper's grid
]
PAPER_EPOCHS = (10, 30, 50)
LEAVES = [("bear", ""), ("cat", "tabby"), ("cat", "black")]


def paper_rows(c: int, s: int, e: int) -> list[dict[str, object]]:
    """Configuration c, seed s, epoch e on every (prompt type, metric) of the paper's panels and SHAP targets.

    Vendi (trigger) is c on bear and tabby and 0 on black: among the 24 checkpoints, configuration c takes ranks
    6c + 1 … 6c + 6 on the first two, score s_c = (12c + 5)/46, and black ties everywhere (1/2), so that the category
    scores (s_c + (s_c + 1/2)/2)/2 class first (each leaf equal: (2 s_c + 1/2)/3). The other values are distinct.
    """
    digest = PAPER_CONFIGS[c][0]
    context = {"run": f"{digest}-s{s}", "config": digest, "protocol": "paper", "seed": s, "epoch": e,
               "step": 10 * e, "category": "toys"}
    measures = {(m.prompt_type, m.metric) for m in (*PAPER_TARGETS, *(m for p in PAPER_PANELS for m in p))}
    rows = []
    for i, (cls, subclass) in enumerate(LEAVES):
        for prompt_type, metric in sorted(measures):
            value = (0.0 if subclass == "black" else float(c)) if metric == "vendi_score" else \
                c + s / 10 + e / 1000 + i / 7 + len(metric) / 10000
            rows.append({**context, "class": cls, "subclass": subclass, "prompt_type": prompt_type, "metric": metric,
                         "value": value})
    return rows


def write_paper_runs(root: Path) -> list[Path]:
    """The 8 run folders of the paper protocol (configuration × seed), each with its metrics.csv and config.yaml."""
    folders = []
    for c, (digest, class_path, init_args, lr) in enumerate(PAPER_CONFIGS):
        for s in (0, 1):
            folder = root / f"{digest}-s{s}"
            write_metrics(folder, [row for e in PAPER_EPOCHS for row in paper_rows(c, s, e)], PROTOCOL_COLUMNS)
            write_recipe(folder, class_path, init_args, lr, s)
            folders.append(folder)
    return folders


PAPER_SHAP_CHARTS = [f"paper_shap_{m.metric}_{m.prompt_type}_toys.png" for m in PAPER_TARGETS]


def test_analyze_paper_protocol(tmp_path):
    runs = write_paper_runs(tmp_path / "runs")
    out = tmp_path / "report"
    page = html.unescape(analyze(runs, out, log=lambda _: None).read_text(encoding="utf-8"))

    scores = {tuple(line[:5]): float(line[5]) for line in read_csv(out / "scores.csv")[1:]}
    for c, (digest, *_) in enumerate(PAPER_CONFIGS):
        s_c = Fraction(12 * c + 5, 46)
        for e in PAPER_EPOCHS:
            assert scores[digest, str(e), "toys", "trigger", "vendi_score"] == float(
                (s_c + (s_c + Fraction(1, 2)) / 2) / 2)

    # The paper's panels at the default epoch, 30, and the criterion means as an extra section.
    assert [p.name for p in out.glob("paper_scatter_*")] == ["paper_scatter_toys_epoch30.png"]
    assert (out / "paper_scatter_toys_epoch30.png").stat().st_size > 1000
    for name in ("scatter_toys.png", *(f"ranking_{c}.csv" for c in ("fidelity", "controllability", "diversity",
                                                                     "preservation"))):
        assert (out / name).is_file()
    assert "measured with the paper evaluation protocol" in page
    paper, extra = page.index("The paper's analysis"), page.index("Beyond the paper: criterion means")
    assert paper < extra < page.index("<h2>Ranking</h2>")
    assert "Caveat: CatBoost encodes categorical features by target statistics" in page
    assert "CatBoostRegressor(iterations=300, learning_rate=0.1, random_seed=123, nan_mode='Min')" in page
    assert "LoKr factor 12→1, 8→2, 4→3" in page
    if not shap_available():
        pytest.skip(f"catboost is not installed ({INSTALL_HINT}): the paper's SHAP charts are not checked")
    for chart in PAPER_SHAP_CHARTS:
        assert (out / chart).stat().st_size > 1000
    assert len(list(out.glob("paper_shap_*"))) == 6
    assert ("paper SHAP: LoRA alpha=8 dim=16 (p-lora16) is outside the paper's grid: capacity level unknown"
            in page)


def test_paper_protocol_chosen_epochs_without_catboost(tmp_path, monkeypatch, capsys):
    write_paper_runs(tmp_path / "runs")
    monkeypatch.setitem(sys.modules, "catboost", None)  # import catboost now raises ImportError
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--epoch", "50", "10"]) == 0
    out = tmp_path / "report"
    assert sorted(p.name for p in out.glob("paper_scatter_*")) == ["paper_scatter_toys_epoch10.png",
                                                                   "paper_scatter_toys_epoch50.png"]
    assert not list(out.glob("*shap_*"))
    page = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert f"SHAP charts skipped: catboost is not installed ({INSTALL_HINT})" in page
    capsys.readouterr()

    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "other"), "--epoch", "20"]) == 2
    assert "error: epoch(s) 20 not evaluated: the runs have epoch(s) 10, 30, 50" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
