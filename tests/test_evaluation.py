"""Evaluation end to end: the Evaluation callback in a real fit of the tiny model on the generated data set (real
images on disk, metrics.csv, an offline W&B run), the Evaluator alone, `lycoflow evaluate`; and the values against
what they must be."""

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lycoris
from callbacks import AdapterExport, Evaluation
from lycoflow.cli import main
from lycoflow.data import SyntheticConcepts, letterbox, load_rgb, to_tensor
from lycoflow.evaluation import COMPUTATIONS, Evaluator, GenericProtocol, PaperProtocol, config_id, measuring
from lycoflow.evaluation.prompts import EvalPrompt
from lycoflow.evaluation.sampling import Sampler
from lycoflow.lightning_cli import run_lightning
from lycoflow.loggers import WandbLogger
from lycoflow.metrics import BY_NAME, COLUMNS
from lycoflow.metrics.encoders import TinyCLIP, TinyDINOv2, TinyVGG19
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD

TYPES = ["train", "trigger", "alter", "style", "agnostic"]


def settings(**kwargs) -> dict:
    """Small and fast settings (those of `Evaluation` and `Evaluator` alike)."""
    options = {"images": 2, "protocol": GenericProtocol(prompt_types=TYPES),
               "sampler": Sampler(steps=2, resolution=32, batch_size=16),
               "image_encoder": TinyDINOv2(), "text_image_encoder": TinyCLIP(), "style_encoder": TinyVGG19()}
    return {**options, **kwargs}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fitted(tiny_sd_folder, synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "lokr-run"
    torch.manual_seed(0)
    model = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoKr(factor=4, dim=10000, alpha=1))
    data = SyntheticConcepts(root=str(synthetic_root), resolution=32, batch_size=16)
    logger = WandbLogger(save_dir=str(run), name="lokr-run", offline=True)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, default_root_dir=run,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_train_batches=2, limit_val_batches=0,
                        callbacks=[AdapterExport(every_n_epochs=1), Evaluation(**settings())])
    trainer.fit(model, datamodule=data)
    return run, data, model


def test_every_saved_epoch_writes_images_metrics_and_a_wandb_run(fitted):
    run, data, _ = fitted
    concepts = data.concepts
    rows = read_rows(run / "metrics.csv")
    assert tuple(rows[0]) == COLUMNS
    # Per epoch, class and prompt type: the four metrics, plus the style loss for style prompts.
    per_epoch = len(concepts) * (len(TYPES) * 4 + 1)
    assert len(rows) == 2 * per_epoch
    assert {r["epoch"] for r in rows} == {"1", "2"} and {r["run"] for r in rows} == {"lokr-run"}
    assert {r["protocol"] for r in rows} == {"generic"}
    assert {r["metric"] for r in rows} == set(BY_NAME)
    assert {r["prompt_type"] for r in rows if r["metric"] == "style_loss"} == {"style"}
    assert {(r["category"], r["class"], r["subclass"]) for r in rows} == {
        (c.category, c.class_name, c.subclass) for c in concepts}
    for r in rows:
        value = float(r["value"])
        assert math.isfinite(value), r
        if r["metric"] in ("image_similarity", "text_image_similarity"):
            assert -1 <= value <= 1
        if r["metric"] == "vendi_score":  # 2 images of one prompt (trigger) or 2 prompts of 1 image (the rest)
            assert 1 - 1e-4 <= value <= 2 + 1e-4
        if r["metric"] in ("squared_centroid_distance", "style_loss"):
            assert value >= 0
    for epoch in (1, 2):
        images = sorted((run / "eval" / f"epoch={epoch}").rglob("*.png"))
        assert len(images) == len(concepts) * len(TYPES) * 2
    assert (run / "eval" / "epoch=1" / "style" / "shapes" / "star" / "0001.png").is_file()
    # Base images: once per run, for the style prompts only.
    assert len(list((run / "eval" / "base").rglob("*.png"))) == len(concepts) * 2
    # The offline W&B run holds the scalars, the per-class table and the image grids.
    wandb_files = {p.name for p in (run / "wandb").rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in wandb_files)
    media = list((run / "wandb").rglob("media/images/eval/images/**/*.png"))
    assert media and list((run / "wandb").rglob("media/table/eval/classes*.table.json"))


