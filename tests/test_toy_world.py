"""The toy world: its generator, the shipped pretrained base and encoders (checksummed), what the base draws, what
the encoders tell apart, and that fine-tuning on held-out concepts learns them."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lycoflow import toy
from lycoflow.data import world
from lycoflow.data.images import load_rgb, square_crop, to_tensor
from lycoflow.evaluation.sampling import Sampler, adapters_off, sample
from lycoflow.lightning_cli import run_lightning
from lycoflow.metrics.toy import ToyCLIP, ToyImageEncoder, ToyStyleNet
from lycoflow.models import BaseModelError
from lycoflow.pretrain import Settings, pretrain, recolour

REPO = Path(__file__).parent.parent
#: The fine-tuning test: LoKr at the paper's rate × 10 (as the toy sweep), this many epochs on one held-out class.
LR, EPOCHS, CONCEPT = 5e-3, 20, "patterns/checker"
#: Held-in prompts and what their images must show.
PROMPTS = {
    "a large red circle on a white background": ("red", "circle", "white"),
    "a blue square on a pale green background": ("blue", "square", "pale green"),
    "a large yellow triangle on a navy background": ("yellow", "triangle", "navy"),
    "an orange cat on a pale blue background": ("orange", "cat", "pale blue"),
    "a large purple fish on a beige background": ("purple", "fish", "beige"),
    "a large green cross on a pink background": ("green", "cross", "pink"),
}


def nearest(colour: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float((colour - torch.tensor(palette[name]) / 255).square().sum()))


def test_the_world_is_a_function_of_its_seed_and_captions_name_what_is_drawn():
    a, b, c = world.scene_at(7), world.scene_at(7), world.scene_at(7, seed=1)
    assert a[0] == b[0] and a[1] == b[1] and a[2].tobytes() == b[2].tobytes()
    assert (c[0], c[1]) != (a[0], a[1])
    for i in range(200):
        scene, text, image = world.scene_at(i)
        assert image.size == (world.SIZE, world.SIZE)
        assert scene.figure in text
        words = set(text.replace(",", " ").split())
        assert words <= set(world.VOCABULARY), words - set(world.VOCABULARY)
        if scene.style != "flat":
            assert text.endswith(scene.style)
        # Figures stand out from their backgrounds.
        assert world.distinct(world.COLOURS[scene.colour], world.BACKGROUNDS[scene.background])
    # Nothing of the quickstart's concepts is in the world.
    assert not {"star", "ring", "checkerboard", "robot", "creature", "teal", "magenta", "diagonal"} & set(
        world.VOCABULARY)


def test_the_shipped_weights_are_checked_before_use(tmp_path, monkeypatch):
    assert toy.sha256(toy.WEIGHTS) == toy.WEIGHTS_SHA256
    assert toy.check_weights() == toy.WEIGHTS
    size = toy.WEIGHTS.stat().st_size
    assert size < 8 * 2**20, "the shipped toy world stays small"
    damaged = tmp_path / "toy-world.safetensors"
    data = bytearray(toy.WEIGHTS.read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(toy, "WEIGHTS", damaged)
    with pytest.raises(BaseModelError, match="SHA-256.*damaged"):
        toy.ToySD().load()
    with pytest.raises(BaseModelError, match="not found"):
        toy.check_weights(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return toy.ToySD(folder=str(tmp_path_factory.mktemp("models") / "toy")).load()


def test_the_base_follows_captions(toy_base):
    """Colour, shape and background of what the base draws for held-in prompts, read from the pixels (colour of the
    figure's pixels, of the border) and by the toy attribute network (shape): at least 3× chance (1/8, 1/11, 1/8)."""
    sampler = Sampler(steps=25, guidance_scale=4.0, resolution=64)
    per_prompt = 4
    prompts = [p for p in PROMPTS for _ in range(per_prompt)]
    images = sample(toy_base, prompts, list(range(len(prompts))), sampler)
    assert images.shape[-2:] == (64, 64)  # 16×16 latents: the toy VAE reduces 4×
    shapes = ToyStyleNet().classify(images)["figure"]
    hits = {"colour": 0, "shape": 0, "background": 0}
    for image, prompt, shape in zip(images, prompts, shapes):
        colour, figure, background = PROMPTS[prompt]
        pixels = image.permute(1, 2, 0).reshape(-1, 3)
        border = torch.cat([image[:, :3].reshape(3, -1), image[:, -3:].reshape(3, -1)], 1).T
        bg = border.median(0).values
        figure_pixels = pixels[(pixels - bg).square().sum(1) > 0.05]
        hits["background"] += nearest(bg, world.BACKGROUNDS) == background
        hits["colour"] += len(figure_pixels) > 20 and nearest(figure_pixels.median(0).values, world.COLOURS) == colour
        hits["shape"] += shape == figure
    rates = {k: v / len(prompts) for k, v in hits.items()}
    # Measured with the shipped weights: colour 0.42, shape 0.50, background 0.38 (4 images of each prompt; chance
    # 0.12, 0.09, 0.12). The 8×8-latent base before drew colours and backgrounds better (0.67, 0.54) and shapes worse.
    assert rates["colour"] >= 0.33 and rates["background"] >= 0.3 and rates["shape"] >= 0.3, rates


def _class_images(root: Path, folder: str) -> torch.Tensor:
    paths = sorted((root / folder).glob("*.png"))
    return torch.stack([(to_tensor(square_crop(load_rgb(p), 64)) + 1) / 2 for p in paths])


def test_the_toy_encoders_discriminate(synthetic_root):
    """The image encoder ranks same-class pairs of the held-out concepts above different-class pairs; the contrastive
    pair matches world captions it was not trained on to their images far above chance."""
    classes = ["shapes/star", "shapes/ring", "patterns/checker", "creatures/blob/red", "creatures/robot"]
    encoder = ToyImageEncoder()
    embeddings = [torch.nn.functional.normalize(encoder.embed_images(_class_images(synthetic_root, c)[:6]), dim=-1)
                  for c in classes]
    same, different = [], []
    for i, a in enumerate(embeddings):
        for j, b in enumerate(embeddings):
            sims = (a @ b.T).flatten()
            (same if i == j else different).append(sims[sims < 0.9999] if i == j else sims)
    same, different = torch.cat(same), torch.cat(different)
    auc = (same[:, None] > different[None, :]).float().mean()
    assert auc > 0.85, float(auc)

    images, captions, _ = world.world_tensors(64, start=10**6)  # beyond the pretraining pool
    clip = ToyCLIP()
    a = torch.nn.functional.normalize(clip.embed_images(images.float() / 255), dim=-1)
    b = torch.nn.functional.normalize(clip.embed_texts(captions), dim=-1)
    top1 = ((a @ b.T).argmax(1) == torch.arange(64)).float().mean()
    assert top1 > 0.25, float(top1)  # chance: 1/64


def test_pretrain_runs_resumes_and_writes_a_loadable_bundle(tmp_path, capsys):
    settings = Settings(images=48, vae_steps=2, base_steps=2, encoder_steps=2, batch_size=4, encoder_batch_size=8)
    bundle = pretrain(tmp_path, settings, samples=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stage-base.safetensors", "stage-clip.safetensors", "stage-image_encoder.safetensors",
        "stage-style.safetensors", "stage-vae.safetensors", "toy-world.safetensors"]
    tensors = load_file(bundle)
    assert {k.split(".")[0] for k in tensors} == {"unet", "vae", "text_encoder", "style", "clip", "image_encoder"}
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("stage-*")}
    capsys.readouterr()
    pretrain(tmp_path, settings, samples=False)  # every stage is done: none runs again
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("stage-*")}
    assert "vae:" not in capsys.readouterr().err
    parts = toy.ToySD(weights=str(bundle), folder=str(tmp_path / "model")).load()
    assert torch.equal(parts.unet.conv_in.weight, tensors["unet.conv_in.weight"].float())
    assert ToyImageEncoder(weights=str(bundle)).embed_images(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_recolouring_turns_hues_about_the_grey_axis():
    """What the VAE and the image encoder are trained on besides the world's own colours: each chosen image turned in
    hue about the grey axis (its greys, its mean and its saturation kept when ``scale`` is 0), the others untouched."""
    generator = torch.Generator().manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(64, 3, 8, 8)  # mid-range: no turn leaves [0, 1], so nothing is clamped
    assert torch.equal(recolour(x, generator, p=0.0, hue=0.5, scale=0.4), x)
    y = recolour(x, generator, p=1.0, hue=0.5, scale=0.0)
    grey, turned = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    torch.testing.assert_close(turned, grey)
    torch.testing.assert_close((y - turned).norm(dim=1), (x - grey).norm(dim=1))
    assert (y - x).abs().amax() > 0.05  # the hues did turn
    flat = torch.full((4, 3, 8, 8), 0.5)
    torch.testing.assert_close(recolour(flat, generator, p=1.0, hue=0.5, scale=0.0), flat)
    # Saturation and brightness within 1 ± scale: a mid grey is scaled in brightness only.
    scaled = recolour(flat, generator, p=1.0, hue=0.0, scale=0.4)
    assert ((scaled >= 0.5 * 0.6 - 1e-6) & (scaled <= 0.5 * 1.4 + 1e-6)).all() and not torch.equal(scaled, flat)


def _one_concept(synthetic_root: Path, tmp_path: Path, folder: str) -> Path:
    """One class of the quickstart's data set, as its own data set."""
    root = tmp_path / "one-class"
    shutil.copytree(synthetic_root / folder, root / folder)
    manifest = yaml.safe_load((synthetic_root / "dataset.yaml").read_text())
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": {folder: manifest["classes"][folder]}}))
    return root


def _fit_one(synthetic_root: Path, tmp_path: Path, folder: str, epochs: int, evaluate: bool):
    """LoKr on one class alone, from the quickstart recipe; evaluated (trigger prompts) on the base and at the end."""
    run = tmp_path / "run"
    override = tmp_path / "short.yaml"
    override.write_text(yaml.safe_dump({
        "data": {"class_path": "lycoflow.data.HierarchicalDataModule",
                 "init_args": {"root": str(_one_concept(synthetic_root, tmp_path, folder)), "resolution": 64,
                               "batch_size": 8}},
        "model": {"lr": LR},
        "trainer": {"max_epochs": epochs, "enable_progress_bar": False, "logger": False, "check_val_every_n_epoch": 100,
                    "default_root_dir": str(run), "callbacks": [] if not evaluate else [
                        {"class_path": "callbacks.Evaluation", "init_args": {
                            "base": True, "epochs": [epochs], "images": 8,
                            "protocol": {"class_path": "lycoflow.evaluation.ToyWorldProtocol",
                                         "init_args": {"prompt_types": ["trigger"]}},
                            "sampler": {"class_path": "lycoflow.evaluation.sampling.Sampler",
                                        "init_args": {"steps": 20, "guidance_scale": 4.0, "resolution": 64}},
                            "image_encoder": {"class_path": "lycoflow.metrics.toy.ToyImageEncoder"},
                            "text_image_encoder": {"class_path": "lycoflow.metrics.toy.ToyCLIP"},
                            "style_encoder": {"class_path": "lycoflow.metrics.toy.ToyStyleNet"}}}]},
    }))
    return run, run_lightning(["fit", str(REPO / "recipes" / "quickstart.yaml"), str(override),
                               f"--model.base.init_args.folder={tmp_path / 'model'}"])


def test_the_vae_reconstructs_held_out_concepts_as_the_image_encoder_knows_them(toy_base, synthetic_root):
    """What fine-tuning can reach is bounded by what the VAE decodes: the image encoder must see a held-out class's
    reconstructions as that class (similarity to the real images at least half of the real images' own). Measured:
    stars 0.54 against 0.88, robots 0.64 against 0.88; the 8×8-latent VAE before scored -0.085 against 0.50."""
    from lycoflow.metrics.functional import image_similarity

    encoder = ToyImageEncoder()
    for folder in ("shapes/star", "creatures/robot"):
        real = _class_images(synthetic_root, folder)
        with torch.no_grad():
            latents = toy_base.vae.encode(real * 2 - 1).latent_dist.mean
            decoded = ((toy_base.vae.decode(latents).sample + 1) / 2).clamp(0, 1)
        e, d = encoder.embed_images(real), encoder.embed_images(decoded)
        half = len(e) // 2
        assert image_similarity(d, e) > 0.5 * image_similarity(e[:half], e[half:]), folder


def test_fine_tuning_learns_a_held_out_concept(synthetic_root, tmp_path):
    """LoKr on the checkerboards (a pattern the base never saw) raises their fidelity over the base's: measured 0.012
    → 0.361 in 40 steps."""
    run, _ = _fit_one(synthetic_root, tmp_path, CONCEPT, EPOCHS, evaluate=True)
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "image_similarity"]
    fidelity = {int(r["epoch"]): float(r["value"]) for r in rows}
    assert set(fidelity) == {0, EPOCHS}
    assert fidelity[EPOCHS] > fidelity[0] + 0.2, fidelity


