"""HierarchicalDataModule: balance, captions, determinism, validation order, bad input, DDP shards (real files)."""

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from PIL import Image

from lycoflow.data import (
    HierarchicalDataModule,
    bucket_sizes,
    build_caption,
    load_rgb,
    probe_image,
    square_crop,
    to_tensor,
)


def noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (4, 4), caption: str | None = None) -> Path:
    """``counts`` maps folders to image counts; every image is distinct noise, with ``caption`` beside it."""
    for k, (folder, n) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            noise_image(root / folder / f"{i:03d}.png", size, seed=1000 * k + i)
            if caption is not None:
                (root / folder / f"{i:03d}.txt").write_text(caption)
    return root


def module(root: Path, **kwargs) -> HierarchicalDataModule:
    dm = HierarchicalDataModule(str(root), **{"resolution": 4, **kwargs})
    dm.setup("fit")
    return dm


def epoch_batches(dm: HierarchicalDataModule, epoch: int) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def leaf(batch: dict, j: int) -> str:
    return "/".join(p for p in (batch["category"][j], batch["class"][j], batch["subclass"][j]) if p)


def leaf_counts(batches: list[dict]) -> Counter:
    return Counter(leaf(b, j) for b in batches for j in range(len(b["path"])))


IMBALANCED = {"big/many": 200, "small/few": 4, "toys/bear/red": 7, "toys/bear/blue": 13}


def test_every_leaf_class_gets_equal_exposure_each_epoch(tmp_path):
    dm = module(make_tree(tmp_path, IMBALANCED), batch_size=100)
    batches = epoch_batches(dm, 0)
    assert leaf_counts(batches) == {"big/many": 200, "small/few": 200, "toys/bear/red": 200, "toys/bear/blue": 200}
    per_image = Counter(p for b in batches for p in b["path"])
    assert {per_image[str(p)] for p in dm.concepts[1].images} == {50}  # small/few: 4 images x 50
    for epoch in (1, 2, 7):
        dm.sampler.set_epoch(epoch)
        plan = dm.sampler.epoch_plan()
        by_leaf = Counter(dm.concepts[dm.samples[i].concept].key for i, _ in plan)
        assert set(by_leaf.values()) == {200}
        # Within a leaf the 200 exposures spread evenly: 13 images get 15 or 16 each.
        blue = Counter(i for i, _ in plan if dm.samples[i].path.parent.name == "blue")
        assert sorted(set(blue.values())) == [15, 16] and len(blue) == 13
    np.testing.assert_allclose(dm.exposures, [200, 200, 200, 200])


def test_balance_modes_and_explicit_repeats(tmp_path):
    root = make_tree(tmp_path, IMBALANCED)
    def counts(**kwargs) -> Counter:
        dm = module(root, **kwargs)
        return Counter(dm.concepts[dm.samples[i].concept].key for i, _ in dm.sampler.epoch_plan())

    by_class = counts(balance="class")
    assert by_class["big/many"] == by_class["small/few"] == 200
    assert by_class["toys/bear/red"] + by_class["toys/bear/blue"] == 200
    assert counts(balance="category")["small/few"] == 200
    assert counts(balance="none") == {"big/many": 200, "small/few": 4, "toys/bear/red": 7, "toys/bear/blue": 13}
    # Explicit repeats leave the balancing: small/few gets exactly 4 x 3, toys/bear's subclasses 2 per image.
    fixed = counts(repeats={"small/few": 3, "toys/bear": 2})
    assert fixed == {"big/many": 200, "small/few": 12, "toys/bear/red": 14, "toys/bear/blue": 26}


def test_plain_and_kohya_folders_without_manifest(tmp_path):
    root = make_tree(tmp_path, {"10_cat": 3, "dog": 2, "pets/hamster": 1}, caption="cat, sitting, indoors")
    dm = module(root)
    assert [(c.category, c.class_name, c.subclass, c.trigger, c.repeats) for c in dm.concepts] == [
        ("", "cat", "", "cat", 10), ("", "dog", "", "dog", None), ("pets", "hamster", "", "hamster", None)]
    assert len(dm.sampler) == 30 + 2 + 2  # cat fixed at 10 x 3; dog and hamster balanced to 2
    captions = [b["caption"] for b in dm.val_dataloader()]
    assert captions[:4] == [["cat, sitting, indoors"]] * 3 + [["dog, cat, sitting, indoors"]]