def test_untrained_adapter_has_zero_style_loss_and_is_deterministic(fitted, tiny_sd_folder, tmp_path):
    """Adapters at their zero init leave the model the base: generated == base images, style loss exactly 0; and
    evaluating twice gives the same table."""
    _, data, _ = fitted
    torch.manual_seed(0)
    model = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4)).eval()
    results = []
    for attempt in range(2):
        evaluator = Evaluator(**settings(protocol=GenericProtocol(prompt_types=["style", "trigger"])))
        result = evaluator.evaluate(model.components, list(model.networks.values()), data, tmp_path / str(attempt),
                                    epoch=1, step=0, run="zero", config="c", seed=0)
        assert (result.epoch, result.step, len(result.grids)) == (1, 0, len(data.concepts) * 2)
        results.append({(r["class"], r["subclass"], r["prompt_type"], r["metric"]): r["value"] for r in result.rows})
    losses = [v for (_, _, _, metric), v in results[0].items() if metric == "style_loss"]
    assert losses and all(v == 0.0 for v in losses)
    assert results[0] == results[1]


def test_config_id_ignores_seeds_run_folder_and_fits_own_options():
    a = "seed_everything: 1\nmodel:\n  seed: 1\n  lr: 0.1\ntrainer:\n  default_root_dir: runs/a\n"
    b = "seed_everything: 2\nmodel:\n  seed: 2\n  lr: 0.1\ntrainer:\n  default_root_dir: runs/b\nckpt_path: last\n"
    c = "seed_everything: 1\nmodel:\n  seed: 1\n  lr: 0.2\ntrainer:\n  default_root_dir: runs/a\n"
    assert config_id(a) == config_id(b) != config_id(c)


def test_config_id_ignores_compiling_and_an_unset_8bit_base_but_not_a_set_one():
    recipe = "model:\n  lr: 0.1\n{}"
    plain = config_id(recipe.format(""))
    assert plain == config_id(recipe.format("  compile: true\n")) == config_id(recipe.format("  quantize_base: null\n"))
    assert plain != config_id(recipe.format("  quantize_base: int8\n"))


def test_config_id_ignores_evaluating_the_base_but_not_other_evaluation_options():
    recipe = ("trainer:\n  callbacks:\n    - class_path: callbacks.Evaluation\n      init_args:\n"
              "        images: {}\n{}")
    plain, base, base_off = (recipe.format(6, extra) for extra in ("", "        base: true\n", "        base: false\n"))
    assert config_id(plain) == config_id(base) == config_id(base_off) != config_id(recipe.format(4, ""))


def test_config_id_names_moved_modules_by_their_old_names():
    """Recipes naming where a class lives now and old runs' recipes naming where it lived are one configuration."""
    recipe = ("data:\n  class_path: {}\ntrainer:\n  callbacks:\n  - class_path: callbacks.Evaluation\n"
              "    init_args:\n      sampler:\n        class_path: {}\n        init_args: {{steps: 10}}\n")
    old = config_id(recipe.format("lycoflow.synthetic.SyntheticConcepts", "lycoflow.generation.Sampler"))
    new = config_id(recipe.format("lycoflow.data.synthetic.SyntheticConcepts", "lycoflow.evaluation.sampling.Sampler"))
    assert old == new != config_id(recipe.format("lycoflow.data.synthetic.SyntheticConcepts", "my.own.Sampler"))


def test_every_metric_of_the_table_is_computed_once():
    assert list(COMPUTATIONS) == list(BY_NAME)


