"""lycoflow sweep: expansion of the paper's grid, emitted files, and a real sequential sweep on the tiny model."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from lycoflow.cli import main
from lycoflow.lightning_cli import run_lightning
from lycoflow.sweep import DONE, load_sweep

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "recipes" / "sweeps" / "paper.yaml"


def test_the_paper_grid_is_26_configurations_times_3_seeds():
    runs = load_sweep(PAPER)
    assert len(runs) == 78 and [r.index for r in runs] == list(range(78))
    configs = Counter(r.config for r in runs)
    assert len(configs) == 26 and set(configs.values()) == {3}
    by_group = Counter(c.split("-")[0] for c in configs)
    assert by_group == {"lora": 8, "loha": 8, "lokr": 7, "native": 3}
    run = next(r for r in runs if r.config == "lora-dim_32+alpha_16" and r.seed == 2)
    assert run.recipes == (str(REPO / "recipes" / "lora.yaml"),)
    assert run.folder == Path("runs/paper/lora-dim_32+alpha_16-seed2")
    assert run.argv(["--data.init_args.root=/d"]) == [
        "fit", str(REPO / "recipes" / "lora.yaml"), "--data.init_args.root=/d", "--model.adapter.init_args.dim=32",
        "--model.adapter.init_args.alpha=16", "--seed_everything=2",
        "--trainer.default_root_dir=runs/paper/lora-dim_32+alpha_16-seed2"]
    assert run.env() == {"WANDB_RUN_GROUP": "lora-dim_32+alpha_16"}
    assert next(r for r in runs if r.config == "lokr-preset_full").overrides == (
        "--model.adapter.init_args.preset=full",)


def test_emit_writes_commands_a_slurm_array_and_a_wandb_sweep(tmp_path, capsys):
    assert main(["sweep", str(PAPER), "--emit", str(tmp_path), "--data.init_args.root=/d", "--root=/r"]) == 0
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert len([c for c in commands if c.startswith("WANDB_RUN_GROUP=")]) == 78
    recipe = tmp_path / "recipes" / "loha-lr_0.001-seed0.yaml"
    assert commands[2 + 8 * 3 + 6] == f"WANDB_RUN_GROUP=loha-lr_0.001 lycoflow fit {REPO / 'recipes' / 'loha.yaml'} " \
        f"{recipe}"
    assert yaml.safe_load(recipe.read_text()) == {
        "data": {"init_args": {"root": "/d"}}, "model": {"lr": 0.001}, "seed_everything": 0,
        "trainer": {"default_root_dir": "/r/loha-lr_0.001-seed0"}}
    assert len(list((tmp_path / "recipes").glob("*.yaml"))) == 78
    slurm = (tmp_path / "slurm.sh").read_text()
    assert "#SBATCH --array=0-77" in slurm and "--run=$SLURM_ARRAY_TASK_ID" in slurm
    sweep = yaml.safe_load((tmp_path / "wandb_sweep.yaml").read_text())
    assert sweep["method"] == "grid" and sweep["parameters"]["run"]["values"] == list(range(78))
    assert sweep["command"][:3] == ["lycoflow", "sweep", str(PAPER)] and sweep["command"][-1] == "${args}"
    assert "--data.init_args.root=/d" in sweep["command"]


@pytest.mark.parametrize(("text", "message"), [
    ("seeds: [0]\n", "needs `configs:`"),
    ("configs:\n  - {name: a, recipes: [missing.yaml]}\n", "recipe not found"),
    ("seeds: [-1]\nconfigs:\n  - {name: a, recipes: [REC]}\n", "`seeds` must be a list of integers >= 0"),
    ("configs:\n  - {name: a, recipes: [REC], vary: [{model.lr: 0.1}, {model.lr: 0.1}]}\n", "appears twice"),
    ("configs:\n  - {name: a, recipes: [REC], vary: [model.lr]}\n", "`vary` must be a list of non-empty"),
    ("configs:\n  - {name: a, recipes: [REC], varry: [{model.lr: 0.1}]}\n", "configs[0]: unknown key(s) varry"),
    ("seed: [0, 1]\nconfigs:\n  - {name: a, recipes: [REC]}\n", "unknown key(s) seed; the keys are name, seeds"),
])
def test_bad_sweep_files_are_named(text, message, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("REC", str(REPO / "recipes" / "lora.yaml")))
    assert main(["sweep", str(path), "--list"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_a_sweep_runs_every_run_goes_on_after_a_failure_and_skips_finished_runs(tiny, tmp_path, capsys):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "seeds": [0], "root": "runs", "configs": [{
        "name": "lokr", "recipes": [str(REPO / "recipes" / "quickstart.yaml")],
        "vary": [{"model.lr": 1.0e-3}, {"model.adapter.init_args.factor": "not-a-number"}]}]}))
    quick = [*tiny, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
             "--trainer.logger=false", "--trainer.callbacks=[]"]
    assert main(["sweep", str(sweep), *quick]) == 1  # one run failed
    out = capsys.readouterr().out
    assert "sweep: 2 of 3 runs done; failed:" in out and "lokr-factor_not-a-number-seed0" in out
    for name in ("lokr-seed0", "lokr-lr_0.001-seed0"):
        assert (tmp_path / "runs" / name / DONE).is_file() and (tmp_path / "runs" / name / "config.yaml").is_file()
    assert not (tmp_path / "runs" / "lokr-factor_not-a-number-seed0" / DONE).exists()
    config = yaml.safe_load((tmp_path / "runs" / "lokr-lr_0.001-seed0" / "config.yaml").read_text())
    assert config["model"]["lr"] == 1e-3 and config["seed_everything"] == 0
    # Started again: the finished runs are skipped, the failed one is tried again (and fails again).
    assert main(["sweep", str(sweep), *quick, "--run=0"]) == 0
    assert "done already, skipped" in capsys.readouterr().out


def test_set_applies_to_every_variant_of_a_configuration_and_variants_win(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"seeds": [3], "configs": [{
        "name": "lora", "recipes": [str(REPO / "recipes" / "quickstart.yaml")],
        "set": {"model.adapter": "lycoris.LoRA", "model.lr": 1.0e-4}, "vary": [{"model.lr": 1.0e-3}]}]}))
    default, variant = load_sweep(path, root=tmp_path / "runs")
    assert default.overrides == ("--model.adapter=lycoris.LoRA", "--model.lr=0.0001")
    assert variant.overrides == ("--model.adapter=lycoris.LoRA", "--model.lr=0.001")
    assert variant.config == "lora-lr_0.001" and variant.folder == tmp_path / "runs" / "lora-lr_0.001-seed3"
    path.write_text(yaml.safe_dump({"configs": [{"name": "a", "recipes": [str(REPO / "recipes" / "lora.yaml")],
                                                 "set": ["model.lr"]}]}))
    with pytest.raises(ValueError, match=r"configs\[0\]: `set` must be a \{key: value\} mapping"):
        load_sweep(path)


def test_a_runs_concrete_recipe_resolves_to_what_its_command_line_does(tiny, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"seeds": [4], "configs": [{
        "name": "lora", "recipes": [str(REPO / "recipes" / "quickstart.yaml")],
        "set": {"model.adapter": "lycoris.LoRA", "model.adapter.init_args.dim": 4},
        "vary": [{"model.lr": 1.0e-3, "data.init_args.flip": True}]}]}))
    run = load_sweep(path, root=tmp_path / "runs")[1]
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(run.recipe(tiny)))
    by_flags = run_lightning(run.argv(tiny), run=False)
    by_recipe = run_lightning(["fit", *run.recipes, str(recipe)], run=False)
    assert by_flags.parser.dump(by_flags.config) == by_recipe.parser.dump(by_recipe.config)
    model = by_recipe.model
    assert type(model.adapter).__name__ == "LoRA" and model.adapter.dim == 4 and model.lr == 1e-3
    assert by_recipe.datamodule.flip and by_recipe.trainer.default_root_dir == str(run.folder)
