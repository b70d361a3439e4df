"""``lycoflow pretrain``: train the toy world's base model and evaluation encoders from scratch, on the CPU.

Five stages, each on images and captions of `lycoflow.data.world` drawn under the seed, each written to
``OUT/stage-<name>.safetensors`` when done (a rerun with the same settings skips it: an interrupted pretraining
resumes at the stage it was in):

1. ``vae``: the VAE (`lycoflow.toy.VAE`), L1 + squared error + edge error + a small KL term, half of its images
   recoloured (`recolour`); its latents' scaling factor is measured after, as SD's was.
2. ``base``: UNet and CLIP text encoder together (ε-prediction on SD 1.5's noise schedule, Min-SNR-5 weighting, 10%
   empty captions for classifier-free guidance, an exponential moving average of the weights is what is kept).
3. ``style``: `lycoflow.metrics.toy.ToyStyleNet`'s network, supervised on each image's attributes.
4. ``clip``: `lycoflow.metrics.toy.ToyCLIP`'s pair, contrastive on image–caption pairs.
5. ``image``: `lycoflow.metrics.toy.ToyImageEncoder`'s network, SimCLR on random crops and colour distortions.

Then every part goes into ``OUT/toy-world.safetensors`` in float16 (its SHA-256 is printed), and ``OUT/samples.png``
shows what the bundled base draws for a few prompts. The shipped file is this command's output with its defaults;
it takes about 37 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cache import atomic_path
from .data import world
from .metrics import toy
from .tiny import sd_scheduler, tiny_vae
from .toy import VAE, bundle_metadata, metadata, sha256, toy_architecture

#: What `samples.png` shows, one row per prompt.
SAMPLE_PROMPTS = (
    "a large red circle on a white background",
    "a blue square on the left on a pale green background",
    "a small yellow triangle at the top on a navy background",
    "an orange cat on a pale blue background",
    "a purple fish on a beige background, watercolor",
    "green polka dots on a white background",
    "a large black cross on a pink background, outlined",
    "a white hexagon on a dark grey background, pixelated",
)


@dataclass(frozen=True)
class Settings:
    """What the weights are a function of (with the world version). Steps count optimizer steps.

    Args:
        seed: of the world's images and of every initialisation and batch.
        images: images drawn for training (each stage samples batches from them).
        vae_steps: VAE steps at ``batch_size``.
        base_steps: UNet + text encoder steps at ``batch_size``.
        encoder_steps: steps of each evaluation encoder at ``encoder_batch_size``.
        batch_size: of the VAE and the base.
        encoder_batch_size: of the evaluation encoders (contrastive losses want many negatives).
    """

    seed: int = 0
    images: int = 12000
    vae_steps: int = 1500
    base_steps: int = 7000
    encoder_steps: int = 800
    batch_size: int = 32
    encoder_batch_size: int = 96


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to a tenth."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recolour(x: Tensor, generator: torch.Generator, p: float, hue: float, scale: float) -> Tensor:
    """Images in [0, 1], each with probability ``p`` turned in hue about the grey axis by up to ``hue`` of a full turn
    either way, its saturation and brightness each scaled by a factor within 1 ± ``scale``, clamped to [0, 1]."""
    n = len(x)
    turn = (2 * torch.rand(n, generator=generator) - 1) * hue * 2 * math.pi
    saturation, brightness = (1 + scale * (2 * torch.rand(2, n, 1, 1, 1, generator=generator) - 1)).unbind(0)
    chosen = torch.rand(n, generator=generator) < p
    u = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])  # Rodrigues: about the axis u
    rotation = torch.eye(3) + turn.sin()[:, None, None] * cross + (1 - turn.cos())[:, None, None] * (cross @ cross)
    grey = x.mean(1, keepdim=True)
    y = (torch.einsum("nij,njhw->nihw", rotation, x - grey) * saturation + grey) * brightness
    return torch.where(chosen[:, None, None, None], y.clamp(0, 1), x)


def _edges(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


#: The settings each stage's result depends on (the base also on the VAE's): a stage is reused while they match.
STAGE_SETTINGS = {
    "vae": ("seed", "images", "vae_steps", "batch_size"),
    "base": ("seed", "images", "vae_steps", "base_steps", "batch_size"),
    **dict.fromkeys(("style", "clip", "image_encoder"), ("seed", "images", "encoder_steps", "encoder_batch_size")),
}


#: Each stage's recipe version: bumped when its architecture, loss or augmentation changes, so that a stage written
#: before is trained again (2: the 16×16-latent VAE and UNet of `lycoflow.toy`, recoloured VAE images, SimCLR's colour
#: distortion for the image encoder).
STAGE_VERSIONS = {"vae": 2, "base": 2, "style": 1, "clip": 1, "image_encoder": 2}


class _Stage:
    """One stage's file: tensors plus the settings that made them, reused when those match."""

    def __init__(self, out: Path, name: str, settings: Settings):
        used = {k: v for k, v in asdict(settings).items() if k in STAGE_SETTINGS[name]}
        self.path = out / f"stage-{name}.safetensors"
        self.tag = json.dumps({"world_version": world.WORLD_VERSION, "version": STAGE_VERSIONS[name], **used},
                              sort_keys=True)

    def done(self) -> dict[str, Tensor] | None:
        if not self.path.is_file():
            return None
        if metadata(self.path).get("settings") != self.tag:
            return None
        return load_file(str(self.path))

    def save(self, tensors: dict[str, Tensor], **extra: str) -> None:
        with atomic_path(self.path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"settings": self.tag, **extra})


