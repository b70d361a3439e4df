"""`lycoflow fit` end to end on the tiny model and the generated data set: every recipe instantiates, training
writes adapter files the ecosystem loads, resuming continues exactly, and user errors are one clear message."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors import safe_open

import lycoris
from lycoflow.cli import main
from lycoflow.lightning_cli import run_lightning
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD
from lycoris.rotation import RowRotation

#: Whole recipes; `toy-world.yaml` and `sdxl.yaml` are overlays for them (tests/test_toy_world.py and
#: tests/test_sdxl.py instantiate each over every recipe).
OVERLAYS = ("toy-world", "sdxl")
RECIPES = sorted(p for p in Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml") if p.stem not in OVERLAYS)


# The SD recipes' callbacks without their Evaluation, whose real encoders (DINOv2, CLIP, VGG19) need downloads.
WITHOUT_EVALUATION = ("--trainer.callbacks=[{class_path: callbacks.AdapterExport, init_args: {every_n_epochs: 5}}, "
                      "{class_path: callbacks.RunCheckpoint}]")


def fit(recipe, tiny, run_dir, *extra):
    return run_lightning(["fit", str(recipe), *tiny, f"--trainer.default_root_dir={run_dir}", *extra])


def sample_inputs(model):
    gen = torch.Generator().manual_seed(7)
    latents, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700])
    ids = model.tokenizer(["zqx star, red", "a photo"], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    return latents, t, ids


@torch.no_grad()
def run_model(unet, text_encoder, inputs):
    latents, t, ids = inputs
    context = text_encoder(ids)[0]
    return context, unet(latents, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_instantiates_with_the_tiny_model(recipe, tiny):
    config = yaml.safe_load(recipe.read_text())
    cli = run_lightning(["fit", str(recipe), *tiny, "--trainer.logger=false"], run=False)
    assert isinstance(cli.model, DiffusionFinetune)
    assert type(cli.model.adapter).__module__.split(".")[0] == "lycoris"
    assert f"lycoris.{type(cli.model.adapter).__name__}" == config["model"]["adapter"]["class_path"]
    assert set(cli.model.networks) == {"lora_unet", "lora_te"}  # the paper trains the text encoder too
    assert cli.trainer.max_epochs == config["trainer"]["max_epochs"]
    exports = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AdapterExport"]
    assert len(exports) == 1 and exports[0].every_n_epochs == config["trainer"]["callbacks"][0]["init_args"][
        "every_n_epochs"]
    if recipe.stem not in ("quickstart", "tiny"):  # the paper's shared defaults (issue 3)
        assert config["model"]["adapter"]["init_args"]["preset"] == "attn-mlp"
        assert config["data"]["init_args"]["batch_size"] == 8 and config["trainer"]["max_epochs"] == 50
        assert config["data"]["init_args"]["caption_dropout"] == 0.05
        assert exports[0].every_n_epochs == 5
        paper = {"lora": {"dim": 8, "alpha": 4}, "loha": {"dim": 4, "alpha": 2},
                 "lokr": {"factor": 8, "dim": 10000, "alpha": 1}}.get(recipe.stem, {})
        assert {k: getattr(cli.model.adapter, k) for k in paper} == paper
        assert cli.model.lr == (1e-6 if recipe.stem == "full" else 5e-3 if recipe.stem == "ia3" else 5e-4)


def test_recipes_merge_in_order_then_overrides_with_interpolation(tiny, tmp_path):
    second = tmp_path / "mine.yaml"
    second.write_text("model:\n  lr: 2.0e-4\n  text_encoder_lr: ${model.lr}\n  adapter:\n    init_args:\n"
                      "      factor: 4\ntrainer:\n  max_epochs: 7\n")
    cli = run_lightning(["fit", "recipes/lokr.yaml", str(second), *tiny, "--trainer.logger=false",
                         "--trainer.max_epochs=9"], run=False)
    assert (cli.model.lr, cli.model.text_encoder_lr) == (2e-4, 2e-4)  # from the second recipe, interpolated
    assert cli.model.adapter.factor == 4 and cli.model.adapter.dim == 10000  # merged into the first's adapter
    assert cli.trainer.max_epochs == 9  # the command line wins


@pytest.mark.parametrize("name", ["lora", "lokr", "full"])
def test_fit_writes_adapter_files_that_reproduce_the_trained_model(name, tiny, tmp_path):
    run = tmp_path / name
    cli = fit(f"recipes/{name}.yaml", tiny, run, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=0", "--model.lr=1e-3", "--model.warmup_steps=0", "--trainer.logger=false",
              WITHOUT_EVALUATION)  # two steps at 1/3500 of the rate would barely move the model
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    model = cli.model
    path = run / "adapters" / "epoch=1.safetensors"  # the last epoch is always saved
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)  # the name the UIs look up
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sd_v1"
    # SDXL's metadata (prediction type, SAI model spec) is not written into SD 1.x files, which stay as they were.
    assert not [k for k in meta if k.startswith(("ss_v_parameterization", "ss_zero_terminal_snr", "modelspec."))]
    assert json.loads(meta["ss_network_args"])["algo"] == name and meta["ss_epoch"] == "1"
    assert meta["ss_output_name"] == name
    recipe = yaml.safe_load(meta["lycoflow_recipe"])
    assert recipe["model"]["adapter"]["class_path"] == type(model.adapter).__module__.split(".")[0] + "." + \
        type(model.adapter).__name__ and recipe["trainer"]["default_root_dir"] == str(run)

    # Only the adapters are checkpointed, and the checkpoint resumes.
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("networks.") for k in state)

    # The file on a fresh base model reproduces the trained model (fp16 file, float32 file exactly).
    model.eval()
    inputs = sample_inputs(model)
    trained = run_model(model.unet, model.text_encoder, inputs)
    fresh = TinySD(folder=str(model.base_source.folder)).load()
    base = run_model(fresh.unet, fresh.text_encoder, inputs)
    assert (trained[1] - base[1]).abs().max() > 1e-4  # training moved the model
    exact = model.save_adapter(tmp_path / "exact.safetensors", dtype="float32")
    for file, tol in ((exact, 1e-5), (path, 2e-3)):
        fresh = TinySD(folder=str(model.base_source.folder)).load()
        lycoris.load_file(file, {"lora_unet": fresh.unet, "lora_te": fresh.text_encoder})
        for got, want in zip(run_model(fresh.unet, fresh.text_encoder, inputs), trained):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


class Crash(L.Callback):
    """Fails the run at the start of its third epoch, as a killed job would."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


