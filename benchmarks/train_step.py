"""Training throughput of the quickstart model, and the cost of a LoRA/LoKr training step on an SD-1.5-shaped UNet,
against the frozen-model floor.

Two parts, each timed with ``benchmarks/adapters.py``'s machinery (whose docstring explains it in full): cases
run round-robin on the very same model, shuffled each round, after an untimed warm-up round; a case's ratio
is the median over rounds of its time over the floor's in the same round.

- ``quickstart``: the model, adapter and data of ``recipes/tiny.yaml``, instantiated from the recipe as
  ``lycoflow fit`` does (tiny SD-1.x model with LoKr factor 8, dim 10000, α 1, preset ``attn-mlp`` on the
  UNet and the text encoder; batches of 8 images at 128×128 from its data module). One **training step** is
  what ``training_step`` runs plus the optimizer: ``denoising_loss`` (VAE encode, text encoder, noising,
  UNet), backward, the recipe's AdamW step. Printed: images/s (absolute: the number people ask for) and
  **step / floor**, where the *floor* is the same step with every adapter detached and gradients only for
  the inputs of the adapted parts (the UNet's noisy latents, the text encoder's token embeddings): the
  forward and backward that any adapter on those parts pays. The **lycoflow fit** row is the recipe's own
  ``Trainer.fit`` (no logger, no epoch-end callbacks, which the measured steps never reach): the median
  interval between consecutive batch starts, so data loading, Lightning's loop, logging calls and the
  gradient norm are included. It runs after the rounds, not interleaved with them: its ratio is to the
  floor's median and is steady only on a quiet machine.
- ``sd15``: ``UNet2DConditionModel`` with SD 1.5's configuration (860 M parameters, random init under seed 0),
  batch 1, 32×32 latents, 77×768 context, cases ``floor`` (frozen UNet, input requires grad), ``LoRA``
  (dim 8, α 4) and ``LoKr`` (factor 8, dim 10000, α 1), both with preset ``attn-mlp`` and parameters nudged
  off their init. A step is forward, then backward of the output's mean square (no optimizer: it is the
  adapter's cost inside the UNet). Printed per case: median seconds per step, **step / floor**, and
  **memory / floor**: peak memory allocated during one step above what was allocated before it (CUDA:
  ``max_memory_allocated``; CPU: the profiler's allocator events), measured once per case after the rounds.
  On 2 CPU cores a step takes seconds, so the rounds are few (``--rounds``, more while they fit in
  ``--budget``): read its ratios to ±0.05 or so.
- ``sdxl``: the same cases on ``UNet2DConditionModel`` with SDXL base 1.0's configuration (2.6 G parameters,
  random init under seed 0: 320/640/1280 channels, transformer depths 0/2/10, linear projections, text-time
  embedding), batch 1, 77×2048 context, pooled text and size numbers. The slice is the latent size: 32×32
  (a 256² image) instead of SDXL's 128×128, which needs 16× the activations and would take minutes a step on
  2 cores; the ratios of the deep, wide levels (where SDXL's adapters sit) carry over, the first level's
  convolutions weigh less than at 1024².

- ``bases``: the ``sd15`` UNet and cases with the frozen base stored four ways: ``float32`` (float32 compute),
  ``bfloat16`` (weights in bf16, bf16 autocast), ``int8`` and ``float8`` (``lycoris.quantize_frozen``: 8-bit
  weights, one scale per output channel, dequantised per layer into bf16; bf16 autocast) — the four models side
  by side, all twelve cases in one round-robin. Printed per case: seconds per step, **step / floor** (its own
  base's floor), **step / bf16**: against the same case on the bf16 base, and **memory**: the base's weight
  bytes plus the step's peak (as above), in MiB and against the float32 floor's; then how far each 8-bit
  storage rounds the weights of this UNet and of the toy world's trained one. Needs torchao.

A ratio of 1.30x means a training step costs 30% more than the forward and backward the frozen model needs
anyway; absolute times depend on the machine, the ratios much less. On CPU other work on the machine skews
them (see the load in the header; ``--threads 1`` is steadier).

    python benchmarks/train_step.py [--quick] [--parts quickstart sd15 sdxl bases] [--rounds N] [--budget S]
                                    [--fit-steps N] [--threads N] [--device cpu|cuda] [--bf16] [--compile]
                                    [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
from torch import Tensor

from lycoris.quantize import Quantization

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts, not a package
import adapters as bench  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny.yaml"
UNET_ALGORITHMS = ("LoRA", "LoKr")  # at adapters.py's paper defaults
FLOOR = bench.FLOOR
FIT_WARMUP = 3  # untimed fit steps: the first intervals include the loader's start and first allocations


def quiet_libraries() -> None:
    """Progress bars and banners that would bury the table."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# -- quickstart -----------------------------------------------------------------------------------------------
