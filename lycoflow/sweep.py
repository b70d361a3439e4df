"""``lycoflow sweep``: a grid of configurations × seeds, expanded from a sweep file into concrete `fit` runs.

A sweep file (see ``recipes/sweeps/paper.yaml``)::

    name: paper                      # runs go to runs/<name>/ unless `root:` (relative to the file) or --root
    seeds: [0, 1, 2]
    configs:
      - name: lora
        recipes: [../lora.yaml]      # relative to the sweep file; merged in order, as `lycoflow fit` does
        set: {model.warmup_steps: 100}   # optional: changes for every variant of this configuration
        vary:                        # one variant per entry, each changing the recipes by these keys
          - {model.lr: 1.0e-4}
          - {model.adapter.init_args.dim: 32, model.adapter.init_args.alpha: 16}

expands to the configurations ``lora`` (the recipes as they are), ``lora-lr_0.0001`` and
``lora-dim_32+alpha_16``, each run once per seed into ``<root>/<config>-seed<S>``. A W&B run is named after its
folder and grouped by its configuration (``WANDB_RUN_GROUP``), so dashboards can group the seeds.

Runs execute in subprocesses, one after another or ``--jobs`` side by side (a crash or out-of-memory in one does
not end the sweep; a finished run is skipped and an interrupted one resumed from its last checkpoint when the
sweep is started again), or are emitted for an external scheduler: one command per run, a SLURM array script,
and a W&B sweep definition whose agent runs ``lycoflow sweep FILE --run=K``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cache import atomic_path

#: Written into a run folder when its `fit` exits cleanly; a later sweep skips that run.
DONE = ".sweep-done"


@dataclass(frozen=True)
class SweepRun:
    """One concrete `lycoflow fit`: recipes, the variant's overrides, a seed and a folder."""

    index: int
    config: str
    seed: int
    recipes: tuple[str, ...]
    overrides: tuple[str, ...]
    folder: Path

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        """``lycoflow`` arguments: the sweep-wide ``extra`` overrides first, so that the variant's win."""
        return ["fit", *self.recipes, *extra, *self.overrides, f"--seed_everything={self.seed}",
                f"--trainer.default_root_dir={self.folder}"]

    def env(self) -> dict[str, str]:
        return {"WANDB_RUN_GROUP": self.config}

    def recipe(self, extra: Sequence[str] = ()) -> dict[str, Any]:
        """The run's own recipe: what it changes on top of its recipes (the sweep-wide overrides, the variant's,
        the seed and the folder), nested as a YAML recipe; ``lycoflow fit *recipes THIS`` is the run."""
        out: dict[str, Any] = {}
        for argument in self.argv(extra)[1 + len(self.recipes):]:
            key, _, text = argument[2:].partition("=")
            value = yaml.safe_load(text)
            node = out
            *parents, leaf = key.split(".")
            for part in parents:
                # `--model.base=pkg.Class` then `--model.base.init_args.x=1`: the class path becomes a key.
                if part in node and not isinstance(node[part], dict):
                    node[part] = {"class_path": node[part]}
                node = node.setdefault(part, {})
            if isinstance(node.get(leaf), dict) and isinstance(value, str):
                node[leaf]["class_path"] = value
            else:
                node[leaf] = value
        return out