class CrashWhileSaving(L.Callback):
    """From the second epoch on, the checkpoint writer dies halfway through its file, as a killed job would."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            def half_written(checkpoint, path, storage_options=None):
                Path(path).write_bytes(b"PK\x03\x04 truncated")
                raise RuntimeError("killed while saving")

            trainer.strategy.checkpoint_io.save_checkpoint = half_written


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tiny, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed while saving"):
        fit("recipes/tiny.yaml", tiny, run, "--trainer.max_epochs=3", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks+=test_fit.CrashWhileSaving")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # epoch 1's, readable
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 1
    resumed = fit("recipes/tiny.yaml", tiny, run, "--trainer.max_epochs=2", "--trainer.limit_train_batches=1",
                  "--trainer.limit_val_batches=0", "--trainer.logger=false", "--ckpt_path=last")
    assert resumed.trainer.global_step == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # the stray temporary file is gone


def test_resuming_with_another_adapter_is_refused_and_keeps_the_runs_config(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    quick = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
             "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]"]
    fit("recipes/tiny.yaml", tiny, run, "--trainer.max_epochs=1", *quick)
    before = (run / "config.yaml").read_text()
    assert yaml.safe_load(before)["model"]["adapter"]["init_args"]["factor"] == 8
    assert main(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}",
                 "--trainer.max_epochs=2", *quick, "--model.adapter.init_args.factor=4", "--ckpt_path=last"]) == 2
    assert "this checkpoint was written with a different adapter configuration" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("adapter", [
    [],  # the quickstart's LoKr
    # DyLoRA draws a rank per step and dropouts draw masks: from the global RNG, which resuming must not disturb.
    ["--model.adapter=lycoris.DyLoRA", "--model.adapter.init_args.dim=8", "--model.adapter.init_args.block_size=2",
     "--model.adapter.init_args.dropout=0.1", "--model.adapter.init_args.module_dropout=0.2"],
], ids=["lokr", "dylora-dropout"])
def test_resume_after_a_crash_continues_exactly(adapter, tiny, tmp_path, caplog):
    common = ("recipes/tiny.yaml", tiny)
    opts = ("--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--trainer.logger=false", "--data.init_args.caption_dropout=0.3", "--data.init_args.flip=true",
            "--model.noise_offset=0.05", *adapter)
    straight = fit(*common, tmp_path / "straight", *opts)
    assert type(straight.model.adapter).__name__ == ("DyLoRA" if adapter else "LoKr")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(*common, tmp_path / "resumed", *opts, "--trainer.callbacks+=test_fit.Crash")
    # The quickstart validates every 3rd epoch only; the checkpoint must follow every epoch regardless.
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    caplog.clear()
    resumed = fit(*common, tmp_path / "resumed", *opts, "--ckpt_path=last")
    assert "Restored all states from the checkpoint" in caplog.text
    assert resumed.trainer.global_step == straight.trainer.global_step == 9
    torch.testing.assert_close(resumed.trainer.callback_metrics["train/loss"],
                               straight.trainer.callback_metrics["train/loss"], atol=1e-6, rtol=1e-5)
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


#: The factored paths, forced on every adapted layer (their cost models choose per layer and call): LoKr through
#: reshapes (the tiny recipe's LoKr), OFT's and BOFT's rotated outputs, DoRA through its factors; with the
#: parameter each starts at zero, which training must move.
FACTORED = {
    "lokr": ([], (lycoris.LoKrAdapter, "_cheaper_by_reshape"), "lokr_w2"),
    "oft": (["--model.adapter=lycoris.OFT", "--model.adapter.init_args.dim=4"],
            (RowRotation, "_bypass_cheaper"), "oft_blocks"),
    "boft": (["--model.adapter=lycoris.BOFT", "--model.adapter.init_args.dim=4"],
             (RowRotation, "_bypass_cheaper"), "oft_blocks"),
    "dora": (["--model.adapter=lycoris.LoRA", "--model.adapter.init_args.dim=4",
              "--model.adapter.init_args.weight_decompose=true"], (lycoris.LoRAAdapter, "_factors_cheaper"),
             "lora_up.weight"),
}


@pytest.mark.parametrize("name", FACTORED)
def test_resume_on_the_factored_paths_continues_exactly(name, tiny, tmp_path, monkeypatch):
    adapter, choice, zero_init = FACTORED[name]
    chosen = []
    monkeypatch.setattr(*choice, lambda self, x: chosen.append(self.name) or True)
    opts = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]",
            "--model.train_text_encoder=false", *adapter)
    straight = fit("recipes/tiny.yaml", tiny, tmp_path / "straight", *opts)
    assert len(set(chosen)) > 4
    fit("recipes/tiny.yaml", tiny, tmp_path / "resumed", *opts, "--trainer.max_epochs=1")
    resumed = fit("recipes/tiny.yaml", tiny, tmp_path / "resumed", *opts, "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    moved = [t.abs().sum() > 0 for k, t in a.items() if k.endswith(zero_init)]
    assert a.keys() == b.keys() and moved and all(moved)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("mode", ["no-key", "online-fails", "disabled"])
def test_wandb_runs_offline_by_itself_and_never_stops_training(mode, tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`
    extra = {"no-key": [], "online-fails": ["--trainer.logger.init_args.offline=false"], "disabled": []}[mode]
    if mode == "disabled":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "logged"
    cli = fit("recipes/tiny.yaml", tiny, run, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", *extra)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["adapter"]["class_path"] == "lycoris.LoKr"
    offline = list((run / "wandb").glob("offline-run-*"))
    if mode == "disabled":
        import wandb

        # Finished: a later fit in this process starts a run of its own, not the disabled one.
        assert not offline and "W&B" not in caplog.text and wandb.run is None
        return
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert f"W&B run written offline to {offline[0]}" in caplog.text
    if mode == "no-key":
        assert "no API key found" in caplog.text


@pytest.mark.parametrize(("args", "message"), [
    (["--model.foo=1"], "unrecognized arguments: --model.foo=1"),
    (["--model.lr=abc"], 'Parser key "model.lr"'),
    (["--model.adapter=lycoris.NoSuch"], "module 'lycoris' has no attribute 'NoSuch'"),
    (["--model.adapter.init_args.preset=everything"], "Given value: everything"),
    (["--model.base.init_args.path=/nonexistent/sd.safetensors"], "checkpoint not found: /nonexistent/sd.safetensors"),
    (["--model.adapter.init_args.dim=0"], "LoRA: dim=0 must be >= 1"),
    (["--model.lr=0"], "model.lr=0.0 must be > 0"),
    (["--model.text_encoder_lr=-1e-4"], "model.text_encoder_lr=-0.0001 must be > 0"),
])
def test_user_errors_are_one_clear_message(args, message, capsys):
    assert main(["fit", "recipes/lora.yaml", "--data.init_args.root=/nonexistent", "--trainer.logger=false",
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 8


def test_unreadable_recipes_are_named(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.yaml")]) == 2
    assert f"recipe not found: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1, 2\n")
    assert main(["fit", str(bad)]) == 2
    assert f"recipe {bad} is not valid YAML" in capsys.readouterr().err
    for text, what in (("", "empty"), ("# only a comment\n", "empty"), ("- model\n", "not a mapping")):
        bad.write_text(text)
        assert main(["fit", str(bad)]) == 2
        assert f"recipe {bad} is {what}: a recipe holds sections" in capsys.readouterr().err
    assert main(["fitt"]) == 2 and "unknown command 'fitt'" in capsys.readouterr().err


def test_a_run_folder_that_is_a_file_is_named(tiny, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("the user's own file")
    assert main(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={taken}"]) == 2
    err = capsys.readouterr().err
    assert f"trainer.default_root_dir {taken} is a file, not a folder" in err and "Traceback" not in err
    assert taken.read_text() == "the user's own file"


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit " in out and "validate " in out and "recipes/quickstart.yaml" in out


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny, tmp_path):
    """Lightning re-launches `python -m lycoflow.cli` per rank (gloo on CPU); the ranks share each epoch."""
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "lycoflow.cli", "fit", "recipes/tiny.yaml", *tiny,
         f"--trainer.default_root_dir={run}", "--trainer.strategy=ddp", "--trainer.devices=2",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
         "--trainer.logger=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and (run / "adapters" / "epoch=1.safetensors").is_file()
    # The quickstart's evaluation ran sharded over the two ranks and was gathered: every class, type and image.
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * (4 * 4 + 1) and {r["epoch"] for r in rows} == {"1"}  # 8 leaves, 4 types, 4 metrics
    assert len(list((run / "eval" / "epoch=1").rglob("*.png"))) == 8 * 4 * 4


def test_missing_evaluation_encoders_stop_the_run_before_training(tiny, tmp_path, capsys):
    """The SD recipes evaluate with DINOv2/CLIP/VGG19; offline and not cached, the run stops at setup, not after
    an epoch of training."""
    run = tmp_path / "lora"
    assert main(["fit", "recipes/lora.yaml", *tiny, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1",
                 "--trainer.logger=false"]) == 2
    err = capsys.readouterr().err
    assert "could not load DINOv2 model 'facebook/dinov2-large'" in err and "Download it once" in err
    assert not (run / "adapters").exists() and not (run / "checkpoints").exists()