def quickstart_cli(folder: Path, device: str, bf16: bool, fit_steps: int, callbacks: list[L.Callback],
                   compile_unet: bool = False) -> Any:
    """The quickstart recipe as ``lycoflow fit`` instantiates it, run folder and tiny model in ``folder``."""
    from lycoflow.lightning_cli import run_lightning

    precision = ["--trainer.precision=bf16-mixed"] if bf16 else []
    precision += ["--model.compile=true"] if compile_unet else []
    cli = run_lightning(["fit", str(RECIPE), f"--model.base.init_args.folder={folder / 'tiny-sd'}",
                         f"--trainer.default_root_dir={folder / 'run'}", f"--trainer.accelerator={device}",
                         f"--trainer.max_steps={fit_steps}", "--trainer.logger=false", "--trainer.callbacks=[]",
                         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                         "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", *precision],
                        run=False)
    cli.trainer.callbacks.extend(callbacks)
    return cli


class BatchStarts(L.Callback):
    """Wall-clock time at the start of every training batch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.times.append(time.perf_counter())


def measure_quickstart(settings: bench.Settings, fit_steps: int, compile_unet: bool = False) -> dict[str, Any]:
    device = settings.device
    starts = BatchStarts()
    with tempfile.TemporaryDirectory(prefix="lycoflow-bench-") as tmp:
        cli = quickstart_cli(Path(tmp), device, settings.bf16, FIT_WARMUP + fit_steps + 1, [starts], compile_unet)
        model, data = cli.model.to(device), cli.datamodule
        with contextlib.redirect_stdout(io.StringIO()):  # the data set's summary table
            data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        optimizers = model.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        nets = list(model.networks.values())
        for net in nets:
            net.remove()  # the cases take turns: attached for the adapter, detached for the floor

        # The floor's gradients start where the adapted parts' inputs are, as an adapter's must reach them.
        def input_hooks() -> list[torch.utils.hooks.RemovableHandle]:
            hooks = [model.unet.register_forward_pre_hook(
                lambda module, args: (args[0].detach().requires_grad_(), *args[1:]))]
            if "lora_te" in model.networks:
                hooks.append(model.text_encoder.get_input_embeddings().register_forward_hook(
                    lambda module, args, out: out.detach().requires_grad_()))
            return hooks

        handles: list[torch.utils.hooks.RemovableHandle] = []

        def remove_hooks() -> None:
            while handles:
                handles.pop().remove()

        adapter = type(model.adapter).__name__  # the recipe's algorithm
        cases = {
            FLOOR: bench.Case(lambda: handles.extend(input_hooks()), remove_hooks),
            adapter: bench.Case(lambda: [bench.attach(net) for net in nets],
                               lambda: [bench.detach(net) for net in nets]),
        }

        def step() -> None:
            # The same noise and timesteps every time: every step does identical work.
            with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16):
                loss = model.denoising_loss(batch, model._generator(0, 0))
            loss.backward()
            optimizer.step()  # the floor has no gradients: AdamW finds nothing to do
            optimizer.zero_grad(set_to_none=True)

        times = bench.round_robin(cases, step, settings)
        for net in nets:
            bench.attach(net)
        with contextlib.redirect_stdout(io.StringIO()):
            cli.trainer.fit(model, datamodule=data)
    intervals = [b - a for a, b in zip(starts.times, starts.times[1:])][FIT_WARMUP:]
    return {"adapter": adapter, "batch_size": len(batch["caption"]),
            "params": sum(p.numel() for net in nets for p in net.parameters()), "step_s": times,
            "fit_step_s": intervals}


def print_quickstart(raw: dict[str, Any]) -> dict[str, float]:
    size, times, adapter = raw["batch_size"], raw["step_s"], raw["adapter"]
    floor_ms = median_ms(times[FLOOR])
    print(f"quickstart: recipes/tiny.yaml (tiny SD 1.x, {adapter} on UNet and text encoder, "
          f"{raw['params']:,} parameters), batches of {size}, rounds: {len(times[FLOOR])}")
    print(f"{'case':<14}{'ms/step':>10}{'images/s':>11}{'step/floor':>13}")
    ratios = {}
    rows = [(FLOOR, times[FLOOR], 1.0), (adapter, times[adapter], bench.ratio_to_floor(times, adapter)),
            ("lycoflow fit", raw["fit_step_s"], statistics.median(raw["fit_step_s"]) * 1e3 / floor_ms)]
    for name, t, ratio in rows:
        ratios[name] = ratio
        note = f"   ({len(t)} steps after {FIT_WARMUP}, not interleaved)" if name == "lycoflow fit" else ""
        print(f"{name:<14}{median_ms(t):>10.0f}{size / statistics.median(t):>11.1f}{ratio:>12.2f}x{note}",
              flush=True)
    return ratios


# -- SD 1.5 UNet ----------------------------------------------------------------------------------------------
def build_sd15_unet(device: str) -> bench.Block:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    # diffusers' defaults are SD 1.x's blocks (320, 640, 1280, 1280, 2 layers each); these three are 1.5's.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(device)
    unet.set_attn_processor(AttnProcessor2_0())  # as DiffusionFinetune does
    context = torch.randn(1, 77, 768, device=device)
    t = torch.tensor([500], device=device)
    x = torch.randn(1, 4, 32, 32, device=device)
    return bench.Block(unet, lambda h: unet(h, t, encoder_hidden_states=context, return_dict=False)[0], x,
                       "attn-mlp")


def build_sdxl_unet(device: str) -> bench.Block:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816).to(device)
    unet.set_attn_processor(AttnProcessor2_0())
    context = torch.randn(1, 77, 2048, device=device)
    extra = {"text_embeds": torch.randn(1, 1280, device=device),
             "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]], device=device)}
    t = torch.tensor([500], device=device)
    x = torch.randn(1, 4, 32, 32, device=device)
    return bench.Block(unet, lambda h: unet(h, t, encoder_hidden_states=context, added_cond_kwargs=extra,
                                            return_dict=False)[0], x, "attn-mlp")


#: The UNet-shaped parts: how each builds its model.
UNETS = {"sd15": build_sd15_unet, "sdxl": build_sdxl_unet}


def measure_unet(part: str, settings: bench.Settings, compile_unet: bool = False) -> dict[str, Any]:
    device = settings.device
    block = UNETS[part](device)
    block.root.requires_grad_(False).train()
    if compile_unet:  # each case compiles in the untimed warm-up round (attaching changes what is traced)
        block.root.compile()
    nets = {name: bench.make_network(block, name) for name in UNET_ALGORITHMS}  # left detached
    inp = block.x.clone().requires_grad_()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16):
            loss = block.forward(inp).float().square().mean()  # no name holds the output during backward
        loss.backward()

    def clear_input_grad() -> None:
        inp.grad = None

    cases = {FLOOR: bench.Case(lambda: None, clear_input_grad),
             **{name: bench.Case(lambda net=net: bench.attach(net), lambda net=net: (bench.detach(net),
                                                                                     clear_input_grad()))
                for name, net in nets.items()}}
    times = bench.round_robin(cases, step, settings)
    memory = bench.case_peaks(cases, step, device)
    return {"unet_params": sum(p.numel() for p in block.root.parameters()),
            "params": {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()},
            "step_s": times, "peak_bytes": memory}


def print_unet(part: str, raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    times, memory = raw["step_s"], raw["peak_bytes"]
    shape = {"sd15": "SD 1.5", "sdxl": "SDXL"}[part]
    print(f"{part}: {shape}-shaped UNet ({raw['unet_params'] / 1e6:.0f} M parameters, random init), batch 1, 32×32 "
          f"latents, preset attn-mlp, rounds: {len(times[FLOOR])}; floor peak {memory[FLOOR] / 2**20:.0f} MiB")
    print(f"{'case':<14}{'params':>11}{'s/step':>9}{'step/floor':>13}{'memory/floor':>14}")
    ratios = {}
    for name in times:
        params = raw["params"].get(name, 0)
        ratios[name] = {"step": bench.ratio_to_floor(times, name), "memory": memory[name] / memory[FLOOR]}
        print(f"{name:<14}{params:>11,}{statistics.median(times[name]):>9.2f}{ratios[name]['step']:>12.2f}x"
              f"{ratios[name]['memory']:>13.2f}x", flush=True)
    return ratios


# -- the frozen base in float32, bf16, int8 and float8 ---------------------------------------------------------
EIGHT_BIT = get_args(Quantization)  # int8, float8
BASES = ("float32", "bfloat16", *EIGHT_BIT)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's weights take: an 8-bit weight counts its 8-bit values and its scales."""
    def size(t: Tensor) -> int:
        parts = [t.qdata, t.scale] if hasattr(t, "qdata") else [t]
        return sum(p.numel() * p.element_size() for p in parts)

    return sum(size(p) for p in module.parameters())


