"""The SD recipes carry the paper's training settings (PAPER-EVAL §5), which every run of its grid shares."""

from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SD_RECIPES = ["lora", "loha", "lokr", "dora", "dylora", "glora", "ia3", "oft", "boft", "full"]


@pytest.mark.parametrize("name", SD_RECIPES)
def test_every_sd_recipe_has_the_papers_training_settings(name):
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    model, data, trainer = recipe["model"], recipe["data"]["init_args"], recipe["trainer"]
    assert model["optimizer"] == {"class_path": "lycoflow.optim.AdamW8bit",
                                  "init_args": {"weight_decay": 0.1, "betas": [0.9, 0.99]}}
    assert model["warmup_steps"] == 3500 and model.get("lr_scheduler") is None  # constant after the warmup
    assert model["max_token_length"] == 150 and model["text_encoder_lr"] is None and model["train_text_encoder"]
    assert (model["min_snr_gamma"], model["noise_offset"]) == (None, 0.0)
    assert model["adapter"]["init_args"]["preset"] == "attn-mlp"
    assert {k: data[k] for k in ("resolution", "batch_size", "caption_dropout", "bucketing", "min_bucket_resolution",
                                 "max_bucket_resolution", "bucket_step", "bucket_no_upscale")} == {
        "resolution": 512, "batch_size": 8, "caption_dropout": 0.05, "bucketing": True, "min_bucket_resolution": 320,
        "max_bucket_resolution": 960, "bucket_step": 64, "bucket_no_upscale": False}
    # No flip, no tag shuffling or dropout: the data module's defaults.
    assert not ({"flip", "shuffle_tags", "tag_dropout"} & set(data))
    assert (trainer["max_epochs"], trainer["precision"], trainer["gradient_clip_val"]) == (50, "bf16-mixed", 1.0)
    assert "gradient_clip_algorithm" not in trainer  # Lightning's default: by norm
