"""Latent and text-encoder caches: real TinySD encoders, real files, real Trainer runs."""

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import lycoris
from lycoflow.data import HierarchicalDataModule
from lycoflow.data.encodings import latent_key, text_key
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import TinySD

CAPTIONS = {"a/x": "red, round", "a/y": "blue", "b/z": "green, tall, thin"}


def make_data(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 32)) -> Path:
    for k, (folder, n) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            pixels = np.random.default_rng(100 * k + i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text(CAPTIONS[folder])
    return root


class Counting:
    """Counts the calls of a module's method (the VAE's encode, the text encoder's forward)."""

    def __init__(self, owner: object, name: str) -> None:
        self.calls, self.items = 0, 0
        original = getattr(owner, name)

        def counted(x, *args, **kwargs):
            self.calls, self.items = self.calls + 1, self.items + len(x)
            return original(x, *args, **kwargs)

        setattr(owner, name, counted)


def model(folder: Path, seed: int = 0, train_text_encoder: bool = False) -> DiffusionFinetune:
    torch.manual_seed(seed)
    return DiffusionFinetune(TinySD(folder=str(folder)), lycoris.LoRA(dim=4, preset="attn-mlp"),
                             train_text_encoder=train_text_encoder, seed=seed)


def data(root: Path, cache: Path | None, **kwargs) -> HierarchicalDataModule:
    on = cache is not None
    options = {"resolution": 32, "batch_size": 4, "flip": True, "caption_dropout": 0.3, "seed": 5,
               "cache_latents": on, "cache_text_encoder_outputs": on, "cache_dir": str(cache) if on else None}
    return HierarchicalDataModule(str(root), **{**options, **kwargs})


def entries(cache: Path, kind: str) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / kind).rglob("*.safetensors")}


class EpochCalls(L.Callback):
    """The VAE / text-encoder call counts at each training epoch's start, and at the end."""

    def __init__(self, vae: Counting, text: Counting) -> None:
        self.vae, self.text, self.at = vae, text, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.datamodule = trainer.datamodule
        self.at.append((self.vae.calls, self.text.calls))

    def on_train_end(self, trainer, pl_module):
        self.at.append((self.vae.calls, self.text.calls))


def fit(net: DiffusionFinetune, dm: HierarchicalDataModule, tmp_path: Path, epochs: int = 2) -> EpochCalls:
    vae, text = Counting(net.vae, "encode"), Counting(net.text_encoder, "forward")
    calls = EpochCalls(vae, text)
    L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              num_sanity_val_steps=0, callbacks=[calls]).fit(net, datamodule=dm)
    return calls


def test_encoders_run_only_while_caching_and_training_matches_the_uncached_run(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 5, "a/y": 2, "b/z": 3})
    cache = tmp_path / "cache"

    cached = model(tiny_sd_folder)
    calls = fit(cached, data(root, cache), tmp_path / "run1")
    # 10 images × 2 orientations encoded before the first epoch (batches of 4 per size), then never again.
    assert calls.vae.items == 20 and calls.at[0][0] == calls.vae.calls == 5
    assert calls.at[0] == calls.at[1] == calls.at[2]
    # 3 distinct captions + the empty one of caption dropout, encoded once; training reads them from disk.
    assert calls.text.items == 4 and calls.at[0][1] == calls.text.calls
    assert len(entries(cache, "latent_parameters")) == 20 and len(entries(cache, "encoder_hidden_states")) == 4

    plain = model(tiny_sd_folder)
    plain_dm = data(root, None)
    plain_calls = fit(plain, plain_dm, tmp_path / "run2")
    assert plain_calls.vae.calls > 0 and plain_calls.text.calls > 0  # the uncached run encodes every step
    # Batch for batch, the cached posteriors and hidden states give the loss the encoders give: the same
    # noise and the same latent draw (the sample is taken in the step, from the cached posterior).
    cached_dm = calls.datamodule
    for i, (a, b) in enumerate(zip(cached_dm.train_dataloader(), plain_dm.train_dataloader())):
        assert a["caption"] == b["caption"] and "pixel_values" not in a and "latent_parameters" not in b
        torch.testing.assert_close(plain.denoising_loss(a, plain._generator(0, i)),
                                   plain.denoising_loss(b, plain._generator(0, i)), atol=1e-6, rtol=1e-5)
    # So the two runs train alike (up to float summation order, which Adam's normalisation amplifies).
    for (name, a), b in zip(cached.networks.state_dict().items(), plain.networks.state_dict().values()):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-3, msg=name)
    trained = cached.networks.state_dict()
    assert any(name.endswith("lora_up.weight") and w.abs().max() > 0 for name, w in trained.items())

    # A second run with the same cache encodes nothing at all.
    again = fit(model(tiny_sd_folder), data(root, cache), tmp_path / "run3")
    assert again.vae.calls == 0 and again.text.calls == 0


def test_a_changed_image_invalidates_only_its_entries(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 4, "a/y": 2})
    cache = tmp_path / "cache"
    net = model(tiny_sd_folder)
    vae = Counting(net.vae, "encode")
    dm = data(root, cache)
    dm.setup("fit")
    dm.cache_encodings(net)
    before = entries(cache, "latent_parameters")
    assert vae.items == 12 and len(before) == 12

    Image.fromarray(np.full((32, 40, 3), 7, dtype=np.uint8)).save(root / "a/x/2.png")
    dm = data(root, cache)
    dm.setup("fit")
    dm.cache_encodings(net)
    after = entries(cache, "latent_parameters")
    assert vae.items == 12 + 2  # the changed image, both orientations
    assert len(after) == 14 and all(after[name] == mtime for name, mtime in before.items())
    # ... and the dataset serves the new image's posterior.
    index = [s.path.name for s in dm.samples].index("2.png")
    expected = net.latent_parameters(dm.dataset.pixels(index)[None])[0]
    torch.testing.assert_close(dm.dataset[index]["latent_parameters"], expected, atol=1e-5, rtol=1e-5)