def rounding_errors(model: torch.nn.Module) -> dict[str, float]:
    """‖W_stored − W‖ / ‖W‖ over every weight `quantize_frozen` stores, per 8-bit storage, from float32 weights."""
    import copy

    import lycoris
    from lycoris.quantize import dense_weight

    originals, errors = dict(model.named_modules()), {}
    for kind in EIGHT_BIT:
        stored = copy.deepcopy(model).float().requires_grad_(False)
        lycoris.quantize_frozen(stored, kind)
        error = size = 0.0
        for name, layer in stored.named_modules():  # layer by layer: not a second float32 model
            if isinstance(layer, lycoris.Quantized):
                weight = originals[name].weight.float()
                error += (dense_weight(layer).float() - weight).square().sum().item()
                size += weight.square().sum().item()
        errors[kind] = (error / size) ** 0.5
    return errors


def measure_bases(settings: bench.Settings, compile_unet: bool = False) -> dict[str, Any]:
    import lycoris
    from lycoflow.toy import ToySD

    device = settings.device
    # How far each storage rounds the weights: this UNet's (its seed-0 initialisation) and a trained one's; first,
    # while the four models below do not take the memory.
    rounding = {"SD 1.5-shaped UNet (initialisation)": rounding_errors(build_sd15_unet("cpu").root),
                "toy world UNet (trained)": rounding_errors(ToySD().load().unet)}
    blocks, nets = {}, {}
    for base in BASES:
        block = build_sd15_unet(device)  # seed 0: the same weights each time
        block.root.requires_grad_(False).train()
        if base != "float32":
            block.root.to(torch.bfloat16)
        if base in EIGHT_BIT:
            lycoris.quantize_frozen(block.root, base)
        if compile_unet:
            block.root.compile()
        blocks[base] = block
        nets[base] = {name: bench.make_network(block, name) for name in UNET_ALGORITHMS}
    inputs = {base: block.x.clone().requires_grad_() for base, block in blocks.items()}
    current = {"base": BASES[0]}

    def step() -> None:
        base = current["base"]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=base != "float32"):
            loss = blocks[base].forward(inputs[base]).float().square().mean()
        loss.backward()

    def case(base: str, net: lycoris.Network | None) -> bench.Case:
        def setup() -> None:
            current["base"] = base
            if net is not None:
                bench.attach(net)

        def teardown() -> None:
            if net is not None:
                bench.detach(net)
            inputs[base].grad = None

        return bench.Case(setup, teardown)

    cases = {f"{base} {name}": case(base, None if name == FLOOR else nets[base][name])
             for base in BASES for name in (FLOOR, *UNET_ALGORITHMS)}
    times = bench.round_robin(cases, step, settings)
    weights = {base: weight_bytes(block.root) for base, block in blocks.items()}
    peaks = bench.case_peaks(cases, step, device)
    return {"step_s": times, "total_bytes": {name: weights[name.split(" ")[0]] + peak for name, peak in peaks.items()},
            "weight_bytes": weights, "rounding": rounding}


