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
    assert len(changed) == 93
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temporary folders left


def test_shaped_like_the_paper_data(dataset):
    counts = Counter(str(p.parent.relative_to(dataset)) for p in dataset.rglob("*.png"))
    assert counts == {"shapes/star": 34, "shapes/ring": 6, "patterns/checker": 14, "patterns/stripes": 4,
                      "creatures/blob/red": 10, "creatures/blob/blue": 5, "creatures/robot": 8, "styles/beaded": 12}
    sizes = {Image.open(p).size for p in dataset.rglob("*.png")}
    assert all(96 <= side <= 192 for size in sizes for side in size)
    assert len({round(w / h, 2) for w, h in sizes}) >= 5
    # Every concept-tied tag really occurs in its class's captions, so dropping it matters.
    for key, entry in MANIFEST_DATA["classes"].items():
        tags = {t for p in (dataset / key).rglob("*.txt") for t in read_tags(p)}
        assert set(entry["drop_tags"]) <= tags, key


def test_concepts_are_distinct_and_consistent(dataset):
    """Nearest class centroid of colour histograms recognises every image of the object concepts: each keeps its
    look (the style concept keeps its rendering instead: `test_the_style_concept_is_a_rendering_of_varied_content`)."""
    def histogram(path: Path) -> np.ndarray:
        pixels = np.asarray(Image.open(path).convert("RGB")) // 64  # 4 levels per channel
        codes = pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]
        counts = np.bincount(codes.ravel(), minlength=64).astype(float)
        counts[counts.argmax()] = 0  # the background, shared between concepts on purpose
        return counts / counts.sum()

    paths = sorted(p for p in dataset.rglob("*.png") if not p.is_relative_to(dataset / "styles"))
    labels = [str(p.parent.relative_to(dataset)) for p in paths]
    features = np.stack([histogram(p) for p in paths])
    classes = sorted(set(labels))
    centroids = np.stack([features[[lab == c for lab in labels]].mean(0) for c in classes])
    predicted = [classes[i] for i in np.linalg.norm(features[:, None] - centroids[None], axis=-1).argmin(1)]
    assert predicted == labels


def test_the_style_concept_is_a_rendering_of_varied_content(dataset):
    """Every beaded picture is cream where four beads meet, and nothing else in the data set is; what they show
    varies, as their captions say: several figures, colours, sizes and positions."""
    from lycoflow.data.synthetic import BEADS, CREAM

    def cream_at_corners(path: Path) -> float:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        rows, columns = pixels.shape[0] / BEADS, pixels.shape[1] / BEADS
        corners = [pixels[round(i * rows), round(j * columns)] for i in range(1, BEADS) for j in range(1, BEADS)]
        return float(np.mean([np.abs(c - CREAM).max() < 12 for c in corners]))

    beaded = sorted((dataset / "styles" / "beaded").glob("*.png"))
    others = [p for p in dataset.rglob("*.png") if p not in beaded]
    assert min(cream_at_corners(p) for p in beaded) > 0.9
    assert max(cream_at_corners(p) for p in others) < 0.1
    tags = [read_tags(p.with_suffix(".txt")) for p in beaded]
    assert all(t[0] == "beaded" and t[-1].endswith(" background") for t in tags)
    for position, least in ((1, 4), (2, 4), (3, 2), (4, 3)):  # colour, figure, size, position
        assert len({t[position] for t in tags}) >= least, [t[position] for t in tags]


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
        ("styles/beaded", "drell style", "drell"),
    ]
    assert dm.concepts[-1].evaluated_descriptor == ""  # a style descriptor is deleted from CLIP's texts
    assert dm.concepts[0].prompts == ("a {} wearing sunglasses",)
    assert len(dm.sampler) == 8 * 34
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    val = [c for b in dm.val_dataloader() for c in b["caption"]]
    assert len(val) == 93
    assert val[0] == "mox azure creature, looking left, small, on the left, white background, simple background"
    for concept in dm.concepts:  # its own drop tags are gone from its captions (others may use the words)
        tags = {t for caption in val if caption.startswith(concept.descriptor + ",") for t in caption.split(", ")[1:]}
        assert tags and not set(concept.drop_tags) & tags, concept.key


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


def test_a_copy_from_an_older_generator_is_replaced_and_said(dataset, tmp_path, capsys):
    import shutil

    from lycoflow.data.synthetic import MARKER

    stale = tmp_path / "stale"
    shutil.copytree(dataset, stale)
    (stale / MARKER).write_text('{"generator": 1, "seed": 0}\n')
    (stale / "shapes" / "star" / "000.png").write_bytes(b"an old drawing")
    assert ensure_dataset(stale) == stale
    assert files(stale) == files(dataset)
    assert "replaced the quickstart dataset of generator version 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]  # neither the new nor the old copy left over
    (stale / MARKER).write_text('{"generator": 1, "seed": 5}\n')  # another seed's copy is not ours to replace
    with pytest.raises(FileExistsError, match="seed 0"):
        ensure_dataset(stale)


def test_default_root_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LYCOFLOW_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "datasets" / "synthetic-concepts"
    dm = SyntheticConcepts(resolution=32)
    dm.setup("fit")
    assert Path(dm.root) == default_root() and len(dm.samples) == 93


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
