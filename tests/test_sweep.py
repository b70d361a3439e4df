"""lycoflow sweep: expansion of the paper's grid, emitted files, and a real sequential sweep on the tiny model."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from lycoflow.cli import main
from lycoflow.lightning_cli import run_lightning
from lycoflow.sweep import DONE, load_sweep

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "recipes" / "sweeps" / "paper.yaml"


#: The paper's grid (PAPER-EVAL §5): each configuration's changes to its base recipe, by configuration name.
PAPER_GRID = {
    "lora": {}, "lora-dim_32+alpha_16": {"dim": 32, "alpha": 16}, "lora-dim_32+alpha_1": {"dim": 32, "alpha": 1},
    "lora-preset_full": {"preset": "full"}, "lora-preset_attn-only": {"preset": "attn-only"},
    "lora-lr_0.0001": {"lr": 1e-4}, "lora-lr_0.001": {"lr": 1e-3},
    "loha": {}, "loha-dim_16+alpha_8": {"dim": 16, "alpha": 8}, "loha-dim_16+alpha_1": {"dim": 16, "alpha": 1},
    "loha-preset_full": {"preset": "full"}, "loha-preset_attn-only": {"preset": "attn-only"},
    "loha-lr_0.001": {"lr": 1e-3}, "loha-lr_0.0001": {"lr": 1e-4},
    "lokr": {}, "lokr-factor_4": {"factor": 4}, "lokr-factor_12": {"factor": 12},
    "lokr-preset_full": {"preset": "full"}, "lokr-preset_attn-only": {"preset": "attn-only"},
    "lokr-lr_0.001": {"lr": 1e-3}, "lokr-lr_0.0001": {"lr": 1e-4},
    "native": {}, "native-preset_full": {"preset": "full"}, "native-preset_attn-only": {"preset": "attn-only"},
    "native-lr_5e-06": {"lr": 5e-6}, "native-lr_5e-07": {"lr": 5e-7},
}
#: Each group's base recipe and its defaults: LoRA dim 8 α 4, LoHa dim 4 α 2, LoKr factor 8 dim 10000 α 1,
#: native lr 1e-6; adapters lr 5e-4; preset attn-mlp.
PAPER_DEFAULTS = {
    "lora": ("lora.yaml", "lycoris.LoRA", {"dim": 8, "alpha": 4, "preset": "attn-mlp", "lr": 5e-4}),
    "loha": ("loha.yaml", "lycoris.LoHa", {"dim": 4, "alpha": 2, "preset": "attn-mlp", "lr": 5e-4}),
    "lokr": ("lokr.yaml", "lycoris.LoKr", {"factor": 8, "dim": 10000, "alpha": 1, "preset": "attn-mlp", "lr": 5e-4}),
    "native": ("full.yaml", "lycoris.Full", {"preset": "attn-mlp", "lr": 1e-6}),
}


def resolved(run) -> tuple[str, dict]:
    """A run's adapter class and its settings (adapter arguments and lr): its base recipe with its overrides."""
    (recipe,) = run.recipes
    model = yaml.safe_load(Path(recipe).read_text())["model"]
    values = {**model["adapter"]["init_args"], "lr": model["lr"], "text_encoder_lr": model["text_encoder_lr"]}
    for override in run.overrides:  # --key=JSON, or a plain string (see lycoflow.sweep._cli_value)
        key, _, text = override[2:].partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        values[key.removeprefix("model.").removeprefix("adapter.init_args.")] = value
    return model["adapter"]["class_path"], values


def test_the_paper_grid_is_its_26_configurations_times_seeds_23_24_25():
    runs = load_sweep(PAPER)
    assert len(runs) == 78 and [r.index for r in runs] == list(range(78))
    assert [r.config for r in runs[::3]] == list(PAPER_GRID) and [r.seed for r in runs] == [23, 24, 25] * 26
    for run in runs:
        group = run.config.split("-")[0]
        recipe, adapter, defaults = PAPER_DEFAULTS[group]
        assert run.recipes == (str(REPO / "recipes" / recipe),)
        # Only the configuration's own change differs from the paper's defaults; the text encoder learns at lr.
        assert resolved(run) == (adapter, {**defaults, **PAPER_GRID[run.config], "text_encoder_lr": None}), run.config
    run = next(r for r in runs if r.config == "lora-dim_32+alpha_16" and r.seed == 25)
    assert run.folder == Path("runs/paper/lora-dim_32+alpha_16-seed25")
    assert run.argv(["--data.init_args.root=/d"]) == [
        "fit", str(REPO / "recipes" / "lora.yaml"), "--data.init_args.root=/d", "--model.adapter.init_args.dim=32",
        "--model.adapter.init_args.alpha=16", "--seed_everything=25",
        "--trainer.default_root_dir=runs/paper/lora-dim_32+alpha_16-seed25"]
    assert run.env() == {"WANDB_RUN_GROUP": "lora-dim_32+alpha_16"}
    assert next(r for r in runs if r.config == "lokr-preset_full").overrides == (
        "--model.adapter.init_args.preset=full",)