def _label(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def variant_name(group: str, changes: dict[str, Any]) -> str:
    """``lora`` + {model.lr: 1e-4} → ``lora-lr_0.0001``; several keys joined with ``+``."""
    if not changes:
        return group
    return group + "-" + "+".join(f"{key.rsplit('.', 1)[-1]}_{_label(value)}" for key, value in changes.items())


#: The keys a sweep file and each of its `configs` entries may hold.
_FILE_KEYS = ("name", "seeds", "root", "configs")
_ENTRY_KEYS = ("name", "recipes", "set", "vary")


def _known_keys(mapping: dict[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(known)}")


def load_sweep(path: Path, root: Path | None = None) -> list[SweepRun]:
    """Read and check a sweep file; every run in order (configuration-major, then seed). A misspelt key is an
    error: ignoring it would drop variants or seeds without a word."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"sweep file {path}: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("configs"), list) or not spec["configs"]:
        raise ValueError(f"sweep file {path}: needs `configs:`, a list of {{name, recipes, vary}} entries")
    _known_keys(spec, _FILE_KEYS, f"sweep file {path}")
    name = str(spec.get("name") or path.stem)
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"sweep file {path}: `seeds` must be a list of integers >= 0, got {seeds!r}")
    if root is None:
        root = path.parent / spec["root"] if spec.get("root") else Path("runs") / name
    runs: list[SweepRun] = []
    seen: set[str] = set()
    for i, entry in enumerate(spec["configs"]):
        where = f"sweep file {path}: configs[{i}]"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("recipes"):
            raise ValueError(f"{where} needs `name` and `recipes`")
        _known_keys(entry, _ENTRY_KEYS, where)
        recipes = tuple(str((path.parent / r).resolve()) for r in entry["recipes"])
        for recipe in recipes:
            if not Path(recipe).is_file():
                raise FileNotFoundError(f"{where}: recipe not found: {recipe}")
        variants = entry.get("vary") or []
        if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
            raise ValueError(f"{where}: `vary` must be a list of non-empty {{key: value}} mappings")
        fixed = entry.get("set") or {}
        if not isinstance(fixed, dict):
            raise ValueError(f"{where}: `set` must be a {{key: value}} mapping")
        for changes in [{}, *variants]:
            config = variant_name(str(entry["name"]), changes)
            if config in seen:
                raise ValueError(f"{where}: configuration {config!r} appears twice")
            seen.add(config)
            overrides = tuple(f"--{key}={_cli_value(value)}" for key, value in {**fixed, **changes}.items())
            for seed in seeds:
                runs.append(SweepRun(len(runs), config, seed, recipes, overrides, root / f"{config}-seed{seed}"))
    return runs


def _cli_value(value: Any) -> str:
    # YAML/JSON spelling, which jsonargparse parses back to the same value (lists, null, booleans).
    return value if isinstance(value, str) else json.dumps(value)


def _start(run: SweepRun, extra: Sequence[str], total: int, threads: int | None) -> subprocess.Popen:
    """``lycoflow fit`` of ``run`` (resumed if it has a checkpoint) in a subprocess; with ``threads``, its output goes
    to ``<run folder>/sweep.log`` (runs side by side would interleave theirs) and torch uses that many threads."""
    resume = ["--ckpt_path=last"] if (run.folder / "checkpoints" / "last.ckpt").is_file() else []
    argv = [sys.executable, "-m", "lycoflow.cli", *run.argv(extra), *resume]
    env = {**os.environ, **run.env()}
    progress = f"[{run.index + 1}/{total}] {run.config} seed {run.seed} → {run.folder}" + (
        " (resuming)" if resume else "")
    if threads is None:
        print(progress, flush=True)
        return subprocess.Popen(argv, env=env)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # a user's own setting wins
    run.folder.mkdir(parents=True, exist_ok=True)
    print(f"{progress} (log: {run.folder / 'sweep.log'})", flush=True)
    with open(run.folder / "sweep.log", "ab") as log:  # appended to on a resume; the child keeps its own handle
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(run: SweepRun, code: int, total: int) -> bool:
    """Whether ``run`` succeeded (exit ``code``); a success is marked done."""
    if code == 0:
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / DONE).write_text("")
        return True
    print(f"[{run.index + 1}/{total}] {run.folder}: failed (exit {code}); the sweep goes on", file=sys.stderr,
          flush=True)
    return False


def run_locally(runs: Sequence[SweepRun], extra: Sequence[str], total: int, jobs: int = 1) -> int:
    """Each run in a subprocess, ``jobs`` at a time (each then with its share of the CPU cores as torch threads);
    returns the number that failed (``total``: the sweep's size, for the progress lines)."""
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None
    failed: list[SweepRun] = []
    running: list[tuple[SweepRun, subprocess.Popen]] = []
    pending = []
    for run in runs:
        if (run.folder / DONE).is_file():
            print(f"[{run.index + 1}/{total}] {run.folder}: done already, skipped")
        else:
            pending.append(run)
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            running.append((run, _start(run, extra, total, threads)))
        finished = [r for r in running if r[1].poll() is not None]  # whichever ends first frees its slot
        if not finished:
            time.sleep(0.2)
        for run, process in finished:
            running.remove((run, process))
            if not _finish(run, process.returncode, total):
                failed.append(run)
    print(f"sweep: {len(runs) - len(failed)} of {len(runs)} runs done" +
          (f"; failed: {', '.join(str(r.folder) for r in failed)} (start the sweep again to retry them)"
           if failed else ""))
    return len(failed)


def emit(runs: Sequence[SweepRun], sweep_file: Path, extra: Sequence[str], out: Path, name: str) -> list[Path]:
    """Write ``recipes/<run>.yaml`` (each run's concrete recipe on top of its base recipes), ``commands.sh`` (one
    command per run), ``slurm.sh`` (an array job) and ``wandb_sweep.yaml``."""
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    base = ["lycoflow", "sweep", str(sweep_file.resolve()), *extra]
    files: list[tuple[Path, str]] = []
    commands = ["#!/bin/sh", f"# {len(runs)} runs of sweep {name}; any line can run anywhere, in any order."]
    for run in runs:
        recipe = (out / "recipes" / f"{run.folder.name}.yaml").resolve()
        header = f"# Run {run.index} of sweep {name}: lycoflow fit {shlex.join([*run.recipes, str(recipe)])}\n"
        files.append((recipe, header + yaml.safe_dump(run.recipe(extra), sort_keys=False)))
        commands.append(f"WANDB_RUN_GROUP={shlex.quote(run.config)} lycoflow fit "
                        f"{shlex.join([*run.recipes, str(recipe)])}")
    slurm = ["#!/bin/bash", f"#SBATCH --job-name=lycoflow-{name}", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --gpus=1", "# Add your partition, time and memory lines here.",
             f"{shlex.join(base)} --run=$SLURM_ARRAY_TASK_ID"]
    wandb = {"name": f"lycoflow-{name}", "program": "lycoflow", "method": "grid",
             "parameters": {"run": {"values": list(range(len(runs)))}},
             "command": [*base, "${args}"]}
    files += [(out / "commands.sh", "\n".join(commands) + "\n"), (out / "slurm.sh", "\n".join(slurm) + "\n"),
              (out / "wandb_sweep.yaml", yaml.safe_dump(wandb, sort_keys=False))]
    for path, text in files:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return [path for path, _ in files[-3:]] + [out / "recipes"]


USAGE_EPILOG = """examples:
  lycoflow sweep recipes/sweeps/paper.yaml --data.init_args.root=/data/concepts   # every run, one after another
  lycoflow sweep recipes/sweeps/toy.yaml --jobs=2      # two runs side by side, a core each (on CPU: more runs/hour)
  lycoflow sweep recipes/sweeps/paper.yaml --list                                # the runs and their folders
  lycoflow sweep recipes/sweeps/paper.yaml --run=5 --data.init_args.root=...     # run 5 only (SLURM, W&B agents)
  lycoflow sweep recipes/sweeps/paper.yaml --emit sweep/ --data.init_args.root=...
      # sweep/recipes/<run>.yaml (each run's concrete recipe), sweep/commands.sh (a line per run), sweep/slurm.sh
      # (sbatch it), sweep/wandb_sweep.yaml (wandb sweep it, then wandb agent)

Other --key=value arguments are passed to every run's `lycoflow fit` (before the variant's own changes).
A run that finished is skipped when the sweep is started again; an interrupted one resumes from its checkpoint."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lycoflow sweep", description="Run or emit a grid of lycoflow fit runs.",
                                     epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the sweep file (see recipes/sweeps/paper.yaml)")
    parser.add_argument("--root", type=Path, help="folder of the runs (default: runs/<name>, or the file's root:)")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--run", type=int, help="run only this one (0-based index, as --list numbers them)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs side by side, each with its share of the CPU cores as torch threads and its "
                             "output in <run folder>/sweep.log (default 1: one after another, output here)")
    parser.add_argument("--emit", type=Path, metavar="DIR",
                        help="write recipes/<run>.yaml, commands.sh, slurm.sh, wandb_sweep.yaml")
    options, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not a.startswith("--") or "=" not in a]
    if unknown:
        raise ValueError(f"lycoflow sweep passes only --key=value overrides to the runs; got {' '.join(unknown)}")
    if not options.sweep.is_file():
        raise FileNotFoundError(f"sweep file not found: {options.sweep}")
    runs = load_sweep(options.sweep, options.root)
    name = runs[0].folder.parent.name
    if options.list:
        for run in runs:
            print(f"{run.index:>4}  {run.config:<36} seed {run.seed}  {run.folder}")
        print(f"{len(runs)} runs, {len({r.config for r in runs})} configurations")
        return 0
    if options.emit:
        for path in emit(runs, options.sweep, extra, options.emit, name):
            print(f"wrote {path}")
        return 0
    total = len(runs)
    if options.run is not None:
        if not 0 <= options.run < total:
            raise ValueError(f"--run={options.run}: the sweep has runs 0 to {total - 1} (see --list)")
        runs = [runs[options.run]]
    if options.jobs < 1:
        raise ValueError(f"--jobs={options.jobs}: give 1 or more runs at a time")
    return 1 if run_locally(runs, extra, total, options.jobs) else 0
