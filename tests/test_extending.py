"""The README's "Extending" examples, run as written: a user's algorithm, base model and data module, picked by
class path, train with `lycoflow fit`, and `lycoflow evaluate` reads the file the user's algorithm wrote."""

import csv
import re
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

from lycoflow.cli import main
from lycoflow.lightning_cli import run_lightning

ROOT = Path(__file__).parent.parent


def readme_modules() -> dict[str, str]:
    """The README's Python blocks that start with ``# <name>.py``, by file name."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (\w+\.py)", block))}


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    modules = readme_modules()
    assert {"my_algos.py", "my_models.py", "my_data.py"} <= set(modules)
    for name, code in modules.items():
        (tmp_path / name).write_text(textwrap.dedent(code), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in modules:  # other tests write modules of the same names
        sys.modules.pop(name.removesuffix(".py"), None)


def test_the_readme_extensions_train_save_and_evaluate(user_modules, tiny_sd_folder, synthetic_root, tmp_path):
    run = tmp_path / "run"
    run_lightning(["fit", str(ROOT / "recipes" / "quickstart.yaml"),
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