def _prefixed(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> nn.Module:
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    return module


def _loop(steps: int, what: str, step: Callable[[int], Tensor]) -> None:
    bar = tqdm(range(steps), desc=what, unit="step", mininterval=2)
    for i in bar:
        loss = step(i)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def train_vae(pool: Tensor, s: Settings) -> tuple[nn.Module, float]:
    """The VAE and its latents' scaling factor (1 / their standard deviation, as SD's 0.18215 was measured)."""
    vae = tiny_vae(s.seed, **VAE).train()
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-4): sampling noise as large as the
        vae.quant_conv.weight[4:].zero_()  # latents (a fresh log-variance of 0) drowns what the decoder could learn,
        vae.quant_conv.bias[4:].fill_(-8.0)  # and a 1e-6 KL term never pulls it down
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _schedule(optimizer, s.vae_steps)
    batches = torch.Generator().manual_seed(s.seed + 1)

    def step(_: int) -> Tensor:
        x = pool[torch.randint(len(pool), (s.batch_size,), generator=batches)].float() / 255
        # Half the images in any hue, less or more saturated and bright: SD's VAE was trained on far more than the
        # world's 8 colours, and a VAE that knows only those decodes a held-out concept's colours as the nearest
        # of them (yellow stars came back orange, grey robots orange)
        x = recolour(x, batches, p=0.5, hue=0.5, scale=0.4) * 2 - 1
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator=batches)).sample
        edge = sum((a - b).abs().mean() for a, b in zip(_edges(y), _edges(x)))
        loss = (y - x).abs().mean() + (y - x).square().mean() + edge + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss

    _loop(s.vae_steps, "vae", step)
    vae.eval()
    means = _latents(vae, pool)[0]
    return vae, float(1 / means.std())