# LoRA conv 8/4 and LoHa conv 4/2 scale by alpha/dim; LoKr's conv dim 10000 makes both blocks full: scale 1.
@pytest.mark.parametrize(("group", "rank", "scale"), [("lora", 8, 0.5), ("loha", 4, 0.5), ("lokr", 10000, 1.0)])
def test_preset_full_gives_the_convolutions_the_papers_conv_dim_and_alpha(group, rank, scale):
    run = next(r for r in load_sweep(PAPER) if r.config == f"{group}-preset_full")
    class_path, values = resolved(run)
    module, _, name = class_path.rpartition(".")
    settings = {k: v for k, v in values.items() if k not in ("lr", "text_encoder_lr")}
    strategy = getattr(importlib.import_module(module), name)(**settings)
    network = strategy.apply(torch.nn.ModuleDict({"conv_in": torch.nn.Conv2d(4, 32, 3)}))
    (conv,) = network.adapters()
    assert (conv.dim, conv.scale) == (rank, scale)
    assert group != "lokr" or (conv.full_w1 and conv.full_w2)


def test_emit_writes_commands_a_slurm_array_and_a_wandb_sweep(tmp_path, capsys):
    assert main(["sweep", str(PAPER), "--emit", str(tmp_path), "--data.init_args.root=/d", "--root=/r"]) == 0
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert len([c for c in commands if c.startswith("WANDB_RUN_GROUP=")]) == 78
    recipe = tmp_path / "recipes" / "loha-lr_0.001-seed23.yaml"
    # After the header lines, LoRA's 7 configurations and LoHa's first 5, 3 seeds each.
    assert commands[2 + 7 * 3 + 5 * 3] == \
        f"WANDB_RUN_GROUP=loha-lr_0.001 lycoflow fit {REPO / 'recipes' / 'loha.yaml'} {recipe}"
    assert yaml.safe_load(recipe.read_text()) == {
        "data": {"init_args": {"root": "/d"}}, "model": {"lr": 0.001}, "seed_everything": 23,
        "trainer": {"default_root_dir": "/r/loha-lr_0.001-seed23"}}
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
        "name": "lokr", "recipes": [str(REPO / "recipes" / "tiny.yaml")],
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


def test_jobs_run_side_by_side_with_their_output_in_each_run_folder(tiny, tmp_path, capsys):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "seeds": [0], "root": "runs", "configs": [{
        "name": "lokr", "recipes": [str(REPO / "recipes" / "tiny.yaml")],
        "vary": [{"model.adapter.init_args.factor": "not-a-number"}]}]}))
    quick = [*tiny, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
             "--trainer.logger=false", "--trainer.callbacks=[]"]
    assert main(["sweep", str(sweep), *quick, "--jobs=2"]) == 1
    out, err = capsys.readouterr()
    runs = tmp_path / "runs"
    assert f"(log: {runs / 'lokr-seed0' / 'sweep.log'})" in out and "sweep: 1 of 2 runs done; failed:" in out
    assert (runs / "lokr-seed0" / DONE).is_file() and "lokr-factor_not-a-number-seed0: failed (exit" in err
    assert "max_epochs=1` reached" in (runs / "lokr-seed0" / "sweep.log").read_text()  # its output, not ours
    assert "not-a-number" in (runs / "lokr-factor_not-a-number-seed0" / "sweep.log").read_text()
    assert main(["sweep", str(sweep), "--jobs=0"]) == 2 and "--jobs=0" in capsys.readouterr().err


def test_set_applies_to_every_variant_of_a_configuration_and_variants_win(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"seeds": [3], "configs": [{
        "name": "lora", "recipes": [str(REPO / "recipes" / "tiny.yaml")],
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
        "name": "lora", "recipes": [str(REPO / "recipes" / "tiny.yaml")],
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
