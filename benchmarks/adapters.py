"""Adapter training cost against the frozen-model floor, and merged inference against the base model.

Blocks (SD 1.5 shapes, batch 1, 32×32 latents = 1024 tokens): a Transformer2DModel (320 channels, 8 heads
× 40, cross-attention to 77×768; every Linear/Conv in it adapted, i.e. the paper's attn-mlp layers) and a
ResnetBlock2D (320 channels, 3×3 convs, 1280-d time embedding; every layer adapted).

For each algorithm at the paper's defaults (LoRA dim 8 α 4, LoHa dim 4 α 2, LoKr factor 8 dim 10000 α 1, ...):
- step: median time of forward + backward of a training step, divided by the floor's — the same block
  frozen, with gradients only for its input (what any adapter must at least pay). Adapter and floor steps
  alternate in one process (attach, step, detach, step, ...) so that the machine's drift hits both alike;
- memory: peak memory of one step above what was allocated before it (CUDA: max_memory_allocated; CPU: the
  process's peak RSS, so every case runs in a fresh subprocess), divided by the floor's;
- merged: median no-grad forward time after `net.merge()`, divided by the base block's, alternating the
  same way (should be 1.00).

    python benchmarks/adapters.py [--repeats 5] [--device cpu|cuda] [--bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import lycoris

ALGORITHMS: dict[str, Callable[[], lycoris.Strategy | None]] = {
    "floor": lambda: None,
    "LoRA": lambda: lycoris.LoRA(dim=8, alpha=4),
    "LoHa": lambda: lycoris.LoHa(dim=4, alpha=2),
    "LoKr": lambda: lycoris.LoKr(factor=8, dim=10000, alpha=1),
    "DyLoRA": lambda: lycoris.DyLoRA(dim=8, alpha=4, block_size=2),
    "GLoRA": lambda: lycoris.GLoRA(dim=8, alpha=4),
    "IA3": lambda: lycoris.IA3(),
    "OFT": lambda: lycoris.OFT(dim=4),
    "BOFT": lambda: lycoris.BOFT(dim=10),
    "DoRA": lambda: lycoris.LoRA(dim=8, alpha=4, weight_decompose=True),
    "Full": lambda: lycoris.Full(),
}


def build(block: str, device: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    x = torch.randn(1, 320, 32, 32, device=device)
    if block == "transformer":
        module = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                                    cross_attention_dim=768, norm_num_groups=32).to(device)
        context = torch.randn(1, 77, 768, device=device)
        return module, lambda h: module(h, encoder_hidden_states=context).sample, x
    module = ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280).to(device)
    temb = torch.randn(1, 1280, device=device)
    return module, lambda h: module(h, temb), x


def once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(fn: Callable[[], object], setup_a: Callable[[], object], setup_b: Callable[[], object],
                repeats: int, device: str) -> float:
    """Median time of ``fn`` after ``setup_a`` over that after ``setup_b`` (setups untimed), alternating the
    two so that drift of the machine hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 2):  # the first two rounds warm up allocator, kernels and caches
        setup_a()
        ta = once(fn, device)
        setup_b()
        tb = once(fn, device)
        if i >= 2:
            times[0].append(ta)
            times[1].append(tb)
    return statistics.median(times[0]) / statistics.median(times[1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(block: str, algorithm: str, device: str, repeats: int, bf16: bool) -> dict[str, float]:
    """One case, in this process: peak memory of a training step; for adapters, also the step time against
    the floor and merged inference against the base, each measured alternately in this process."""
    module, forward, x = build(block, device)
    module.requires_grad_(False)
    strategy = ALGORITHMS[algorithm]()
    net = strategy.apply(module, prefix="lora_unet") if strategy else None  # attached for the memory step
    if net is not None:
        with torch.no_grad():  # a trained-looking adapter, so no path is skipped for being zero
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    inp = x.clone().requires_grad_()  # inside a network the block's input always needs a gradient

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = forward(inp)
        out.float().square().mean().backward()
        if net is not None:
            for p in net.parameters():
                p.grad = None
        inp.grad = None

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    step()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
    result = {"peak_bytes": float(max(peak, 1))}
    if net is None:
        return result

    def attach() -> None:
        for adapter in net.adapters():
            adapter.attach()

    def detach() -> None:
        for adapter in net.adapters():
            adapter.detach()

    def attach_merged() -> None:
        attach()
        net.merge()

    net.remove()  # from here on the setups attach and detach it
    result["step_ratio"] = interleaved(step, attach, detach, repeats, device)
    with torch.no_grad():
        result["merged_ratio"] = interleaved(lambda: forward(x), attach_merged, detach, repeats, device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step")
    parser.add_argument("--blocks", nargs="+", default=["transformer", "resnet"])
    parser.add_argument("--algorithms", nargs="+", default=[a for a in ALGORITHMS if a != "floor"])
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--case", nargs=2, metavar=("BLOCK", "ALGORITHM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(measure(*args.case, args.device, args.repeats, args.bf16)))
        return

    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"device {args.device}, {torch.get_num_threads()} threads, bf16={args.bf16}, median of {args.repeats}")
    print(f"{'block':<12}{'algorithm':<10}{'step/floor':>11}{'memory/floor':>14}{'merged/base':>13}")
    for block in args.blocks:
        results[block] = {}
        for algorithm in ["floor", *args.algorithms]:
            # A fresh process per case: peak RSS is a per-process high-water mark, and no case warms another.
            cmd = [sys.executable, __file__, "--case", block, algorithm, "--device", args.device,
                   "--repeats", str(args.repeats), *(["--bf16"] if args.bf16 else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[block][algorithm] = r = json.loads(out.strip().splitlines()[-1])
            if algorithm == "floor":
                continue
            floor = results[block]["floor"]
            print(f"{block:<12}{algorithm:<10}{r['step_ratio']:>10.2f}x"
                  f"{r['peak_bytes'] / floor['peak_bytes']:>13.2f}x{r['merged_ratio']:>12.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
