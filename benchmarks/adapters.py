"""Adapter training cost against the frozen-model floor, and merged inference against the base model.

Blocks, SD 1.5 shapes at batch 1 and 32×32 latents, nested under their SD 1.5 module paths so that the
presets select exactly what they select in a real UNet:

- ``transformer``: ``down_blocks.0.attentions.0``, a Transformer2DModel (320 channels, 8 heads × 40,
  1024 tokens, cross-attention to 77×768) with preset ``attn-mlp``, the paper's (q/k/v/out of both
  attentions, the GEGLU MLP, proj_in/proj_out: 12 layers);
- ``resnet``: ``down_blocks.0.resnets.0``, a ResnetBlock2D (320 channels, two 3×3 convs, 1280-d time
  embedding) with preset ``full`` (conv1, conv2, time_emb_proj).

Every algorithm runs at the paper's defaults (LoRA dim 8 α 4, LoHa dim 4 α 2, LoKr factor 8 dim 10000 α 1;
the others as in ``ALGORITHMS``), its parameters nudged off their init so that no zero factor lets a path
be skipped. Per block:

- **step / floor**: time of one training step (forward, then backward of the output's mean square) with
  the adapter, over the *floor*'s: the same block frozen (no parameter needs a gradient) with gradients
  only for its input, which is what any adapter pays, since inside a network a block's input always needs
  a gradient. Detaching an adapter gives the floor back, so every case runs on the very same block.
  Cases run round-robin, shuffled each round, after a warm-up round; the ratio is the median over rounds
  of the case's time over the floor's in the same round, so a slowdown of the machine that lasts a round
  cancels and one that hits a single step is outvoted. Rounds: at least ``--repeats``, more while they fit
  in ``--budget`` seconds per phase.
- **memory / floor**: peak memory allocated *during* one step (activations kept for backward,
  temporaries, gradients) above what was allocated before it, over the floor's. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: the same quantity from the PyTorch profiler's allocator events
  (every tensor allocation and free, summed in time order): exact and repeatable, unlike the process's
  peak RSS. Scratch space that oneDNN/BLAS take outside PyTorch's allocator is not counted; the base ops
  are the same in every case.
- **limit** and **target**: the case that bounds the algorithm from below, measured in the same rounds —
  ``floor`` for the factored algorithms, ``floor+dW`` (the floor with the weight gradient of every adapted layer)
  for those that rebuild ΔW (LoHa, GLoRA, Full; DoRA on the convolutions) — the step over that limit, and
  whether step / floor meets the target (≤ 1.10×, ≤ 1.55× for the rebuilding ones).
- **merged / base**: no-grad forward time (eval mode) after ``net.merge()`` over the base block's,
  measured round-robin the same way. A merged network is the base model, so this should print 1.00.

On CPU, other work on the machine distorts multi-threaded timings unevenly (every op waits for its
slowest thread, and adapters add ops), so the header prints the load; where it is high, ``--threads 1``
gives steadier ratios. Memory does not depend on it.

    python benchmarks/adapters.py [--quick] [--repeats N] [--budget S] [--threads N]
                                  [--device cpu|cuda] [--bf16] [--blocks ...] [--algorithms ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import lycoris
from lycoris.functional import SUPPORTED_LAYERS

#: name → the strategy at the paper's defaults, given the block's preset.
ALGORITHMS: dict[str, Callable[[str], lycoris.Strategy]] = {
    "LoRA": lambda preset: lycoris.LoRA(dim=8, alpha=4, preset=preset),
    "LoHa": lambda preset: lycoris.LoHa(dim=4, alpha=2, preset=preset),
    "LoKr": lambda preset: lycoris.LoKr(factor=8, dim=10000, alpha=1, preset=preset),
    "DyLoRA": lambda preset: lycoris.DyLoRA(dim=8, alpha=4, block_size=1, preset=preset),
    "GLoRA": lambda preset: lycoris.GLoRA(dim=8, alpha=4, preset=preset),
    "IA3": lambda preset: lycoris.IA3(preset=preset),
    "OFT": lambda preset: lycoris.OFT(dim=4, preset=preset),  # 4×4 blocks: 80 of them on 320 rows
    "BOFT": lambda preset: lycoris.BOFT(dim=10, preset=preset),  # 320 = 10·2⁵: blocks of 10, 6 stages
    "DoRA": lambda preset: lycoris.LoRA(dim=8, alpha=4, weight_decompose=True, preset=preset),
    "Full": lambda preset: lycoris.Full(preset=preset),
}
FLOOR = "floor"
#: The floor plus the weight gradient (dL/dW) of every layer the preset adapts: what an algorithm that rebuilds ΔW
#: from its factors pays at least, since its factors' gradients come through dL/dW' of the rebuilt weight.
WEIGHT_GRAD = "floor+dW"
#: The algorithms that rebuild ΔW everywhere (no factored path); DoRA rebuilds on convolutions (the resnet block).
REBUILDS = ("LoHa", "GLoRA", "Full")
MAX_ROUNDS = 50


def target(block: str, algorithm: str) -> tuple[str, float]:
    """The case an algorithm's step is held against, and the issue's target for step / floor: the factored
    algorithms pay the floor plus work at rank or activation cost (≤ 1.10×), the rebuilding ones at least the
    floor plus the weight gradient (≤ 1.55×)."""
    if algorithm in REBUILDS or (algorithm == "DoRA" and block == "resnet"):
        return WEIGHT_GRAD, 1.55
    return FLOOR, 1.10


@dataclass
class Block:
    """A benchmark block: ``root`` carries the SD 1.5 module paths, ``forward`` runs the block itself."""

    root: nn.Module
    forward: Callable[[Tensor], Tensor]
    x: Tensor
    preset: str


@dataclass
class Case:
    """A configuration of the block: ``setup`` before the timed call, ``teardown`` after it (untimed)."""

    setup: Callable[[], object]
    teardown: Callable[[], object]


@dataclass
class Settings:
    device: str
    bf16: bool
    rounds: int  # at least this many timed rounds per phase,
    budget_s: float  # and more while they fit in this many seconds


def nest(path: str, leaf: nn.Module) -> nn.Module:
    """A module tree in which ``leaf`` sits at the dotted ``path`` (numeric parts become ModuleLists)."""
    node = leaf
    for part in reversed(path.split(".")):
        if part.isdigit():
            node = nn.ModuleList([nn.Module() for _ in range(int(part))] + [node])
        else:
            parent = nn.Module()
            parent.add_module(part, node)
            node = parent
    return node


def build_transformer(device: str) -> Block:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                               cross_attention_dim=768, norm_num_groups=32).to(device)
    context = torch.randn(1, 77, 768, device=device)
    x = torch.randn(1, 320, 32, 32, device=device)
    return Block(nest("down_blocks.0.attentions.0", block),
                 # a tuple, not diffusers' deprecated output class (which warns on every construction)
                 lambda h: block(h, encoder_hidden_states=context, return_dict=False)[0], x, "attn-mlp")


def build_resnet(device: str) -> Block:
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280).to(device)
    temb = torch.randn(1, 1280, device=device)
    x = torch.randn(1, 320, 32, 32, device=device)
    return Block(nest("down_blocks.0.resnets.0", block), lambda h: block(h, temb), x, "full")


BLOCKS: dict[str, Callable[[str], Block]] = {"transformer": build_transformer, "resnet": build_resnet}


def make_network(block: Block, algorithm: str) -> lycoris.Network:
    """The algorithm's network on ``block``, parameters nudged off their init, left detached."""
    net = ALGORITHMS[algorithm](block.preset).apply(block.root, prefix="lora_unet")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    net.remove()  # networks take turns on the same layers
    return net