def test_lycoflow_evaluate_reproduces_the_evaluation_of_training(tiny, tmp_path):
    """The adapter file alone (its recipe is inside) gives the metrics the run computed at that epoch; overrides
    apply on top of the stored recipe (here: a W&B logger, which the run had turned off)."""
    run = tmp_path / "run"
    run_lightning(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}",
                   "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
                   "--trainer.logger=false"])
    during = read_rows(run / "metrics.csv")
    assert main(["evaluate", "--adapter", str(run / "adapters" / "epoch=1.safetensors"),
                 "--out", str(tmp_path / "again"), "--trainer.logger=lycoflow.loggers.WandbLogger"]) == 0
    after = read_rows(tmp_path / "again" / "metrics.csv")
    assert len(after) == len(during) > 0
    assert {r["run"] for r in during} == {"run"} and {r["run"] for r in after} == {"again"}  # named by folder
    for a, b in zip(during, after):
        assert {k: v for k, v in a.items() if k not in ("run", "value")} == \
            {k: v for k, v in b.items() if k not in ("run", "value")}
        # The file holds float16 weights; training evaluated float32 ones.
        assert float(a["value"]) == pytest.approx(float(b["value"]), abs=2e-3, rel=1e-2), a
    assert list((tmp_path / "again" / "wandb").glob("offline-run-*"))
    assert len(list((tmp_path / "again" / "eval" / "epoch=1").rglob("*.png"))) == len(list(
        (run / "eval" / "epoch=1").rglob("*.png")))


def test_lycoflow_evaluate_errors_name_the_file(tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(foreign))
    assert main(["evaluate", "--adapter", str(foreign)]) == 2
    assert f"{foreign} holds no recipe (it was not written by lycoflow): name one" in capsys.readouterr().err
    assert main(["evaluate", "--adapter", str(tmp_path / "missing.safetensors")]) == 2
    assert "adapter file not found" in capsys.readouterr().err
    assert main(["evaluate"]) == 2
    assert "name the adapter file" in capsys.readouterr().err


def test_references_of_bucketed_data_are_square_crops_and_sampling_uses_the_trained_prediction_type(
        tiny_sd_folder, synthetic_root):
    data = SyntheticConcepts(root=str(synthetic_root), resolution=128, batch_size=8, bucketing=True,
                             min_bucket_resolution=64, max_bucket_resolution=256, bucket_step=32)
    data.setup("fit")
    assert len(set(data.buckets)) >= 3
    references = Evaluator(**settings()).references(data, TinyDINOv2(), torch.device("cpu"), 32)
    assert {key: len(r) for key, r in references.items()} == {c.key: len(c.images) for c in data.concepts}
    model = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4),
                              prediction_type="v_prediction")
    assert model.components.scheduler.config["prediction_type"] == "v_prediction"  # the base model's: epsilon


