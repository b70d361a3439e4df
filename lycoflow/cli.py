"""The ``lycoflow`` command.

Until the Lightning ``fit`` command lands, it offers ``lycoflow demo``: train a LoKr adapter on a tiny
SD-1.x-architecture UNet built from config (no network, no GPU), save it, load it back, merge it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import lycoris
from lycoflow.tiny import tiny_unet

console = Console()


def demo(out_dir: Path, steps: int, seed: int) -> Path:
    """Fit LoKr on the tiny UNet to a fixed denoising target and round-trip the adapter file."""
    unet = tiny_unet(seed=seed).requires_grad_(False)
    strategy = lycoris.LoKr(factor=4, dim=10000, alpha=1, preset="attn-mlp")
    net = strategy.apply(unet, prefix="lora_unet")
    trainable = sum(p.numel() for p in net.parameters())
    console.print(f"[bold]{strategy}[/]\nadapted {len(net.adapters())} layers, {trainable:,} trainable parameters "
                  f"({trainable / sum(p.numel() for p in unet.parameters()):.1%} of the UNet)")

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 16, 16, generator=gen)
    text = torch.randn(4, 7, 32, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (4,), generator=gen)
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0.1, betas=(0.9, 0.99))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pred = unet(latents + noise, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(1, steps // 5) == 0:
            console.print(f"step {step:3d}  loss {loss.item():.4f}")
    console.print(f"{steps} steps in {time.perf_counter() - start:.1f}s")

    path = lycoris.save_file(out_dir / "demo-lokr.safetensors", {"lora_unet": net}, metadata={"demo": "lokr"})
    net.eval()
    with torch.no_grad():
        trained = unet(latents, timesteps, encoder_hidden_states=text).sample
        fresh = tiny_unet(seed=seed)
        loaded = lycoris.load_file(path, {"lora_unet": fresh})["lora_unet"].eval()
        reloaded = fresh(latents, timesteps, encoder_hidden_states=text).sample
        loaded.merge()
        merged = fresh(latents, timesteps, encoder_hidden_states=text).sample

    table = Table(title="adapter file round trip")
    table.add_column("check")
    table.add_column("max |difference|", justify="right")
    table.add_row("reloaded onto a fresh UNet vs trained", f"{(reloaded - trained).abs().max():.2e}")
    table.add_row("merged into the weights vs trained", f"{(merged - trained).abs().max():.2e}")
    console.print(table)
    console.print(f"adapter written to [bold]{path}[/] ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lycoflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train, save, reload and merge a LoKr adapter on a tiny model (CPU, offline)")
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p_demo.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