def attach(net: lycoris.Network, merged: bool = False) -> None:
    for adapter in net.adapters():
        adapter.attach()
    if merged:
        net.merge()


def detach(net: lycoris.Network) -> None:
    for adapter in net.adapters():
        adapter.detach()  # unmerges too: the exact original weights
        for p in adapter.parameters():
            p.grad = None


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_robin(cases: dict[str, Case], fn: Callable[[], object], settings: Settings) -> dict[str, list[float]]:
    """Times of ``fn`` per case, one per round, the cases in a new shuffled order each round.

    An untimed warm-up round first (allocator, kernels, caches); its wall time sets the number of rounds.
    """
    order = list(cases)
    rng = random.Random(0)

    def one_round() -> dict[str, float]:
        rng.shuffle(order)  # no case always follows the same one
        times = {}
        for name in order:
            cases[name].setup()
            times[name] = timed(fn, settings.device)
            cases[name].teardown()
        return times

    start = time.perf_counter()
    one_round()
    warmup_s = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(settings.rounds, math.ceil(settings.budget_s / warmup_s)))
    results = [one_round() for _ in range(rounds)]
    return {name: [r[name] for r in results] for name in cases}


def ratio_to_floor(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of the case's time over the floor's in the same round."""
    return statistics.median(t / f for t, f in zip(times[name], times[FLOOR]))


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def running_sums(values: Iterable[int]) -> Iterator[int]:
    total = 0
    for v in values:
        total += v
        yield total


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated when it started."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocator events (+bytes on allocation, −bytes on free): the FunctionEvent list folds most of
    # them into the ops that made them.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(running_sums(n for _, n in events), default=0)


def case_peaks(cases: dict[str, Case], fn: Callable[[], object], device: str) -> dict[str, int]:
    """`peak_bytes` of ``fn`` per case, set up around it; once each, after the timed rounds."""
    peaks = {}
    for name, case in cases.items():
        torch.manual_seed(0)  # DyLoRA samples its rank per step: the same one in every run
        case.setup()
        peaks[name] = peak_bytes(fn, device)
        case.teardown()
    return peaks


def measure_block(block: Block, algorithms: list[str], settings: Settings) -> dict[str, dict]:
    """Per case, ``floor`` first: adapter parameter count, step times per round, peak step bytes, merged
    forward times per round."""
    device = settings.device
    block.root.requires_grad_(False)
    nets = {name: make_network(block, name) for name in algorithms}
    inp = block.x.clone().requires_grad_()

    def autocast() -> torch.autocast:
        return torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16)

    def step() -> None:
        with autocast():
            loss = block.forward(inp).float().square().mean()  # no name holds the output during backward
        loss.backward()

    def forward() -> None:
        with autocast():
            block.forward(block.x)

    def clear_input_grad() -> None:
        inp.grad = None

    def case(net: lycoris.Network | None, merged: bool = False) -> Case:
        if net is None:
            return Case(lambda: None, clear_input_grad)
        return Case(lambda: attach(net, merged), lambda: (detach(net), clear_input_grad()))

    adapted = [a.base.weight for a in make_network(block, "LoRA").adapters() if isinstance(a.base, SUPPORTED_LAYERS)]

    def weight_grads(on: bool) -> None:
        for weight in adapted:
            weight.requires_grad_(on)
            weight.grad = None

    train_cases = {FLOOR: case(None), WEIGHT_GRAD: Case(lambda: weight_grads(True),
                                                        lambda: (weight_grads(False), clear_input_grad())),
                   **{name: case(net) for name, net in nets.items()}}
    block.root.train()
    step_s = round_robin(train_cases, step, settings)
    memory = case_peaks(train_cases, step, device)

    merged_cases = {FLOOR: case(None), **{name: case(net, merged=True) for name, net in nets.items()}}
    block.root.eval()
    with torch.no_grad():
        forward_s = round_robin(merged_cases, forward, settings)
    return {name: {"params": sum(p.numel() for p in nets[name].parameters()) if name in nets else 0,
                   "step_s": step_s[name], "peak_bytes": memory[name], "forward_s": forward_s.get(name)}
            for name in train_cases}


def ratios(block: str, raw: dict[str, dict]) -> dict[str, dict[str, float | str | bool]]:
    steps = {name: r["step_s"] for name, r in raw.items()}
    forwards = {name: r["forward_s"] for name, r in raw.items() if r["forward_s"] is not None}
    out: dict[str, dict[str, float | str | bool]] = {}
    for name, r in raw.items():
        if name == FLOOR:
            continue
        step = ratio_to_floor(steps, name)
        out[name] = {"step": step, "memory": r["peak_bytes"] / raw[FLOOR]["peak_bytes"]}
        if name in forwards:
            limit, goal = target(block, name)
            out[name] |= {"merged": ratio_to_floor(forwards, name), "limit": limit, "target": goal, "met": step <= goal,
                          "step_over_limit": statistics.median(t / w for t, w in zip(steps[name], steps[limit]))}
    return out


def print_block(name: str, raw: dict[str, dict]) -> None:
    floor = raw[FLOOR]
    print(f"{name}: floor step {statistics.median(floor['step_s']) * 1e3:.0f} ms ({len(floor['step_s'])} rounds), "
          f"peak {floor['peak_bytes'] / 2**20:.1f} MiB; base forward {statistics.median(floor['forward_s']) * 1e3:.0f}"
          f" ms ({len(floor['forward_s'])} rounds)")
    for algorithm, r in ratios(name, raw).items():
        line = f"{name:<12}{algorithm:<9}{raw[algorithm]['params']:>10,}{r['step']:>12.2f}x{r['memory']:>13.2f}x"
        if "merged" in r:
            line += (f"{r['merged']:>12.2f}x  {r['limit']:<9}{r['step_over_limit']:>6.2f}x  "
                     f"{'≤' if r['met'] else '>'} {r['target']:.2f}x {'met' if r['met'] else 'not met'}")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed rounds per phase")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per phase (4 phases)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 s per phase: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the step and the forward")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), default=list(BLOCKS))
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--json", metavar="PATH", help="also write the per-round times, bytes and ratios here")
    args = parser.parse_args()
    settings = Settings(args.device, args.bf16, 3 if args.quick else args.repeats, 1.0 if args.quick else args.budget)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device {args.device}, {torch.get_num_threads()} threads, bf16={args.bf16}, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'block':<12}{'algo':<9}{'params':>10}{'step/floor':>13}{'memory/floor':>14}{'merged/base':>13}  "
          f"{'limit':<9}{'/limit':>7}  target")
    results = {}
    for name in args.blocks:
        raw = measure_block(BLOCKS[name](args.device), args.algorithms, settings)
        print_block(name, raw)
        results[name] = {"raw": raw, "ratios": ratios(name, raw)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "bf16": args.bf16,
                       "blocks": results}, f, indent=1)


if __name__ == "__main__":
    main()