MANIFEST = """
classes:
  shapes/star:
    trigger: zqx
    class_word: star
    eval_text: yellow
    drop_tags: [yellow, five points]
    prompts: ["{} on a beach"]
  toys/bear:
    trigger: mox
    class_word: bear
    drop_tags: [fluffy]
    subclasses:
      red: {trigger: mox ruby, drop_tags: [red], prompts: ["a {} in the snow"]}
"""


def test_captions_drop_concept_tags_and_inherit_down_the_tree(tmp_path):
    root = make_tree(tmp_path, {"shapes/star": 1, "toys/bear/red": 1, "toys/bear/blue": 1},
                     caption="Star, zqx, yellow, blue_background, small\nfive_points, small, Red, fluffy")
    (root / "dataset.yaml").write_text(MANIFEST)
    dm = module(root)
    star, blue, red = dm.concepts
    assert (star.trigger, star.class_word, star.eval_text) == ("zqx", "star", "yellow")
    assert star.prompts == ("{} on a beach",) and star.descriptor == "zqx star"
    assert (red.trigger, red.class_word, red.eval_text) == ("mox ruby", "bear", "mox ruby")
    assert red.drop_tags == ("fluffy", "red")
    assert (blue.trigger, blue.drop_tags, red.prompts) == ("mox", ("fluffy",), ("a {} in the snow",))
    captions = {b["path"][0].split("/")[-2]: b["caption"][0] for b in dm.val_dataloader()}
    assert captions == {
        "star": "zqx star, blue_background, small, Red, fluffy",
        "blue": "mox bear, Star, zqx, yellow, blue_background, small, five_points, Red",
        "red": "mox ruby bear, Star, zqx, yellow, blue_background, small, five_points",
    }


def test_build_caption_keep_tokens_shuffle_and_tag_dropout():
    tags = ["a", "b", "c", "d", "e"]
    assert build_caption("zqx star", tags) == "zqx star, a, b, c, d, e"
    orders = set()
    for seed in range(30):
        tokens = build_caption("zqx star", tags, keep_tokens=2, shuffle=True, rng=np.random.default_rng(seed))
        tokens = tokens.split(", ")
        assert tokens[:2] == ["zqx star", "a"] and sorted(tokens[2:]) == ["b", "c", "d", "e"]
        orders.add(tuple(tokens))
    assert len(orders) > 10
    heads = {build_caption("h", tags, keep_tokens=0, shuffle=True, rng=np.random.default_rng(s)).split(", ")[0]
             for s in range(30)}
    assert len(heads) > 2  # keep_tokens=0 shuffles the head too
    assert build_caption("h", tags, tag_dropout=1.0, rng=np.random.default_rng(0)) == "h"
    kept = [len(build_caption("h", tags, tag_dropout=0.5, rng=np.random.default_rng(s)).split(", ")) - 1
            for s in range(4000)]
    assert 2.4 < np.mean(kept) < 2.6  # 5 tags x 0.5


def test_caption_dropout_rate_is_right_and_reproducible(tmp_path):
    root = make_tree(tmp_path, {"a/x": 50}, caption="t1, t2")
    def captions() -> list[str]:
        return [c for b in epoch_batches(module(root, caption_dropout=0.25, repeats={"a/x": 40}, batch_size=500), 0)
                for c in b["caption"]]

    first = captions()
    assert len(first) == 2000
    assert 0.22 < first.count("") / 2000 < 0.28
    assert set(first) == {"", "x, t1, t2"}
    assert captions() == first


AUGMENTED = {"center_crop": False, "flip": True, "shuffle_tags": True, "tag_dropout": 0.3, "caption_dropout": 0.2,
             "resolution": 8, "batch_size": 4}


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["path"] == y["path"] and x["caption"] == y["caption"]
        torch.testing.assert_close(x["pixel_values"], y["pixel_values"], rtol=0, atol=0)


