"""The quickstart dataset: byte-identical for a seed, shaped like the paper's data, loadable, learnable."""

import importlib
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from jsonargparse import ArgumentParser
from PIL import Image

from lycoflow.data import read_tags
from lycoflow.data.synthetic import MANIFEST_DATA, SyntheticConcepts, default_root, ensure_dataset


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_dataset(tmp_path_factory.mktemp("synthetic") / "concepts")


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    start = time.perf_counter()
    again = ensure_dataset(tmp_path / "again")
    assert time.perf_counter() - start < 5
    assert files(again) == files(dataset)
    other = files(ensure_dataset(tmp_path / "other", seed=1))
    assert other.keys() == files(dataset).keys()
    changed = [k for k, v in other.items() if k.endswith(".png") and v != files(dataset)[k]]
    assert len(changed) == 81
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temporary folders left


def test_shaped_like_the_paper_data(dataset):
    counts = Counter(str(p.parent.relative_to(dataset)) for p in dataset.rglob("*.png"))
    assert counts == {"shapes/star": 34, "shapes/ring": 6, "patterns/checker": 14, "patterns/stripes": 4,
                      "creatures/blob/red": 10, "creatures/blob/blue": 5, "creatures/robot": 8}
    sizes = {Image.open(p).size for p in dataset.rglob("*.png")}
    assert all(96 <= side <= 192 for size in sizes for side in size)
    assert len({round(w / h, 2) for w, h in sizes}) >= 5
    # Every concept-tied tag really occurs in its class's captions, so dropping it matters.
    for key, entry in MANIFEST_DATA["classes"].items():
        tags = {t for p in (dataset / key).rglob("*.txt") for t in read_tags(p)}
        assert set(entry["drop_tags"]) <= tags, key


def test_concepts_are_distinct_and_consistent(dataset):
    """Nearest class centroid of colour histograms recognises every image: each concept keeps its look."""
    def histogram(path: Path) -> np.ndarray:
        pixels = np.asarray(Image.open(path).convert("RGB")) // 64  # 4 levels per channel
        codes = pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]
        counts = np.bincount(codes.ravel(), minlength=64).astype(float)
        counts[counts.argmax()] = 0  # the background, shared between concepts on purpose
        return counts / counts.sum()

    paths = sorted(dataset.rglob("*.png"))
    labels = [str(p.parent.relative_to(dataset)) for p in paths]
    features = np.stack([histogram(p) for p in paths])
    classes = sorted(set(labels))
    centroids = np.stack([features[[lab == c for lab in labels]].mean(0) for c in classes])
    predicted = [classes[i] for i in np.linalg.norm(features[:, None] - centroids[None], axis=-1).argmin(1)]
    assert predicted == labels


def test_loads_through_the_data_module(dataset):
    dm = SyntheticConcepts(root=str(dataset), resolution=64, batch_size=8, caption_dropout=0.05)
    dm.setup("fit")
    assert [(c.key, c.descriptor, c.eval_text) for c in dm.concepts] == [
        ("creatures/blob/blue", "mox azure creature", "round blue crowned"),
        ("creatures/blob/red", "mox ruby creature", "round red"),
        ("creatures/robot", "bleep robot", "grey boxy"),
        ("patterns/checker", "chekk pattern", "orange and black checkerboard"),
        ("patterns/stripes", "strv pattern", "teal diagonal striped"),
        ("shapes/ring", "vorl ring", "thick magenta"),
        ("shapes/star", "zqx star", "yellow five-pointed"),
    ]
    assert dm.concepts[0].prompts == ("a {} wearing sunglasses",)
    assert len(dm.sampler) == 7 * 34
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    val = [c for b in dm.val_dataloader() for c in b["caption"]]
    assert len(val) == 81
    assert val[0] == "mox azure creature, looking left, small, on the left, white background, simple background"
    dropped = {t for c in dm.concepts for t in c.drop_tags}
    assert not dropped & {t for caption in val for t in caption.split(", ")[1:]}


def test_existing_root_is_reused_or_refused(dataset, tmp_path):
    manifest = dataset / "dataset.yaml"
    stamp = manifest.stat().st_mtime_ns
    SyntheticConcepts(root=str(dataset)).prepare_data()
    assert manifest.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="seed 3"):
        SyntheticConcepts(root=str(dataset), dataset_seed=3).prepare_data()
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match=str(tmp_path / "mine")):
        ensure_dataset(tmp_path / "mine")


def test_default_root_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LYCOFLOW_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "datasets" / "synthetic-concepts"
    dm = SyntheticConcepts(resolution=32)
    dm.setup("fit")
    assert Path(dm.root) == default_root() and len(dm.samples) == 81


def test_constructor_is_the_cli_schema():
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    config = parser.parse_args(["--data", "lycoflow.synthetic.SyntheticConcepts", "--data.resolution", "64",
                                "--data.balance", "class", "--data.repeats", "{shapes/star: 2}"])
    assert config.data.init_args.resolution == 64 and config.data.init_args.repeats == {"shapes/star": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "lycoflow.data.HierarchicalDataModule", "--data.root", "x",
                           "--data.balance", "classes"])


def test_old_module_names_resolve_to_the_moved_modules():
    # Old recipes and adapter files name lycoflow.synthetic / lycoflow.encodings.
    assert importlib.import_module("lycoflow.synthetic").SyntheticConcepts is SyntheticConcepts
    assert importlib.import_module("lycoflow.encodings") is importlib.import_module("lycoflow.data.encodings")
