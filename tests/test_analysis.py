"""lycoflow analyze on real files: a synthetic metrics table whose rank scores are worked out by hand.

Three configurations (LoRA, LoHa, LoKr) × 2 seeds × 2 epochs = 12 checkpoints, numbered k = 4c + 2s + (e − 1), are
measured on the category "toys" (classes bear and cat/tabby); one checkpoint alone is also measured on "sky", the
n = 1 case. Each metric's values are chosen so that its scores have a closed form (see `expected_scores`).
"""

import csv
import html
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from lycoflow.analysis import INSTALL_HINT, analyze, main, rank_scores

#: metrics.csv as lycoflow.evaluation.write_metrics writes it.
COLUMNS = ("run", "config", "seed", "epoch", "step", "category", "class", "subclass", "prompt_type", "metric",
           "value")
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


def write_runs(root: Path, with_config: bool = True) -> list[Path]:
    """The 6 run folders (configuration × seed), each with metrics.csv for epochs 1 and 2 and config.yaml."""
    folders = []
    for c, (digest, class_path, init_args, lr, _) in enumerate(CONFIGS):
        for s in (0, 1):
            folder = root / f"{digest}-s{s}"
            folder.mkdir(parents=True)
            with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                for e in (1, 2):
                    writer.writerows(checkpoint_rows(c, s, e))
            if with_config:
                recipe = {"seed_everything": s, "model": {"adapter": {"class_path": class_path, "init_args": init_args},
                                                          "lr": lr}}
                (folder / "config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
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
    # catboost comes with the dev extra (lycoflow[analysis]); its absence is tested below.
    for chart in SHAP_CHARTS:
        assert (out / chart).stat().st_size > 1000
    assert "no SHAP chart for fidelity, sky" in page


def test_main_with_a_parent_folder(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    (tmp_path / "runs" / "crashed").mkdir()  # a run folder with nothing evaluated
    (tmp_path / "empty").mkdir()
    # A `lycoflow evaluate` output without the recipe: its configuration's features are unknown.
    evaluated = tmp_path / "runs" / "eval-adapter"
    evaluated.mkdir()
    rows = [{**r, "run": "eval-adapter", "config": "cfg-eval"} for r in checkpoint_rows(0, 0, 1)]
    with open(evaluated / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

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
