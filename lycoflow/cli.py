"""The ``lycoflow`` command.

``lycoflow fit RECIPE [RECIPE ...] [--key=value ...]`` trains from YAML recipes through LightningCLI: recipes
are merged in order, then dotted overrides apply (``--model.adapter.init_args.factor=4``); omegaconf
interpolation works within a recipe. Mistakes in a recipe or the base model are reported in one message that
names the key or path, with no traceback (``LYCOFLOW_DEBUG=1`` shows it).

This module is only the dispatcher: each command imports what it needs (Lightning, diffusers, ...) when it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

#: Lightning subcommands lycoflow offers, with what each runs.
LIGHTNING_COMMANDS = {
    "fit": "train an adapter from recipes (writes adapters, checkpoints, a W&B run)",
    "validate": "compute the validation loss of a recipe's model (with --ckpt_path to a checkpoint)",
}

#: lycoflow's own commands (not Lightning's), with what each runs.
OWN_COMMANDS = {
    "evaluate": "generate the prompt suites with an adapter file and measure them (metrics.csv, images, W&B)",
    "sweep": "run a grid of configurations × seeds (or emit it for SLURM / a W&B sweep)",
    "analyze": "rank checkpoints across runs: scores.csv, ranking tables, scatter plots, SHAP, an HTML report",
    "generate": "images from a base model with adapter files at chosen weights",
    "merge": "bake adapter files into a base model: a diffusers folder or a single checkpoint file",
    "extract": "SVD-extract a LoRA/LoCon file from a fine-tuned model against its base",
    "pretrain": "train the toy world's base model and evaluation encoders from scratch (what ships with lycoflow)",
}

USAGE = """usage: lycoflow COMMAND [RECIPE ...] [--key=value ...]

Fine-tune Stable Diffusion with LyCORIS adapters on PyTorch Lightning.

commands:
{commands}

examples:
  lycoflow fit recipes/quickstart.yaml                  # the pretrained toy world: CPU, offline, ~3 min
  lycoflow fit recipes/loha.yaml recipes/toy-world.yaml # any algorithm on the toy world
  lycoflow fit recipes/lokr.yaml --data.init_args.root=/data/my_concepts
  lycoflow fit recipes/lokr.yaml --ckpt_path last       # resume an interrupted run
  lycoflow fit recipes/lora.yaml --print_config         # the resolved recipe, with every default
  lycoflow fit --help                                   # every option
  lycoflow evaluate --adapter runs/lokr/adapters/epoch=10.safetensors   # its recipe is inside the file
  lycoflow sweep recipes/sweeps/paper.yaml --list                       # the paper's 78 runs
  lycoflow analyze runs/paper --out reports/paper                       # then open reports/paper/report.html
  lycoflow pretrain --out runs/pretrain                                 # retrain the toy world (~55 min, CPU)
  lycoflow COMMAND --help                                               # a command's options
"""

EVALUATE_USAGE = """usage: lycoflow evaluate --adapter FILE [RECIPE ...] [--out DIR] [--multiplier M] [--device D]
                         [--key=value ...]

