"""Adapter tools: ``lycoflow generate`` (images from a base model with adapter files), ``lycoflow merge`` (bake
adapters into a model file) and ``lycoflow extract`` (an SVD LoRA/LoCon of a fine-tuned model's difference).

One module per command, each a typed function (`generate`, `merge`, `extract`) and its ``main(argv)``, whose
options are that function's parameters (`options.add_parameters`); `options` holds what they share and
`convert` writes a diffusers model as one LDM checkpoint file. The entries raise `argparse.ArgumentError` for a
malformed command line and `ValueError`, `FileNotFoundError` or `BaseModelError` for values the user can fix,
with a message naming the argument or file; `lycoflow.cli.main` prints them as one line.

Adapter files are named ``FILE[:WEIGHT]`` on the command line (weight 1 when omitted) and are read with
`lycoris.load_file`: any algorithm, ours or another trainer's (kohya, the LyCORIS library), and a user's own
given by ``--algorithm module.Class``.
"""

from .extract import Extracted, extract
from .extract import main as main_extract
from .generate import generate, read_prompts, scheduler_class
from .generate import main as main_generate
from .merge import main as main_merge
from .merge import merge
from .options import parse_adapter

__all__ = ["Extracted", "extract", "generate", "main_extract", "main_generate", "main_merge", "merge",
           "parse_adapter", "read_prompts", "scheduler_class"]