def test_same_seed_same_batches_and_epochs_independent_of_history(tmp_path):
    root = make_tree(tmp_path, {"a/x": 6, "b/y": 3}, size=(16, 12), caption="t1, t2, t3, t4")
    straight = module(root, **AUGMENTED)
    state = torch.random.get_rng_state()
    epoch0, epoch1 = epoch_batches(straight, 0), epoch_batches(straight, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is neither read nor advanced
    torch.manual_seed(1234)
    np.random.seed(1234)
    assert_same(epoch_batches(module(root, **AUGMENTED), 1), epoch1)  # epoch 1 without epoch 0 first
    assert_same(epoch_batches(module(root, **AUGMENTED), 0), epoch0)
    assert [b["path"] for b in epoch0] != [b["path"] for b in epoch1]
    other = epoch_batches(module(root, **{**AUGMENTED, "seed": 1}), 0)
    assert [b["path"] for b in other] != [b["path"] for b in epoch0]
    # The augmentations really vary: one image in several crops/flips and captions within an epoch.
    pixels = [b["pixel_values"][j] for b in epoch0 + epoch1 for j in range(len(b["path"]))
              if b["path"][j].endswith("b/y/000.png")]
    assert len({p.sum().item() for p in pixels}) > 1


def test_worker_processes_give_the_same_batches(tmp_path):
    root = make_tree(tmp_path, {"a/x": 6, "b/y": 3}, size=(16, 12), caption="t1, t2, t3, t4")
    assert_same(epoch_batches(module(root, **AUGMENTED, num_workers=2), 1),
                epoch_batches(module(root, **AUGMENTED), 1))


def test_val_loader_yields_every_image_once_unaugmented(tmp_path):
    root = make_tree(tmp_path, {"a/x": 5, "b/y": 3, "b/z/s": 2}, size=(16, 12), caption="t1, t2, t3")
    dm = module(root, **{**AUGMENTED, "caption_dropout": 1.0, "tag_dropout": 1.0})
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert_same(first, second)
    paths = [p for b in first for p in b["path"]]
    assert paths == [str(s.path) for s in dm.samples] and len(set(paths)) == 10
    assert {c for b in first for c in b["caption"]} == {"x, t1, t2, t3", "y, t1, t2, t3", "s, t1, t2, t3"}
    expected = torch.stack([to_tensor(square_crop(load_rgb(Path(p)), 8)) for p in paths[:4]])
    torch.testing.assert_close(first[0]["pixel_values"], expected, rtol=0, atol=0)


def test_pixels_are_resized_centre_cropped_scaled_and_flipped(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # left half red, right half blue
    image.save(tmp_path / "a" / "x" / "0.png")
    dm = module(tmp_path, resolution=8, flip=True, repeats={"a/x": 64}, batch_size=64)
    (val,) = list(dm.val_dataloader())
    pixels = val["pixel_values"]
    assert pixels.shape == (1, 3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[0, :, 4, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(pixels[0, :, 4, 7], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02, rtol=0)
    (train,) = epoch_batches(dm, 0)
    flipped = [torch.equal(p, pixels[0].flip(-1)) for p in train["pixel_values"]]
    assert all(f or torch.equal(p, pixels[0]) for f, p in zip(flipped, train["pixel_values"]))
    assert 16 < sum(flipped) < 48  # about half of 64


def test_exif_orientation_and_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    Image.new("RGB", (16, 8), (0, 255, 0)).save(tmp_path / "turned.jpg", exif=exif)
    assert probe_image(tmp_path / "turned.jpg") == (8, 16)
    assert load_rgb(tmp_path / "turned.jpg").size == (8, 16)
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((1, 1)) == (255, 255, 255)
    Image.new("L", (4, 4), 0).save(tmp_path / "grey.png")
    assert load_rgb(tmp_path / "grey.png").getpixel((1, 1)) == (0, 0, 0)


@pytest.mark.parametrize(("manifest", "error", "names"), [
    ("classes:\n  a/x: {tirgger: zqx}\n", ValueError, ["classes.a/x", "'tirgger'", "allowed keys"]),
    ("clases:\n  a/x: {trigger: zqx}\n", ValueError, ["'clases'"]),
    ("classes:\n  a/x:\n    subclasses:\n      s: {colour: red}\n", ValueError,
     ["classes.a/x.subclasses.s", "'colour'"]),
    ("classes:\n  a/x: {drop_tags: 3}\n", ValueError, ["classes.a/x.drop_tags", "list of strings"]),
    ("classes:\n  a/x: {repeats: 0}\n", ValueError, ["classes.a/x.repeats"]),
    ("classes:\n  a/zzz: {trigger: zqx}\n", FileNotFoundError, ["classes.a/zzz", "a/zzz", "does not exist"]),
    ("classes: [a, b\n", ValueError, ["YAML"]),
])
def test_manifest_errors_name_the_file_and_key(tmp_path, manifest, error, names):
    root = make_tree(tmp_path, {"a/x": 1})
    (root / "dataset.yaml").write_text(manifest)
    with pytest.raises(error) as info:
        module(root)
    for name in [str(root / "dataset.yaml"), *names]:
        assert name in str(info.value)


def test_missing_root_and_unknown_repeats_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        module(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="repeats: unknown folder 'a/q'; use one of: a, a/x"):
        module(make_tree(tmp_path / "d", {"a/x": 1}), repeats={"a/q": 2})


def test_empty_class_folder_is_an_error_or_skipped(tmp_path):
    root = make_tree(tmp_path, {"a/x": 2})
    (root / "a" / "empty").mkdir()
    (root / "a" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{root / 'a' / 'empty'}: empty class folder"):
        module(root)
    assert module(root, on_bad_file="skip").skipped[0][0] == root / "a" / "empty"


def test_corrupt_files_are_named_or_skipped_and_listed(tmp_path, capsys):
    root = make_tree(tmp_path, {"a/x": 3})
    folder = root / "a" / "x"
    (folder / "garbage.png").write_bytes(b"not an image at all")
    whole = (folder / "000.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "002.txt").write_bytes(b"caf\xe9, latin-1 text")
    with pytest.raises(ValueError, match=f"{folder / '002.png'}: caption 002.txt is not UTF-8"):
        module(root)
    (folder / "002.txt").write_text("fine now")
    with pytest.raises(ValueError, match=f"{folder / 'cut.png'}: unreadable image"):
        module(root)
    (folder / "002.txt").write_bytes(b"caf\xe9")
    dm = module(root, on_bad_file="skip")
    assert [p.name for p, _ in dm.skipped] == ["002.png", "cut.png", "garbage.png"]
    assert [p.name for p in dm.concepts[0].images] == ["000.png", "001.png"]
    printed = capsys.readouterr().out
    assert "skipped 3 files" in printed
    assert f"{folder / 'garbage.png'}: unreadable image: cannot identify image file" in printed


def test_broken_links_and_link_loops_are_named_or_skipped(tmp_path):
    root = make_tree(tmp_path / "data", {"a/x": 2, "b/y": 2})
    (root / "a" / "x" / "gone.png").symlink_to(tmp_path / "deleted.png")  # a dangling link to an image
    (root / "b" / "y" / "again").symlink_to(root / "b")  # a folder linking to one above it
    with pytest.raises(ValueError, match=f"{root / 'a' / 'x' / 'gone.png'}: broken symlink: its target "):
        module(root)
    (root / "a" / "x" / "gone.png").unlink()
    with pytest.raises(ValueError, match=f"{root / 'b' / 'y' / 'again'}: symlink loop: links back to "):
        module(root)
    (root / "a" / "x" / "gone.png").symlink_to(tmp_path / "deleted.png")
    dm = module(root, on_bad_file="skip")
    assert sorted(p.name for p, _ in dm.skipped) == ["again", "gone.png"]
    assert [len(c.images) for c in dm.concepts] == [2, 2]


def test_setup_table_lists_images_repeats_and_shares(tmp_path, capsys):
    module(make_tree(tmp_path, {"a/x": 4, "a/y": 1, "b/z/s": 2}), repeats={"a/y": 3})
    rows = [line for line in capsys.readouterr().out.splitlines() if "│" in line]
    cells = [[c.strip() for c in row.strip("│").split("│")] for row in rows]
    # Balanced groups reach the largest one (a/x, 4 images); a/y is fixed at 3: 4 + 3 + 4 = 11 per epoch.
    assert cells == [["a", "x", "", "4", "1", "36.4%"], ["a", "y", "", "1", "3 (fixed)", "27.3%"],
                     ["b", "z", "s", "2", "2", "36.4%"]]


def rank_shards(dm, sampler, epoch, ranks=2):
    """What each simulated DDP rank draws in ``epoch`` through Lightning's wrapper of ``sampler``."""
    shards = []
    for rank in range(ranks):
        wrapper = DistributedSamplerWrapper(sampler, num_replicas=ranks, rank=rank, shuffle=False)
        wrapper.set_epoch(epoch)
        assert dm.sampler.epoch == epoch  # the epoch reaches our sampler through the wrapper
        shards.append([tuple(x) if isinstance(x, list) else x for x in wrapper])
    return shards


def test_ddp_wrapper_shards_are_disjoint_complete_and_follow_the_epoch(tmp_path):
    dm = module(make_tree(tmp_path, {"a/x": 3, "b/y": 7}))  # 14 samples per epoch
    for epoch in (0, 5):
        shards = rank_shards(dm, dm.sampler, epoch)
        assert len(shards[0]) == len(shards[1]) == 7
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(dm.sampler.epoch_plan())


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen.append([])
        self.seen[-1].extend(batch["path"])
        return (self.weight * batch["pixel_values"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass  # the validation loader is skipped here (limit_val_batches=0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_recording(dm, epochs, tmp_path):
    """A real Trainer.fit over ``dm``; returns the model that recorded every batch's paths."""
    model = Recorder()
    L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
              ).fit(model, datamodule=dm)
    return model


def test_trainer_sets_each_epoch_on_the_sampler(tmp_path):
    root = make_tree(tmp_path / "data", {"a/x": 3, "b/y": 5})
    dm = HierarchicalDataModule(str(root), resolution=4, batch_size=4)
    model = fit_recording(dm, 3, tmp_path)
    expected = []
    for epoch in range(3):
        dm.sampler.set_epoch(epoch)
        expected.append([str(dm.samples[i].path) for i, _ in dm.sampler.epoch_plan()])
    assert model.seen == expected and expected[0] != expected[1]


def test_resumed_training_sees_the_same_second_epoch(tmp_path):
    root = make_tree(tmp_path / "data", {"a/x": 3, "b/y": 5}, size=(16, 12), caption="t1, t2")

    def fit(epochs: int, resume: Path | None = None) -> tuple[Recorder, L.Trainer]:
        model = Recorder()
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=HierarchicalDataModule(str(root), **AUGMENTED), ckpt_path=resume)
        return model, trainer

    straight, _ = fit(2)
    _, first = fit(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(2, resume=tmp_path / "epoch1.ckpt")
    assert resumed.seen == straight.seen[1:] and straight.seen[0] != straight.seen[1]


# ---------------------------------------------------------------- aspect-ratio buckets

BUCKETED = {"resolution": 256, "bucketing": True, "min_bucket_resolution": 128, "max_bucket_resolution": 512}
# (w, h) per folder: landscape, portrait, square, wide; small so that decoding stays fast.
SHAPES = {"a/land": (300, 200), "a/port": (200, 300), "b/square": (260, 260), "b/wide": (500, 170)}


def make_shaped_tree(root: Path, counts: dict[str, int]) -> Path:
    for k, (folder, n) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            noise_image(root / folder / f"{i:03d}.png", SHAPES[folder], seed=1000 * k + i)
    return root


def bucketed_batches(tmp_path: Path, **kwargs) -> tuple[HierarchicalDataModule, list[dict]]:
    root = make_shaped_tree(tmp_path, {"a/land": 5, "a/port": 2, "b/square": 3, "b/wide": 1})
    dm = module(root, **{**BUCKETED, "batch_size": 3, **kwargs})
    return dm, epoch_batches(dm, 0)


def test_bucket_batches_are_one_size_within_bounds_and_keep_the_aspect(tmp_path, capsys):
    dm, batches = bucketed_batches(tmp_path, center_crop=False, flip=True)
    assert len(batches) == len(dm.train_dataloader())
    for batch in batches:
        pixels = batch["pixel_values"]
        n, _, h, w = pixels.shape
        assert n <= 3 and pixels.abs().max() <= 1
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 128 and max(w, h) <= 512 and w * h <= 256 * 256
        for path in batch["path"]:
            assert (w, h) == dm.buckets[[str(s.path) for s in dm.samples].index(path)]
            # Resized to cover the bucket, the image overhangs it by less than one step: the aspect is kept.
            iw, ih = SHAPES[str(Path(path).parent.relative_to(tmp_path))]
            scale = max(w / iw, h / ih)
            assert iw * scale - w < 64 and ih * scale - h < 64
    sizes = {tuple(b["pixel_values"].shape[2:]) for b in batches}
    assert len(sizes) >= 3  # several buckets really used
    assert "buckets (w x h: images): " in capsys.readouterr().out
    sd = bucket_sizes(512, 256, 1024, 64)  # SD 1.x: kohya's 512 set
    assert (512, 512) in sd and (256, 1024) in sd and (640, 384) in sd and (384, 640) in sd
    assert all(w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024 and w * h <= 512 * 512
               for w, h in sd)


def test_bucketed_validation_batches_hold_one_bucket_and_every_image_once(tmp_path):
    dm, _ = bucketed_batches(tmp_path)
    batches = list(dm.val_dataloader())
    assert sorted(p for b in batches for p in b["path"]) == sorted(str(s.path) for s in dm.samples)
    for batch in batches:
        _, _, h, w = batch["pixel_values"].shape
        assert all(dm.buckets[[str(s.path) for s in dm.samples].index(p)] == (w, h) for p in batch["path"])
    assert len({tuple(b["pixel_values"].shape[2:]) for b in batches}) >= 3


def test_bucketing_keeps_exposures_and_is_deterministic(tmp_path):
    root = make_shaped_tree(tmp_path, {"a/land": 5, "a/port": 2, "b/square": 3, "b/wide": 1})
    plain = module(root, resolution=4)
    bucketed = module(root, **BUCKETED, batch_size=2)
    for epoch in (0, 3):
        plain.sampler.set_epoch(epoch)
        bucketed.bucket_sampler.set_epoch(epoch)
        assert bucketed.sampler.epoch == epoch
        batches = bucketed.bucket_sampler.epoch_batches()
        per_leaf = Counter(bucketed.concepts[bucketed.samples[i].concept].key for b in batches for i, _ in b)
        assert per_leaf == Counter(plain.concepts[plain.samples[i].concept].key for i, _ in plain.sampler.epoch_plan())
        assert set(per_leaf.values()) == {5}
        per_image = Counter(i for b in batches for i, _ in b)
        assert set(per_image[i] for i in range(len(bucketed.samples)) if i < 5) == {1}
        assert len(batches) == len(bucketed.bucket_sampler)  # the same every epoch
        assert all(len({bucketed.buckets[i] for i, _ in b}) == 1 for b in batches)
    again = module(root, **BUCKETED, batch_size=2)
    for epoch in (3, 0):
        again.bucket_sampler.set_epoch(epoch)
        bucketed.bucket_sampler.set_epoch(epoch)
        assert again.bucket_sampler.epoch_batches() == bucketed.bucket_sampler.epoch_batches()
    other = module(root, **BUCKETED, batch_size=2, seed=1)
    assert other.bucket_sampler.epoch_batches() != again.bucket_sampler.epoch_batches()
    augmented = {**AUGMENTED, **BUCKETED, "batch_size": 2}
    assert_same(epoch_batches(module(root, **augmented, num_workers=2), 1), epoch_batches(module(root, **augmented), 1))
    # Balancing by category mixes buckets within a group: b's 7 exposures split 5 square + 2 wide (3x2 + 1x1
    # plus the extra one, which goes to the stratum with the larger remainder), the same every epoch.
    by_category = module(root, **BUCKETED, balance="category")
    for epoch in (0, 1, 2):
        by_category.bucket_sampler.set_epoch(epoch)
        batches = by_category.bucket_sampler.epoch_batches()
        assert Counter(by_category.concepts[by_category.samples[i].concept].key for b in batches for i, _ in b) \
            == {"a/land": 5, "a/port": 2, "b/square": 5, "b/wide": 2}


def test_bucket_batches_shard_across_ranks_disjoint_and_complete(tmp_path):
    root = make_shaped_tree(tmp_path, {"a/land": 5, "a/port": 2, "b/square": 3, "b/wide": 1})
    dm = module(root, **BUCKETED, batch_size=2)
    n = len(dm.bucket_sampler)
    for epoch in (0, 5):
        shards = rank_shards(dm, dm.bucket_sampler, epoch)
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)
        everything = [tuple(b) for b in dm.bucket_sampler.epoch_batches()]
        assert sorted(shards[0] + shards[1]) == sorted(everything + everything[: len(shards[0]) * 2 - n])
        if n % 2 == 0:
            assert not set(shards[0]) & set(shards[1])


def test_bucket_no_upscale_and_too_small_images(tmp_path):
    root = make_shaped_tree(tmp_path / "d", {"a/land": 2, "b/square": 1})
    noise_image(root / "b/square/tiny.png", (100, 300), seed=7)
    # Upscaling allowed (kohya's and the paper's buckets): the small image covers its bucket.
    dm = module(root, **BUCKETED)
    assert not dm.skipped and len(dm.samples) == 4
    noise_image(root / "b/square/speck.png", (20, 40), seed=8)  # 20 px to cover 256: more than 8x
    with pytest.raises(ValueError, match=r"speck\.png: image 20x40 has a side under 32 px \(it would be upscaled"):
        module(root, **BUCKETED)
    (root / "b/square/speck.png").unlink()
    with pytest.raises(ValueError, match=r"tiny\.png: image 100x300 has a side under 128 px \(the smallest bucket"):
        module(root, **BUCKETED, bucket_no_upscale=True)
    dm = module(root, **BUCKETED, bucket_no_upscale=True, on_bad_file="skip")
    assert [p.name for p, _ in dm.skipped] == ["tiny.png"]
    # 300x200 and 260x260 are under 256² in area: rounded down to the step, never upscaled.
    assert sorted(set(dm.buckets)) == [(256, 192), (256, 256)]
    batch = epoch_batches(dm, 0)[0]
    assert tuple(batch["pixel_values"].shape[2:]) in ((192, 256), (256, 256))
    with pytest.raises(ValueError, match="multiples of bucket_step"):
        HierarchicalDataModule(str(root), bucketing=True, min_bucket_resolution=100)


def test_an_image_too_small_for_the_resolution_is_a_bad_file(tmp_path):
    """A 1x1 image would train as a flat colour: more than 8x upscaling makes a file bad, named or skipped."""
    root = make_tree(tmp_path / "d", {"a/x": 2})
    Image.new("RGB", (1, 1), (200, 0, 0)).save(root / "a/x/dot.png")
    Image.new("RGB", (4, 4), (0, 200, 0)).save(root / "a/x/small.png")  # 8x to 32: still fine
    with pytest.raises(ValueError, match=r"dot\.png: image 1x1 has a side under 4 px \(it would be upscaled more "
                                         r"than 8x to resolution 32"):
        module(root, resolution=32)
    dm = module(root, resolution=32, on_bad_file="skip")
    assert [p.name for p, _ in dm.skipped] == ["dot.png"]
    assert len(dm.samples) == 3


def test_trainer_fits_with_buckets_and_sets_each_epoch(tmp_path):
    root = make_shaped_tree(tmp_path / "data", {"a/land": 3, "b/square": 2})
    dm = HierarchicalDataModule(str(root), batch_size=2, **BUCKETED)
    model = fit_recording(dm, 2, tmp_path)
    expected = []
    for epoch in range(2):
        dm.bucket_sampler.set_epoch(epoch)
        expected.append([str(dm.samples[i].path) for b in dm.bucket_sampler.epoch_batches() for i, _ in b])
    assert model.seen == expected and expected[0] != expected[1]