Generate the evaluation prompt suites with an adapter file applied to the recipe's base model (any algorithm the
file holds) and measure them, as the Evaluation callback does at saved epochs: images, metrics.csv and a W&B run
in --out. Without RECIPE the recipe stored in the file is used; the recipe's callbacks.Evaluation settings apply
(the paper's defaults if it has none); --key=value overrides work as for fit, e.g.
--data.init_args.root=/data/concepts.

options:
  --adapter FILE   the .safetensors adapter file (LyCORIS/kohya keys; ours or another trainer's)
  --out DIR        where images, metrics.csv and the W&B run go (default: the file's run folder, or beside it)
  --multiplier M   adapter strength (default 1)
  --device D       cuda when available, else cpu
"""


#: jsonargparse's explanation of why an optional value is not None: noise when the real error is beside it.
_NOISE = re.compile(r"^\s*(- Expected a <class 'NoneType'>|Subtypes: .*|Errors:|Given value type: .*|"
                    r"Does not validate against any of the Union subtypes)\s*$")


def _condense(message: str) -> str:
    return "\n".join(line for line in message.splitlines() if not _NOISE.match(line))


# Where lycoflow's own code lives (lycoris/, callbacks/ and lycoflow/ sit side by side, installed or not).
_OURS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("lycoris", "callbacks", "lycoflow"))


#: Errors raised for the user: lycoflow's own about base models, a full disk, metric encoders; Lightning's
#: configuration check.
_USER_ERROR_CLASSES = (("lycoflow.models", "BaseModelError"), ("lycoflow.cache", "DiskFullError"),
                       ("lycoflow.metrics.encoders", "EncoderError"),
                       ("lightning.fabric.utilities.exceptions", "MisconfigurationException"))


def _user_error(err: BaseException) -> bool:
    """Whether ``err`` is a message written for the user — a configuration or input error raised by lycoflow's own
    code (a bad value, a missing file) or by Lightning's configuration check — rather than a failure deep in a
    library, whose traceback helps."""
    # Only an error class whose module is imported can have been raised: importing the others (Lightning, the
    # metric encoders) would cost a light command (sweep, analyze) ~10 s before its one-line message.
    classes = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERROR_CLASSES if module in sys.modules)
    if isinstance(err, classes):
        return True
    # ImportError: an optional extra that is not installed, named with its pip command where lycoflow raises it.
    if not isinstance(err, (FileNotFoundError, NotADirectoryError, ValueError, ImportError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OURS)


def _user_cause(err: BaseException) -> BaseException | None:
    """``err`` if it is a user error (`_user_error`), else the first user error it was raised from or while
    handling: jsonargparse wraps a constructor's ValueError ("batch_size must be >= 1") in its own ("Does not
    validate against any of the Union subtypes"), which names neither the value nor the fix."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _user_error(err):
            return err
        err = err.__cause__ or err.__context__
    return None


# The class a wrapping jsonargparse error was building, from the value it quotes.
_CLASS_PATH = re.compile(r"class_path='([\w.]+)'")


def _message(err: BaseException, cause: BaseException) -> str:
    if cause is err:
        return str(err)
    built = _CLASS_PATH.search(str(err))
    return f"{cause}" + (f" (building {built.group(1)})" if built else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = "\n".join(f"  {name:<10} {text}" for name, text in {**LIGHTNING_COMMANDS, **OWN_COMMANDS}.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(commands=commands))
        return 0 if argv else 2
    if argv[0] not in LIGHTNING_COMMANDS and argv[0] not in OWN_COMMANDS:
        print(f"lycoflow: unknown command {argv[0]!r}; choose one of: "
              f"{', '.join([*LIGHTNING_COMMANDS, *OWN_COMMANDS])}", file=sys.stderr)
        return 2
    if argv[0] == "evaluate" and any(a in ("-h", "--help") for a in argv[1:]):
        print(EVALUATE_USAGE)
        return 0
    try:
        if argv[0] == "evaluate":
            from .lightning_cli import evaluate

            print(f"lycoflow evaluate: wrote {evaluate(argv[1:])}")
        elif argv[0] == "sweep":
            from .sweep import main as sweep

            return sweep(argv[1:])
        elif argv[0] == "pretrain":
            from .pretrain import main as pretrain

            return pretrain(argv[1:])
        elif argv[0] == "analyze":
            from .analysis import main as analyze

            return analyze(argv[1:])
        elif argv[0] in ("generate", "merge", "extract"):
            from importlib import import_module

            # One module per tool (lycoflow.tools.generate, ...), each with its main(argv).
            return import_module(f"{__package__}.tools.{argv[0]}").main(argv[1:])
        else:
            from .lightning_cli import run_lightning

            run_lightning(argv)
    except argparse.ArgumentError as err:
        print(f"lycoflow {argv[0]}: error: {_condense(str(err))}\n(`lycoflow {argv[0]} --help` lists every option)",
              file=sys.stderr)
        return 2
    except Exception as err:
        cause = _user_cause(err)
        if os.environ.get("LYCOFLOW_DEBUG") or cause is None:
            raise
        print(f"lycoflow {argv[0]}: error: {_message(err, cause)}\n(set LYCOFLOW_DEBUG=1 to see the traceback)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
