"""A corpus of bad input, one of each class users hit, through the real ``lycoflow`` command (a process each, forked
from one that imported lycoflow once: tests/cli_process.py; in-process, W&B's console capture and Lightning's
loggers keep streams of earlier cases). Marked slow: `.ci/run` includes it, the default `pytest` does not.

Every case must end with exit code 2 (a user error), a message naming the file, key or value at fault, no
traceback, every input file byte-identical afterwards, and no temporary or partial file left anywhere under
the test's folder. Each case writes its inputs under ``in/`` and returns the command line and the texts the
message must contain. Faults (a full disk, W&B unreachable) are in tests/test_faults.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_process import lycoflow
from PIL import Image
from safetensors.torch import save_file as write_tensors

REPO = Path(__file__).parent.parent
QUICKSTART = str(REPO / "recipes" / "tiny.yaml")
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false"]

Case = Callable[[Path, Path], tuple[list[str], list[str]]]  # (inputs folder, tiny model folder) → (argv, texts)


def _recipe(inp: Path, text: str, name: str = "recipe.yaml") -> str:
    path = inp / name
    path.write_text(text)
    return str(path)


def _data_tree(inp: Path) -> Path:
    root = inp / "data"
    for i in range(2):
        (root / "toys" / "star").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / "toys" / "star" / f"{i}.png")
    return root


def _fit_on_data(inp: Path, tiny: Path, root: Path, *extra: str) -> list[str]:
    data = _recipe(inp, f"data:\n  class_path: lycoflow.data.HierarchicalDataModule\n  init_args:\n"
                        f"    root: {root}\n    resolution: 32\n    batch_size: 2\n", "data.yaml")
    return ["fit", QUICKSTART, data, f"--model.base.init_args.folder={tiny}",
            f"--trainer.default_root_dir={inp.parent / 'run'}", *FAST, *extra]


def empty_recipe(inp, tiny):
    path = _recipe(inp, "")
    return ["fit", path], [path, "is empty"]


def recipe_not_a_mapping(inp, tiny):
    path = _recipe(inp, "- model\n- data\n")
    return ["fit", path], [path, "not a mapping"]


def recipe_bad_yaml(inp, tiny):
    path = _recipe(inp, "model:\n  lr: [1,\n")
    return ["fit", path], [path, "not valid YAML"]


def interpolation_to_missing_key(inp, tiny):
    path = _recipe(inp, "model:\n  lr: ${model.nothere}\n")
    return ["fit", QUICKSTART, path, *FAST], [path, "model.lr", "model.nothere"]


def unknown_recipe_key(inp, tiny):
    path = _recipe(inp, "model:\n  learning_rate: 0.1\n")
    return ["fit", QUICKSTART, path, *FAST], ["learning_rate"]


def zero_resolution(inp, tiny):
    return ["fit", QUICKSTART, "--data.init_args.resolution=0", *FAST], ["resolution", "got 0", "SyntheticConcepts"]


def zero_batch_size(inp, tiny):
    return ["fit", QUICKSTART, "--data.init_args.batch_size=0", *FAST], ["batch_size", "got 0"]


def negative_learning_rate(inp, tiny):
    return ["fit", QUICKSTART, "--model.lr=-0.001", *FAST], ["lr", "-0.001"]


def zero_rank(inp, tiny):
    return ["fit", QUICKSTART, "--model.adapter.init_args.dim=0", *FAST], ["LoKr", "dim=0"]


def checkpoint_is_an_adapter_file(inp, tiny):
    path = inp / "epoch=1.safetensors"
    write_tensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    return ["fit", QUICKSTART, f"--ckpt_path={path}", *FAST], [str(path), "adapter file, not a training checkpoint"]


def truncated_checkpoint(inp, tiny):
    path = inp / "last.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    return ["fit", QUICKSTART, f"--ckpt_path={path}", *FAST], [str(path), "not a whole training checkpoint"]


def run_folder_is_a_file(inp, tiny):
    path = inp / "run"
    path.write_text("notes\n")
    return ["fit", QUICKSTART, f"--trainer.default_root_dir={path}", *FAST], [str(path), "is a file"]


def one_pixel_image(inp, tiny):
    root = _data_tree(inp)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "toys" / "star" / "dot.png")
    return _fit_on_data(inp, tiny, root), [str(root / "toys" / "star" / "dot.png"), "1x1", "upscaled"]


def dangling_symlink(inp, tiny):
    root = _data_tree(inp)
    (root / "toys" / "star" / "gone.png").symlink_to(inp / "deleted.png")
    return _fit_on_data(inp, tiny, root), [str(root / "toys" / "star" / "gone.png"), "broken symlink"]


def empty_adapter_file(inp, tiny):
    path = inp / "empty.safetensors"
    write_tensors({}, str(path))
    return (["generate", "--base", str(tiny), "--adapter", str(path), "--prompt", "a star", "--out",
             str(inp.parent / "images"), "--device", "cpu"], [str(path), "no tensors"])


def merge_over_an_existing_file(inp, tiny):
    path = inp / "keep.safetensors"
    path.write_bytes(b"mine")
    return (["merge", "--base", str(tiny), "--adapter", str(inp / "whatever.safetensors"), "--out-file", str(path)],
            [str(path), "already exists", "--overwrite"])


def misspelt_sweep_key(inp, tiny):
    path = _recipe(inp, f"configs:\n  - {{name: a, recipes: [{QUICKSTART}], varry: [{{model.lr: 0.1}}]}}\n",
                   "sweep.yaml")
    return ["sweep", path, "--list"], [path, "varry"]


def damaged_metrics(inp, tiny):
    run = inp / "runs" / "a"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_bytes(b"run,config\n\xff\xfe\x00broken")
    return ["analyze", str(inp / "runs"), "--out", str(inp.parent / "report")], [str(run / "metrics.csv")]


def nothing_to_analyse(inp, tiny):
    (inp / "runs").mkdir()
    return ["analyze", str(inp / "runs"), "--out", str(inp.parent / "report")], [str(inp / "runs")]


CASES: list[Case] = [
    empty_recipe, recipe_not_a_mapping, recipe_bad_yaml, interpolation_to_missing_key, unknown_recipe_key,
    zero_resolution, zero_batch_size, negative_learning_rate, zero_rank, checkpoint_is_an_adapter_file,
    truncated_checkpoint, run_folder_is_a_file, one_pixel_image, dangling_symlink, empty_adapter_file,
    merge_over_an_existing_file, misspelt_sweep_key, damaged_metrics, nothing_to_analyse,
]


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_is_named_without_traceback_or_damage(case, tmp_path, tiny_sd_folder):
    inp = tmp_path / "in"
    inp.mkdir()
    argv, texts = case(inp, tiny_sd_folder)
    before = _digests(inp)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "LYCOFLOW_CACHE": str(tmp_path / "cache")}
    env.pop("LYCOFLOW_DEBUG", None)
    done = lycoflow(argv, tmp_path, env)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    for text in texts:
        assert text in out, f"{text!r} not in:\n{out}"
    assert _digests(inp) == before  # every input byte-identical
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name]
    assert leftovers == []