def test_multiplier_zero_gives_back_the_base_exactly(synthetic_root, tmp_path):
    _, cli = _fit_one(synthetic_root, tmp_path, "shapes/star", 2, evaluate=False)
    module = cli.model
    sampler = Sampler(steps=10, guidance_scale=4.0, resolution=64)
    prompts, seeds = ["zqx star on a navy background", "a small zqx star on the left"], [3, 4]
    with adapters_off(module.networks.values()):
        off = sample(module.components, prompts, seeds, sampler)
    base = sample(toy.ToySD(folder=str(tmp_path / "model")).load(), prompts, seeds, sampler)
    assert torch.equal(off, base)
    assert not torch.equal(sample(module.components, prompts, seeds, sampler), base)


def test_the_quickstart_data_is_new_to_the_base():
    """The quickstart's classes are named by words the toy world never uses (but "pattern"): the base has to learn
    them."""
    from lycoflow.data.synthetic import MANIFEST_DATA

    for spec in MANIFEST_DATA["classes"].values():
        assert spec["class_word"] == "pattern" or spec["class_word"] not in world.VOCABULARY
        assert spec["trigger"].split()[0] not in world.VOCABULARY


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "full", "dora", "oft"])
def test_the_toy_world_overlay_turns_an_algorithm_recipe_into_a_toy_run(algorithm):
    from lycoflow.data.synthetic import SyntheticConcepts, default_root
    from lycoflow.evaluation import ToyWorldProtocol

    cli = run_lightning(["fit", str(REPO / "recipes" / f"{algorithm}.yaml"), str(REPO / "recipes" / "toy-world.yaml"),
                         "--trainer.logger=false"], run=False)
    assert isinstance(cli.model.base_source, toy.ToySD) and cli.model.warmup_steps == 30
    data = cli.datamodule
    # The algorithm recipe's data root (data/my_concepts) is not where the synthetic set is generated.
    assert isinstance(data, SyntheticConcepts) and Path(data.root) == default_root() and data.resolution == 64
    assert type(cli.model.adapter).__name__ == yaml.safe_load((REPO / "recipes" / f"{algorithm}.yaml").read_text())[
        "model"]["adapter"]["class_path"].split(".")[-1]
    evaluation = [c for c in cli.trainer.callbacks if type(c).__name__ == "Evaluation"]
    assert len(evaluation) == 1 and isinstance(evaluation[0].evaluator.protocol, ToyWorldProtocol)
    assert evaluation[0].epochs == [6, 12] and evaluation[0].evaluator.images == 4 and cli.trainer.max_epochs == 12