def test_every_key_part_changes_the_key():
    base = latent_key("img", "vae", (64, 48), False)
    assert len({base, latent_key("img2", "vae", (64, 48), False), latent_key("img", "vae2", (64, 48), False),
                latent_key("img", "vae", (48, 64), False), latent_key("img", "vae", (64, 48), True)}) == 5
    assert text_key("a cat", "te") not in (text_key("a cat ", "te"), text_key("a cat", "te2"))


def test_identities_follow_the_weights_and_the_trained_text_encoder_has_none(tiny_sd_folder):
    a, b = model(tiny_sd_folder), model(tiny_sd_folder)
    assert a.latent_identity() == b.latent_identity() and a.text_identity() == b.text_identity()
    with torch.no_grad():
        next(b.vae.parameters()).view(-1)[0] += 1e-3
        next(b.text_encoder.parameters()).view(-1)[0] += 1e-3
    b._latent_identity = b._text_identity = None  # computed once per model: its frozen parts never change
    assert a.latent_identity() != b.latent_identity() and a.text_identity() != b.text_identity()
    assert model(tiny_sd_folder, train_text_encoder=True).text_identity() is None


def test_the_text_cache_holds_entries_of_the_models_caption_length(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 2, "b/z": 1})
    cache = tmp_path / "cache"
    short = model(tiny_sd_folder)
    torch.manual_seed(0)
    long = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4, preset="attn-mlp"),
                             train_text_encoder=False, max_token_length=150)
    for net in (short, long):
        dm = data(root, cache, cache_latents=False)
        dm.setup("fit")
        dm.cache_encodings(net)
        batch = next(iter(dm.train_dataloader()))
        length = 77 if net is short else 152
        assert batch["encoder_hidden_states"].shape[1:] == (length, 32)
        want = net.text_conditioning(batch["caption"])
        assert set(want) == {"encoder_hidden_states"}  # SD 1.x: no pooled text
        torch.testing.assert_close(batch["encoder_hidden_states"], want["encoder_hidden_states"])
    # Two captions + the empty one, once per length: the 150-token entries did not replace the 75-token ones.
    assert len(entries(cache, "encoder_hidden_states")) == 2 * 3


def test_bucketed_items_carry_latents_of_their_bucket(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 3}, size=(96, 48))
    make_data(tmp_path / "data", {"a/y": 2}, size=(48, 96))
    dm = data(root, tmp_path / "cache", resolution=64, bucketing=True, min_bucket_resolution=32,
              max_bucket_resolution=128, bucket_step=32, caption_dropout=0.0)
    dm.setup("fit")
    dm.cache_encodings(model(tiny_sd_folder))
    shapes = {tuple(batch["latent_parameters"].shape[2:]) for batch in dm.train_dataloader()}
    # 96×48 images go to the 96×32 bucket... whatever kohya's rule picks, latents are 1/8 of the bucket.
    assert shapes == {(h // 8, w // 8) for w, h in set(dm.buckets)} and len(shapes) == 2
    assert all(batch["encoder_hidden_states"].shape[1:] == (77, 32) for batch in dm.train_dataloader())


def test_ddp_ranks_split_the_encoding_and_fill_what_is_left_after_the_barrier(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 5})
    cache = tmp_path / "cache"
    net = model(tiny_sd_folder)
    vae = Counting(net.vae, "encode")
    seen = []
    dm = data(root, cache, cache_text_encoder_outputs=False)
    dm.setup("fit")
    dm.cache_encodings(net, rank=1, world_size=2, barrier=lambda: seen.append(len(entries(cache, "latent_parameters"))))
    # Rank 1 of 2 encoded every other missing entry (5 of 10) before the barrier; the other rank never came
    # (as with a disk the ranks do not share), so it encoded the rest after it.
    assert seen == [5] and vae.items == 10 and len(entries(cache, "latent_parameters")) == 10


def test_cache_errors_name_the_fix(tiny_sd_folder, tmp_path):
    root = make_data(tmp_path / "data", {"a/x": 2})
    with pytest.raises(ValueError, match="center_crop: true"):
        data(root, tmp_path / "cache", center_crop=False)
    with pytest.raises(ValueError, match="shuffle_tags: false"):
        data(root, tmp_path / "cache", shuffle_tags=True)
    dm = data(root, tmp_path / "cache")
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"dm.cache_encodings\(model\)"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="model.train_text_encoder: false"):
        dm.cache_encodings(model(tiny_sd_folder, train_text_encoder=True))

    dm.cache_encodings(model(tiny_sd_folder))
    # Every entry damaged, so whichever orientation the epoch draws first is unreadable.
    folder = tmp_path / "cache" / "latent_parameters"
    for damaged in folder.rglob("*.safetensors"):
        damaged.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r"/../[0-9a-f]{64}\.safetensors: unreadable cache "
                                         r"entry.*delete it"):
        for _ in dm.train_dataloader():
            pass