@torch.no_grad()
def _latents(vae: nn.Module, pool: Tensor) -> tuple[Tensor, Tensor]:
    """The posterior's mean and standard deviation of every pool image."""
    means, stds = [], []
    for chunk in pool.split(256):
        posterior = vae.encode(chunk.float() / 127.5 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_base(pool: Tensor, captions: Sequence[str], vae: nn.Module, scaling: float, s: Settings
               ) -> tuple[nn.Module, nn.Module]:
    """UNet and text encoder (their moving averages), trained together on the pool's latents and captions."""
    parts = toy_architecture(s.seed)
    unet, text_encoder = parts.unet.train(), parts.text_encoder.train()
    ids = parts.tokenize(list(captions))[:, 0]
    empty = parts.tokenize([""])[0, 0]
    means, stds = _latents(vae, pool)
    scheduler = sd_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = snr.clamp(max=5.0) / snr  # Min-SNR-5 for ε-prediction
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = _schedule(optimizer, s.base_steps, warmup=100)
    averaged = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    batches = torch.Generator().manual_seed(s.seed + 2)

    def step(i: int) -> Tensor:
        index = torch.randint(len(pool), (s.batch_size,), generator=batches)
        tokens = torch.where((torch.rand(s.batch_size, generator=batches) < 0.1)[:, None], empty, ids[index])
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=batches)) * scaling
        noise = torch.randn(latents.shape, generator=batches)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.batch_size,), generator=batches)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = ((pred - noise).square().mean((1, 2, 3)) * weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + i) / (10 + i))
        with torch.no_grad():
            for average, model in zip(averaged, (unet, text_encoder)):
                torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)
        return loss

    _loop(s.base_steps, "unet + text encoder", step)
    return averaged[0].eval(), averaged[1].eval()


def _encoder_loop(s: Settings, what: str, model: nn.Module, loss_of: Callable[[Tensor, torch.Generator], Tensor],
                  salt: int) -> nn.Module:
    torch.manual_seed(s.seed + salt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = _schedule(optimizer, s.encoder_steps)
    batches = torch.Generator().manual_seed(s.seed + salt)

    def step(_: int) -> Tensor:
        loss = loss_of(torch.randint(s.images, (s.encoder_batch_size,), generator=batches), batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss

    model.train()
    _loop(s.encoder_steps, what, step)
    return model.eval()


def _normalised(x: Tensor) -> Tensor:
    """Images in [0, 1] → the toy networks' input."""
    return (x - 0.5) / 0.25


def _unit(pool: Tensor, index: Tensor) -> Tensor:
    """uint8 pool images → the toy networks' input."""
    return _normalised(pool[index].float() / 255)


def train_style(pool: Tensor, scenes: Sequence[world.Scene], s: Settings) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 3)
        model = toy.AttributeNet()
    targets = toy.attribute_targets(list(scenes))

    def loss_of(index: Tensor, _: torch.Generator) -> Tensor:
        features = model.net(_unit(pool, index))
        return sum(F.cross_entropy(head(features), targets[name][index]) for name, head in model.heads.items())

    return _encoder_loop(s, "style net", model, loss_of, 3)


def train_clip(pool: Tensor, captions: Sequence[str], s: Settings) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 4)
        model = toy.ContrastivePair()
    ids = toy.tokenize(list(captions))

    def loss_of(index: Tensor, _: torch.Generator) -> Tensor:
        scale = model.log_scale.clamp(max=math.log(100)).exp()
        return toy.info_nce(model.image(_unit(pool, index)), model.text(ids[index]), scale)

    return _encoder_loop(s, "contrastive image-text pair", model, loss_of, 4)


