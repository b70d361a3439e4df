"""The Lightning side of the ``lycoflow`` command: recipes → `LycoflowCLI` (LightningCLI) → model, data, Trainer.

Kept apart from :mod:`lycoflow.cli` (the dispatcher), which imports this only for the commands that need it, so
``lycoflow --help`` and ``lycoflow sweep --list`` answer without importing Lightning, diffusers and transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import lycoris

from .cache import atomic_path
from .loggers import WandbLogger

#: --ckpt_path values that Lightning resolves itself instead of reading a file by that name.
_CHECKPOINT_WORDS = ("last", "best", "hpc", "registry")

#: The commands LycoflowCLI runs (the dispatcher's table of them is in lycoflow.cli).
SUBCOMMANDS = ("fit", "validate")


class RecipeSaver(SaveConfigCallback):
    """Hands the resolved recipe to the module (every adapter file carries it), logs it to W&B, and, for fit,
    writes it to ``<run folder>/config.yaml``: atomically, and only once a resumed checkpoint has been accepted,
    so that a resume with the wrong recipe leaves the run's config.yaml as it was. (Built with
    ``save_to_log_dir=False``: Lightning would write it at setup, in place.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pl_module.recipe = self.parser.dump(self.config, skip_none=False)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Only fit writes it: `lycoflow validate` of a run's checkpoint must not replace the recipe that trained it.
        path = Path(trainer.default_root_dir) / self.config_filename
        if not trainer.is_global_zero or self._written:
            return
        with atomic_path(path) as tmp:
            tmp.write_text(pl_module.recipe, encoding="utf-8")
        self._written = True


def _integer_seed(seed: int | bool) -> int:
    # Lightning also takes true/false (a random seed / none); lycoflow needs the number itself, for the noise,
    # the data order and the record in config.yaml.
    if isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed_everything must be an integer >= 0 (got {seed}): lycoflow seeds the noise and "
                         "the data order with it; pick any number, e.g. --seed_everything=1")
    return seed


class LycoflowCLI(LightningCLI):
    """LightningCLI with `DiffusionFinetune`, any `LightningDataModule` by class_path, and lycoflow's defaults:
    W&B logging (offline without credentials) into the run folder, seed 0."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        # One seed for everything: Lightning's global seed, the noise/timestep draws and the data order.
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_integer_seed)
        parser.link_arguments("seed_everything", "data.init_args.seed", compute_fn=_integer_seed)

    def _bind_run_folder(self) -> None:
        """Loggers the recipe left without a folder or name write to the run folder and take its name."""
        run = Path(self.trainer.default_root_dir)
        if run.exists() and not run.is_dir():  # else the first write into it fails deep in a library
            raise ValueError(f"trainer.default_root_dir {run} is a file, not a folder: name a folder for the run "
                             "(--trainer.default_root_dir=runs/NAME)")
        config = self.config[self.subcommand] if self.subcommand else self.config  # None: built without running
        logger_config = config["trainer"].get("logger")
        init_args = getattr(logger_config, "init_args", None) or {}
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.bind_run_folder(run, save_dir=not init_args.get("save_dir"), name=not init_args.get("name"))

    @staticmethod
    def _check_checkpoint(path: str | None) -> None:
        """A --ckpt_path file that is not a whole Lightning checkpoint is named before anything runs (torch.load
        would fail deep inside Lightning with an unpickling message)."""
        if path is None or path in _CHECKPOINT_WORDS or not Path(path).is_file():
            return  # Lightning resolves the words, and names a missing file itself
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{" and Path(path).suffix == ".safetensors":
            raise ValueError(f"--ckpt_path {path} is an adapter file, not a training checkpoint: resume from the "
                             "run's checkpoints/last.ckpt (--ckpt_path last); an adapter file is applied with "
                             "`lycoflow generate`/`evaluate`/`merge`")
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"--ckpt_path {path} is not a whole training checkpoint (truncated or not a "
                             f"checkpoint: {err}); resume from an intact one, e.g. the run's "
                             "checkpoints/last.ckpt") from None
        if damaged is not None:
            raise ValueError(f"--ckpt_path {path} is damaged (entry {damaged} fails its checksum); resume from "
                             "an intact checkpoint")

    def _parse_ckpt_path(self) -> None:
        # Lightning's CLI reads the checkpoint here, right after parsing, for the hyperparameters it holds.
        if self.config.get("subcommand"):
            self._check_checkpoint(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._bind_run_folder()

    def before_validate(self) -> None:
        self._bind_run_folder()


def _check_interpolations(recipe: str, sections: dict) -> None:
    """Resolve the recipe's ${...} interpolations as jsonargparse's omegaconf mode will (each file on its own),
    so that one to a missing key is named with its file and key rather than as omegaconf's traceback."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(OmegaConf.create(sections), resolve=True)
    except OmegaConfBaseException as err:
        where = f" at {err.full_key}" if getattr(err, "full_key", None) else ""
        raise ValueError(f"recipe {recipe}{where}: {str(err).splitlines()[0]}") from None