def print_bases(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    times, memory = raw["step_s"], raw["total_bytes"]
    weights = ", ".join(f"{base} {n / 2**20:.0f} MiB" for base, n in raw["weight_bytes"].items())
    print(f"bases: SD 1.5-shaped UNet, batch 1, 32×32 latents, preset attn-mlp, rounds: {len(times['float32 floor'])}; "
          f"weights: {weights}")
    print(f"{'case':<18}{'s/step':>9}{'step/floor':>13}{'step/bf16':>12}{'memory MiB':>13}{'/fp32 floor':>14}")
    ratios = {}
    reference = memory["float32 floor"]
    for name in times:
        base, algorithm = name.split(" ")
        own = statistics.median(t / f for t, f in zip(times[name], times[f"{base} {FLOOR}"]))
        bf16 = statistics.median(t / f for t, f in zip(times[name], times[f"bfloat16 {algorithm}"]))
        ratios[name] = {"step": own, "step_vs_bf16": bf16, "memory": memory[name] / reference}
        print(f"{name:<18}{statistics.median(times[name]):>9.2f}{own:>12.2f}x{bf16:>11.2f}x"
              f"{memory[name] / 2**20:>13.0f}{ratios[name]['memory']:>13.2f}x", flush=True)
    for model, errors in raw["rounding"].items():
        print(f"rounding of the stored weights, ‖W_stored − W‖/‖W‖, {model}: "
              + ", ".join(f"{kind} {error:.2%}" for kind, error in errors.items()))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["quickstart", *UNETS, "bases"],
                        default=["quickstart", "sd15"])
    parser.add_argument("--rounds", type=int, default=2, help="sd15, sdxl: at least this many timed rounds")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timed rounds per part: more rounds while they fit (quickstart: at least 5)")
    parser.add_argument("--fit-steps", type=int, default=20, help="lycoflow fit steps timed (after 3 untimed)")
    parser.add_argument("--quick", action="store_true", help="1 s budget, 3 quickstart rounds, 1 UNet round, "
                        "5 fit steps: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the steps (fit: bf16-mixed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (fit: model.compile); "
                        "every case compiles in the untimed warm-up round")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the per-round times, bytes and ratios here")
    args = parser.parse_args()
    budget = 1.0 if args.quick else args.budget
    settings = {"quickstart": bench.Settings(args.device, args.bf16, 3 if args.quick else 5, budget),
                **{part: bench.Settings(args.device, args.bf16, 1 if args.quick else args.rounds, budget)
                   for part in (*UNETS, "bases")}}
    fit_steps = 5 if args.quick else args.fit_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()

    print(f"device {args.device}, {torch.get_num_threads()} threads, bf16={args.bf16}, compile={args.compile}, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results = {}
    for part in args.parts:
        start = time.perf_counter()
        if part == "quickstart":
            raw = measure_quickstart(settings[part], fit_steps, args.compile)
            results[part] = {"raw": raw, "ratios": print_quickstart(raw)}
        elif part == "bases":
            raw = measure_bases(settings[part], args.compile)
            results[part] = {"raw": raw, "ratios": print_bases(raw)}
        else:
            raw = measure_unet(part, settings[part], args.compile)
            results[part] = {"raw": raw, "ratios": print_unet(part, raw)}
        print(f"({part}: {time.perf_counter() - start:.0f} s; load now {os.getloadavg()[0]:.1f})\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "bf16": args.bf16,
                       "parts": results}, f, indent=1)


if __name__ == "__main__":
    main()
