"""Shared fixtures: tiny SD-1.x-architecture models built from config under a fixed seed (never downloaded)."""

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unet():
    from lycoflow.tiny import tiny_unet

    return tiny_unet(seed=0)


@pytest.fixture
def text_encoder():
    from lycoflow.tiny import tiny_text_encoder

    return tiny_text_encoder(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny SD 1.x diffusers folder (real CLIP tokenizer), written once per session."""
    from lycoflow.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """A tiny SDXL diffusers folder (both encoders, both tokenizers), written once per session."""
    from lycoflow.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The quickstart's generated data set, written once per session."""
    from lycoflow.data.synthetic import ensure_dataset

    return ensure_dataset(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="session")
def tiny(tiny_sd_folder, synthetic_root):
    """Overrides that swap a recipe's base model and data for the tiny model and the quickstart data set."""
    return [
        "--model.base=lycoflow.tiny.TinySD", f"--model.base.init_args.folder={tiny_sd_folder}",
        "--data=lycoflow.synthetic.SyntheticConcepts", f"--data.init_args.root={synthetic_root}",
        # The SD recipes' 320-960 px buckets cannot hold the 64 px data set.
        "--data.init_args.resolution=64", "--data.init_args.num_workers=0", "--data.init_args.bucketing=false",
        "--trainer.precision=32-true", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="session")
def tiny_sdxl(tiny, tiny_sdxl_folder):
    """`tiny`, with the tiny SDXL as the base (after an SDXL overlay, which sets a real SDXL's sizes)."""
    return [*tiny, "--model.base=lycoflow.tiny.TinySDXL", f"--model.base.init_args.folder={tiny_sdxl_folder}"]


def readme_modules() -> dict[str, str]:
    """The README's Python blocks that start with ``# <name>.py`` (its "Extending" examples), by file name."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (\w+\.py)", block))}


@pytest.fixture
def readme_examples(tmp_path, monkeypatch):
    """The README's example modules (my_algos, my_models, my_data) written to a folder on sys.path, importable
    by those names for one test (other tests write modules of the same names)."""
    modules = readme_modules()
    folder = tmp_path / "readme_examples"
    folder.mkdir()
    for name, code in modules.items():
        (folder / name).write_text(textwrap.dedent(code), encoding="utf-8")
        monkeypatch.delitem(sys.modules, name.removesuffix(".py"), raising=False)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in modules:
        sys.modules.pop(name.removesuffix(".py"), None)
