"""The README's "Extending" examples, run as written: a user's algorithm, base model and data module, picked by
class path, train with `lycoflow fit`, and `lycoflow evaluate` reads the file the user's algorithm wrote."""

import csv
from pathlib import Path

import pytest
from safetensors import safe_open

from lycoflow.cli import main
from lycoflow.lightning_cli import run_lightning

ROOT = Path(__file__).parent.parent


def test_the_readme_extensions_train_save_and_evaluate(readme_examples, tiny_sd_folder, synthetic_root, tmp_path):
    run = tmp_path / "run"
    run_lightning(["fit", str(ROOT / "recipes" / "tiny.yaml"),
                   "--model.base=my_models.MyCheckpoint", f"--model.base.init_args.folder={tiny_sd_folder}",
                   "--model.adapter=my_algos.ScaledDiff", "--model.adapter.init_args.preset=attn-only",
                   "--data=my_data.MyConcepts", f"--data.init_args.folder={synthetic_root}",
                   "--data.init_args.resolution=64", "--data.init_args.batch_size=4",
                   "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}"])
    adapter = run / "adapters" / "epoch=1.safetensors"
    with safe_open(str(adapter), "pt") as f:
        assert any(key.endswith(".sdiff") for key in f.keys())  # noqa: SIM118 - safe_open has no __iter__; the user's parameters, under their own keys
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        trained = list(csv.DictReader(f))

    out = tmp_path / "again"
    assert main(["evaluate", "--adapter", str(adapter), "--out", str(out), "--trainer.logger=false"]) == 0
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        again = list(csv.DictReader(f))
    # The file read back through the recipe's strategy gives the numbers the run measured (to float16 rounding).
    assert len(again) == len(trained) > 0
    for a, b in zip(again, trained):
        assert (a["class"], a["prompt_type"], a["metric"]) == (b["class"], b["prompt_type"], b["metric"])
        assert float(a["value"]) == pytest.approx(float(b["value"]), rel=0.05, abs=1e-3)


def test_the_readme_metric_example_is_measured_and_ranked(monkeypatch, tmp_path):
    import re

    import torch

    from lycoflow.analysis import analyze
    from lycoflow.evaluation import PaperProtocol, measuring
    from lycoflow.evaluation.prompts import EvalPrompt
    from lycoflow.metrics import specs

    block = re.search(r"```python\n# lycoflow/metrics/specs.py, in METRICS:\n(.*?)```",
                      (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    row, _, computation = [line.strip().rstrip(",") for line in block.splitlines()]
    spec = eval(row, {"MetricSpec": specs.MetricSpec})
    name, function = eval(f"({computation.replace(': lambda', ', lambda', 1)})")
    assert spec.name == name and spec.criterion in specs.CRITERIA
    # As if the two lines were added to their files: the evaluation computes it, the analysis ranks it by its row.
    monkeypatch.setattr(measuring, "METRICS", (*specs.METRICS, spec))
    monkeypatch.setitem(measuring.COMPUTATIONS, name, function)
    monkeypatch.setitem(specs.BY_NAME, name, spec)
    monkeypatch.setitem(specs.CRITERIA, spec.criterion, (*specs.CRITERIA[spec.criterion], name))
    prompts = [EvalPrompt("shapes", "star", "", "trigger", i, "zqx star", "star", 0, i) for i in range(3)]
    records = [measuring.Record(i, torch.full((4,), float(i + 1)), 0.5, None) for i in range(3)]
    (values,) = measuring.metric_values(prompts, records, {"shapes/star": torch.ones(2, 4)}, PaperProtocol())
    assert values.values[name] == pytest.approx(float(torch.full((4,), 2.0).norm()))  # the mean embedding's norm

    runs = []
    for run, value in (("a", 1.0), ("b", 3.0)):
        folder = tmp_path / "runs" / run
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(
            ",".join(specs.COLUMNS) + f"\n{run},{run},paper,0,1,10,shapes,star,,trigger,{name},{value}\n",
            encoding="utf-8")
        runs.append(folder)
    analyze(runs, tmp_path / "report")
    with open(tmp_path / "report" / "scores.csv", newline="", encoding="utf-8") as f:
        scores = {r["config"]: float(r["score"]) for r in csv.DictReader(f) if r["metric"] == name}
    assert scores == {"a": 0.0, "b": 1.0}  # higher is better, as its row says
    assert (tmp_path / "report" / f"ranking_{spec.criterion}.csv").read_text(encoding="utf-8").count("\n") >= 3