def test_the_toy_sweep_is_the_paper_grid_in_miniature():
    from lycoflow.sweep import load_sweep

    runs = load_sweep(REPO / "recipes" / "sweeps" / "toy.yaml")
    assert len(runs) == 57 and {r.seed for r in runs} == {23, 24, 25}
    configs = sorted({r.config for r in runs})
    assert len(configs) == 19 and {c.split("-")[0] for c in configs} == {"lora", "loha", "lokr", "native"}
    assert all(str((REPO / "recipes" / "toy-world.yaml").resolve()) == r.recipes[-1] for r in runs)
    lrs = {r.config: next(o for o in r.overrides if o.startswith("--model.lr=")) for r in runs}
    assert lrs["lokr"] == "--model.lr=0.005" and lrs["native"] == "--model.lr=1e-05"  # the paper's x 10


def test_the_kept_toy_sweep_report_is_its_runs_analysis_and_the_readme_quotes_it(tmp_path, monkeypatch):
    """benchmarks/toy-sweep/report is what `lycoflow analyze` makes of benchmarks/toy-sweep/runs (the CSVs byte for
    byte), and the README's findings are its numbers."""
    import sys

    import numpy as np

    from lycoflow.analysis import analyze

    kept = REPO / "benchmarks" / "toy-sweep"
    monkeypatch.setitem(sys.modules, "catboost", None)  # the SHAP charts are not compared: seconds saved
    analyze([kept / "runs"], tmp_path, log=lambda _: None)
    tables = sorted(p.name for p in (kept / "report").glob("*.csv"))
    assert len(tables) == 6 and len(list((kept / "runs").iterdir())) == 57
    for name in tables:
        assert (tmp_path / name).read_bytes() == (kept / "report" / name).read_bytes(), name

    def means(criterion: str) -> dict[str, float]:
        with open(kept / "report" / f"ranking_{criterion}.csv", newline="") as f:
            return {r["label"]: float(r["mean"]) for r in csv.DictReader(f)}

    fidelity, controllability = means("fidelity"), means("controllability")
    readme = (REPO / "README.md").read_text()
    for label, figure in (("LoRA", fidelity), ("LoHa", fidelity), ("LoKr", fidelity), ("LoKr lr=0.001", fidelity),
                          ("LoRA", controllability), ("LoHa", controllability), ("LoKr", controllability)):
        assert f"{figure[label]:.3f}" in readme, label
    labels = sorted(fidelity)
    r = np.corrcoef([fidelity[k] for k in labels], [controllability[k] for k in labels])[0, 1]
    assert f"correlate at {r:.2f}".replace("-", "−") in readme
    assert sorted(fidelity, key=fidelity.get, reverse=True).index("LoKr") + 1 == 9  # "LoKr ranks 9th"