def run_lightning(argv: list[str], run: bool = True) -> LycoflowCLI:
    """``argv`` = [command, recipe..., --overrides...]; with ``run=False`` only parse and instantiate."""
    from .module import DiffusionFinetune

    command, rest = argv[0], argv[1:]
    recipes: list[str] = []
    while rest and not rest[0].startswith("-"):  # leading positionals are recipes, merged in order
        recipes.append(rest.pop(0))
    for recipe in recipes:
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"recipe not found: {recipe}")
        try:  # jsonargparse would report a YAML error without the file's name
            sections = yaml.safe_load(Path(recipe).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"recipe {recipe} is not valid YAML: {err}") from None
        if not isinstance(sections, dict):  # jsonargparse says only "Unexpected config"
            raise ValueError(f"recipe {recipe} is {'empty' if sections is None else 'not a mapping'}: a recipe "
                             "holds sections such as model:, data:, trainer: (see recipes/lora.yaml)")
        _check_interpolations(recipe, sections)
    args = [command, *(a for r in recipes for a in ("--config", r)), *rest]
    # We pass the rewritten command line as `args` on purpose (positional recipes become --config).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return LycoflowCLI(
        DiffusionFinetune,
        subclass_mode_data=True,
        args=args if run else args[1:],
        run=run,
        seed_everything_default=0,
        save_config_callback=RecipeSaver,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        trainer_defaults={"logger": {"class_path": "lycoflow.loggers.WandbLogger"}},
        auto_configure_optimizers=False,
        # Parse errors are raised, not printed with the full usage, so `main` can report them in a few lines.
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False,
                       **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
    )


#: The top-level recipe sections that describe what to build (the rest are options of `fit` itself).
_PARTS = ("seed_everything", "model", "data", "trainer")


def evaluate(argv: list[str]) -> Path:
    """``lycoflow evaluate``: returns the folder written to."""
    import torch
    from safetensors import safe_open

    from .evaluation import Evaluator

    parser = argparse.ArgumentParser(prog="lycoflow evaluate", add_help=False, exit_on_error=False)
    parser.add_argument("--adapter")
    parser.add_argument("--out")
    parser.add_argument("--multiplier", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options, rest = parser.parse_known_args(argv)
    if not options.adapter:
        raise ValueError("name the adapter file: lycoflow evaluate --adapter FILE (`lycoflow evaluate --help`)")
    adapter = Path(options.adapter)
    if not adapter.is_file():
        raise FileNotFoundError(f"adapter file not found: {adapter}")
    try:
        with safe_open(str(adapter), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{adapter} is not a readable .safetensors file ({err})") from None
    # By default the file's run folder (its epoch's rows and images are this evaluation's), unless another
    # multiplier makes it a different evaluation, which then gets a folder of its own beside the file.
    in_run = adapter.parent.name == "adapters" and options.multiplier == 1.0
    out = Path(options.out) if options.out else (
        adapter.parent.parent if in_run else adapter.parent / f"eval-{adapter.stem}-x{options.multiplier:g}")
    recipes = [a for a in rest if not a.startswith("-")]
    overrides = [a for a in rest if a.startswith("-")]
    if not recipes and "lycoflow_recipe" not in metadata:
        raise ValueError(f"{adapter} holds no recipe (it was not written by lycoflow): name one, e.g. "
                         f"lycoflow evaluate --adapter {adapter} recipes/lokr.yaml")
    texts = [Path(r).read_text(encoding="utf-8") for r in recipes] if recipes else [metadata["lycoflow_recipe"]]
    with tempfile.TemporaryDirectory(prefix="lycoflow-evaluate-") as tmp:
        files = []
        for i, text in enumerate(texts):
            # A fit's resolved recipe (config.yaml, the file's metadata) also holds fit's own options (ckpt_path,
            # weights_only, ...), which building the parts does not take.
            config = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k in _PARTS}
            files.append(Path(tmp) / f"recipe{i}.yaml")
            files[-1].write_text(yaml.safe_dump(config), encoding="utf-8")
        cli = run_lightning(["fit", *map(str, files), *overrides, f"--trainer.default_root_dir={out}"], run=False)
    cli._bind_run_folder()  # W&B into --out, named after it (what before_fit does for fit)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    # The recipe's evaluation settings: those of its evaluation callback (the one holding an Evaluator), else the
    # paper's.
    found = [c.evaluator for c in trainer.callbacks if isinstance(getattr(c, "evaluator", None), Evaluator)]
    evaluator = found[0] if found else Evaluator()
    for network in model.networks.values():  # the file brings its own adapters, whatever algorithm they are
        network.remove()
    # The recipe's algorithm may be a user's: its adapter class reads the file, tried before the built-in ones
    # (which could claim its keys too); a user's strategy that names no adapter class has the built-in ones only.
    own = getattr(model.adapter, "adapter_class", None)
    algorithms = (own, *lycoris.ALGORITHMS) if own else lycoris.ALGORITHMS
    networks = lycoris.load_file(adapter, model.components.adaptable(), multiplier=options.multiplier,
                                 algorithms=algorithms)
    model.to(options.device).eval()
    for network in networks.values():
        network.to(options.device)
    data.prepare_data()
    data.setup("fit")
    recipe = metadata.get("lycoflow_recipe") or texts[0]
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        result = evaluator.evaluate(
            model.components, list(networks.values()), data, out,
            epoch=int(metadata.get("ss_epoch", 0)), step=int(metadata.get("ss_steps", 0)),
            run=out.resolve().name,  # as the Evaluation callback names a run: by its folder
            config=evaluator.config_of(recipe), seed=int(metadata.get("ss_seed", 0)))
    result.log(trainer.loggers)
    for logger in trainer.loggers:
        logger.finalize("success")
    return out
