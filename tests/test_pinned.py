"""Pinned outputs of a short seeded quickstart run: a refactor must not change a number.

The digests below were recorded with the code before the layout change (issue 11), and re-recorded with the same
code when the stack moved (Pillow 13 draws and resamples the data differently), and the metrics and config id
re-recorded when the evaluation became a protocol (issue 13: a ``protocol`` column, the paper's VGG taps at 224 px;
checked first that with the old VGG settings and without that column the rows were byte-identical, and that the
old evaluation arguments give the old config id). They hold on the stack pinned in constraints.txt, which `make`
installs. If one changes on that stack, training, saving, sampling or measuring
computes something else: find out why before re-recording it.
"""

import csv
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lycoflow.evaluation import config_id
from lycoflow.lightning_cli import run_lightning

QUICKSTART = Path(__file__).parent.parent / "recipes" / "tiny.yaml"

ADAPTER_TENSORS = "7f2fdda3"  # sha256 of every tensor's name, dtype, shape and bytes, in key order
METRIC_ROWS = "eb681f69"  # sha256 of metrics.csv without its `config` column (which digests tmp paths here)
ROWS = 119
CONFIG_ID = "fa95ef3f74"  # the `config` column of a plain `lycoflow fit recipes/tiny.yaml`


def tensors_digest(path: Path) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(load_file(path).items()):
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def rows_digest(path: Path) -> tuple[str, int]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    for row in rows:
        out.write(",".join(f"{k}={v}" for k, v in row.items() if k != "config") + "\n")
    return hashlib.sha256(out.getvalue().encode()).hexdigest()[:8], len(rows)


def test_short_quickstart_run_writes_the_pinned_adapters_and_metrics(tiny_sd_folder, synthetic_root, tmp_path):
    run = tmp_path / "run"
    run_lightning(["fit", str(QUICKSTART), f"--model.base.init_args.folder={tiny_sd_folder}",
                   f"--data.init_args.root={synthetic_root}", "--trainer.max_epochs=1",
                   "--trainer.limit_train_batches=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   f"--trainer.default_root_dir={run}"])
    assert tensors_digest(run / "adapters" / "epoch=1.safetensors") == ADAPTER_TENSORS
    assert rows_digest(run / "metrics.csv") == (METRIC_ROWS, ROWS)


def test_the_quickstart_configuration_keeps_its_config_id():
    # Runs from before and after a move of classes between modules must stay one configuration in the analysis.
    recipe = subprocess.run([sys.executable, "-m", "lycoflow.cli", "fit", str(QUICKSTART), "--print_config"],
                            capture_output=True, text=True, check=True).stdout
    assert config_id(recipe) == CONFIG_ID