def test_validate_leaves_the_runs_config_alone(tiny, tmp_path):
    run = tmp_path / "run"
    quick = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.logger=false",
             "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]"]
    run_lightning(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}",
                   "--trainer.max_epochs=1", *quick])
    before = (run / "config.yaml").read_text()
    assert main(["validate", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}", *quick,
                 "--data.init_args.caption_dropout=0.5", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert (run / "config.yaml").read_text() == before


def test_the_paper_protocol_measures_style_prompts_by_style_loss_alone(fitted, tmp_path):
    """Its rows: train, trigger and alter with the four image/text/diversity metrics, style with the style loss
    only; the protocol column says which; every leaf gets every type but the style concept (styles/beaded), which
    gets no style prompts."""
    _, data, model = fitted
    evaluator = Evaluator(**settings(protocol=PaperProtocol(), images=3))
    result = evaluator.evaluate(model.components, list(model.networks.values()), data, tmp_path, epoch=1, step=0,
                                run="paper", config="c", seed=0)
    by_type: dict[str, set[str]] = {}
    for row in result.rows:
        by_type.setdefault(row["prompt_type"], set()).add(row["metric"])
    assert by_type == {"train": set(BY_NAME) - {"style_loss"}, "trigger": set(BY_NAME) - {"style_loss"},
                       "alter": set(BY_NAME) - {"style_loss"}, "style": {"style_loss"}}
    assert {r["protocol"] for r in read_rows(tmp_path / "metrics.csv")} == {"paper"}
    styles = [c.key for c in data.concepts if c.category == "styles"]
    assert styles == ["styles/beaded"]
    assert len(result.rows) == len(data.concepts) * (3 * 4 + 1) - len(styles)
    assert not [r for r in result.rows if r["category"] == "styles" and r["prompt_type"] == "style"]


def test_vendi_is_pooled_or_per_prompt_as_the_protocol_says():
    """Four orthogonal embeddings from two prompts of two images each: pooled, four distinct images (Vendi 4);
    per prompt, two of each prompt (Vendi 2 each, mean 2)."""
    prompts = [EvalPrompt("c", "k", "", t, i, f"p{i // 2}", "x", i // 2, i) for t in ("train", "alter")
               for i in range(4)]
    records = [measuring.Record(n, torch.eye(4)[n % 4], 0.5, None) for n in range(8)]
    values = measuring.metric_values(prompts, records, {"c/k": torch.eye(4)}, PaperProtocol())
    assert {v.prompt.prompt_type: v.values["vendi_score"] for v in values} == pytest.approx(
        {"train": 4.0, "alter": 2.0})
    values = measuring.metric_values(prompts, records, {"c/k": torch.eye(4)}, GenericProtocol())
    assert {v.prompt.prompt_type: v.values["vendi_score"] for v in values} == pytest.approx(
        {"train": 2.0, "alter": 2.0})


def test_letterbox_keeps_the_whole_image_between_black_bars():
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    square = np.asarray(letterbox(wide, 30))
    assert square.shape == (30, 30, 3)
    assert (square[:10] == 0).all() and (square[20:] == 0).all() and (square[10:20] == (255, 0, 0)).all()
    tall = np.asarray(letterbox(Image.new("RGB", (5, 8), (0, 255, 0)), 8))  # the odd pixel of padding on the right
    assert (tall[:, :1] == 0).all() and (tall[:, 1:6] == (0, 255, 0)).all() and (tall[:, 6:] == 0).all()
    small = np.asarray(letterbox(wide, 15)).astype(int)  # then resized into the encoder's square
    assert small.shape == (15, 15, 3)
    assert (small[:4] == 0).all() and (small[11:] == 0).all() and (small[6:9, :, 0] == 255).all()


def test_paper_references_are_letterboxed_into_the_encoders_square(synthetic_root):
    """The paper fits the whole dataset image into DINOv2's 224² input (here the tiny one's 56²), not a crop."""
    data = SyntheticConcepts(root=str(synthetic_root), resolution=32, batch_size=8)
    data.setup("fit")
    encoder = TinyDINOv2()
    seen = []

    class Spy:
        name, pretrained, image_size = "spy", False, encoder.image_size

        def embed_images(self, images):
            seen.append(images.shape[-2:])
            return encoder.embed_images(images)

    references = Evaluator(**settings(protocol=PaperProtocol())).references(data, Spy(), torch.device("cpu"), 32)
    assert set(seen) == {torch.Size([56, 56])}
    path = data.samples[0].path
    expected = encoder.embed_images((to_tensor(letterbox(load_rgb(path), 56)) + 1)[None] / 2)
    assert torch.allclose(references[data.concepts[data.samples[0].concept].key][0], expected[0], atol=1e-6)


def test_the_summary_table_averages_subclasses_then_classes_per_epoch(tmp_path):
    from lycoflow.evaluation.table import summary

    rows = [  # (epoch, class, subclass, prompt type, metric, value)
        (0, "star", "", "trigger", "image_similarity", 0.1), (0, "blob", "red", "trigger", "image_similarity", 0.2),
        (0, "blob", "blue", "trigger", "image_similarity", 0.4), (0, "star", "", "trigger", "vendi_score", 2.0),
        (0, "blob", "red", "trigger", "vendi_score", 4.0), (0, "star", "", "alter", "vendi_score", 1.0),
        (5, "star", "", "trigger", "image_similarity", 0.5), (5, "blob", "red", "trigger", "image_similarity", 0.7),
    ]
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for epoch, klass, sub, kind, metric, value in rows:
            writer.writerow(["r", "c", "toy-world", 0, epoch, epoch * 10, "x", klass, sub, kind, metric, value])
        writer.writerow(["other", "c", "toy-world", 0, 5, 50, "x", "star", "", "trigger", "image_similarity", 9.0])
    lines = [line.split() for line in summary(path, "r").splitlines()[1:]]
    # blob's subclasses average to 0.3, then the classes to 0.2; diversity is Vendi on the trigger prompt; no style
    # rows give "-"; the other run's row is not counted.
    assert lines == [["0", "(base)", "0.200", "-", "3.000", "-"], ["5", "0.600", "-", "-", "-"]]