def _views(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random crop (half to all of the side) of each image, resized back, flipped half the time."""
    side = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(len(x)):
        crop = int(side * (0.5 + 0.5 * torch.rand((), generator=generator)))
        top, left = (int(torch.randint(side - crop + 1, (), generator=generator)) for _ in range(2))
        view = F.interpolate(x[i : i + 1, :, top : top + crop, left : left + crop], size=side, mode="bilinear",
                             antialias=True, align_corners=False)
        out[i] = view.flip(-1) if torch.rand((), generator=generator) < 0.5 else view
    return out


def train_image(pool: Tensor, s: Settings) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 5)
        model = toy.ConvNet()

    def view(x: Tensor, generator: torch.Generator) -> Tensor:
        # SimCLR's colour distortion as well as its crops: without it the views of an image share their colours, and
        # the encoder learns colour histograms, not shapes (a slight tint of the background, as a VAE's, read as
        # another concept)
        return _normalised(_views(recolour(x, generator, p=0.8, hue=0.1, scale=0.4), generator))

    def loss_of(index: Tensor, generator: torch.Generator) -> Tensor:
        x = pool[index].float() / 255
        return toy.info_nce(model(view(x, generator)), model(view(x, generator)), 10.0)

    return _encoder_loop(s, "image encoder", model, loss_of, 5)


def pretrain(out: str | Path, settings: Settings = Settings(), samples: bool = True) -> Path:
    """Run every stage (skipping those already in ``out`` with these settings) and write the bundle."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"lycoflow pretrain: drawing {settings.images} toy-world images (seed {settings.seed})")
    pool, captions, scenes = world.world_tensors(settings.images, settings.seed)
    tensors: dict[str, Tensor] = {}

    stage = _Stage(out, "vae", settings)
    done = stage.done()
    vae = tiny_vae(settings.seed, **VAE)
    if done is None:
        vae, scaling = train_vae(pool, settings)
        stage.save(_prefixed("vae", vae), scaling=str(scaling))
    else:
        _load(vae, "vae", done)
    scaling = float(metadata(stage.path)["scaling"])
    vae.eval()
    tensors.update(_prefixed("vae", vae))

    stage = _Stage(out, "base", settings)
    if (done := stage.done()) is None:
        unet, text_encoder = train_base(pool, captions, vae, scaling, settings)
        done = {**_prefixed("unet", unet), **_prefixed("text_encoder", text_encoder)}
        stage.save(done)
    tensors.update(done)

    trainers = {
        "style": lambda: train_style(pool, scenes, settings),
        "clip": lambda: train_clip(pool, captions, settings),
        "image_encoder": lambda: train_image(pool, settings),
    }
    for name, train in trainers.items():
        stage = _Stage(out, name, settings)
        if (done := stage.done()) is None:
            done = _prefixed(name, train())
            stage.save(done)
        tensors.update(done)

    bundle = out / "toy-world.safetensors"
    with atomic_path(bundle) as tmp:
        save_file({k: v.to(torch.float16).contiguous() for k, v in sorted(tensors.items())}, str(tmp),
                  metadata=bundle_metadata({"vae_scaling_factor": str(scaling), "settings": asdict(settings)}))
    minutes = (time.monotonic() - start) / 60
    print(f"lycoflow pretrain: wrote {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB, SHA-256 {sha256(bundle)}) "
          f"in {minutes:.1f} min")
    if samples:
        print(f"lycoflow pretrain: wrote {write_samples(bundle, out / 'samples.png')}")
    return bundle


def write_samples(bundle: Path, path: Path, prompts: Sequence[str] = SAMPLE_PROMPTS, per_prompt: int = 6) -> Path:
    """A grid of what the bundled base draws: one row per prompt, DDIM 25 steps, guidance 4."""
    from PIL import Image

    from .evaluation.sampling import Sampler, sample
    from .toy import toy_components

    parts = toy_components(bundle)
    sampler = Sampler(steps=25, guidance_scale=4.0, resolution=world.SIZE)
    rows = [sample(parts, [p] * per_prompt, list(range(per_prompt)), sampler) for p in prompts]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    with atomic_path(path) as tmp:
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp, format="PNG")
    return path


def main(argv: list[str]) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="lycoflow pretrain", description=__doc__.split("\n\n")[0],
                                     exit_on_error=False)
    parser.add_argument("--out", default="runs/pretrain", help="folder for the stages, the bundle and samples.png")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, help=f"default {value}")
    parser.add_argument("--no-samples", action="store_true", help="do not draw samples.png")
    args = parser.parse_args(argv)
    settings = Settings(**{name: getattr(args, name) for name in asdict(defaults)})
    for name, value in asdict(settings).items():
        if name != "seed" and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    pretrain(args.out, settings, samples=not args.no_samples)
    return 0

