"""What the adapter tools share: their command lines, the adapter-file and algorithm options, the base model.

A command's options are its typed function's parameters (`add_parameters`): ``--name-with-dashes``, typed by
the annotation, required when the parameter has no default, helped by the docstring's ``Args:`` entry. An option
left out is left out of the call too, so a default is the function's and written there only. jsonargparse,
which reads signatures the same way, cannot take what users type today (``--images-per-prompt``, a repeated
``--adapter``, argparse's messages), hence argparse; `SPELLINGS` holds the exceptions to the derived form.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import docstring_parser
import torch

import lycoris

from ..models import Components, Pretrained

#: (adapter file, weight) pairs, as ``--adapter FILE[:WEIGHT]`` gives them.
Adapters = Sequence[tuple[str | os.PathLike, float]]


class Parser(argparse.ArgumentParser):
    """An argument parser that raises on a bad command line instead of exiting, so that the lycoflow command
    reports it in one line (and a caller in Python can catch it)."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def _text(doc: str | None) -> str:
    """Docstring prose as one line of help: rST quotes dropped."""
    return re.sub(r"`+", "", " ".join((doc or "").split()))


def command_parser(name: str, command: Callable[..., object], examples: str) -> Parser:
    """The parser of ``lycoflow <name>``, described by ``command``'s docstring summary, with the examples."""
    summary = docstring_parser.parse(inspect.getdoc(command) or "").short_description
    return Parser(prog=f"lycoflow {name}", description=_text(summary), epilog=f"examples:\n{examples}",
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def refuse_existing(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """A command writes over a file it did not create only when told to: before any model is loaded."""
    if not overwrite and Path(path).exists():
        raise ValueError(f"{flag} {path} already exists: pass --overwrite to replace it, or name another path")


def parse_adapter(spec: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` → (file, weight). The text after the last colon is a weight only if it is a number, so
    paths with colons (``C:\\loras\\a.safetensors``) still work."""
    path, colon, weight = spec.rpartition(":")
    if colon and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


#: Parameters whose command-line form is not the derived ``--name VALUE``: argparse's keywords, ``flags`` for
#: the option strings. Adapter files and algorithms are named one per option, repeated.
SPELLINGS: dict[str, dict[str, Any]] = {
    "adapters": {"flags": ("--adapter",), "action": "append", "type": parse_adapter, "metavar": "FILE[:WEIGHT]"},
    "algorithms": {"flags": ("--algorithm",), "action": "append", "type": str, "metavar": "MODULE.CLASS"},
}
#: Metavars by value type; others are the option's name.
_METAVARS = {int: "N", float: "X"}


def _value_type(hint: Any) -> dict[str, Any]:
    """argparse's ``type`` (or ``choices``) for an annotation: a Literal's values (read as their type: ``--n 150``
    for ``Literal[75, 150]``), a flag for a bool, else its one non-None type (``str`` for a path: functions take
    either)."""
    if hint is bool:
        return {"action": "store_true"}
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] if union else [hint]
    if typing.get_origin(kinds[0]) is Literal:
        values = typing.get_args(kinds[0])
        return {"choices": list(values), "type": type(values[0])}
    kind = str if str in kinds else kinds[0]
    if kind not in (str, int, float):
        raise TypeError(f"{hint} has no command-line form: give the parameter a spelling")
    return {"type": kind, "metavar": _METAVARS.get(kind)}


def _shown(default: object) -> str:
    return default.__name__ if isinstance(default, type) else repr(default) if default == "" else str(default)


def add_parameters(parser: argparse.ArgumentParser, command: Callable[..., object], skip: Collection[str] = (),
                   spellings: Mapping[str, Mapping[str, Any]] = SPELLINGS) -> list[str]:
    """One option per parameter of ``command`` (a function, or a class for its constructor) but ``skip``; returns
    the parameters' names. Options not given are absent from the parsed namespace (the default stays the
    function's, shown in the help)."""
    docs = {p.arg_name: p.description for p in docstring_parser.parse(inspect.getdoc(command) or "").params}
    hints = typing.get_type_hints(command.__init__ if isinstance(command, type) else command)
    names = []
    for name, param in inspect.signature(command).parameters.items():
        if name in skip:
            continue
        spelling = dict(spellings.get(name, {}))
        flags = spelling.pop("flags", (f"--{name.replace('_', '-')}",))
        derived = {} if "type" in spelling or "choices" in spelling else _value_type(hints[name])
        shown = param.default is not False and param.default not in (param.empty, None, (), [])  # a flag: off
        help_text = _text(docs.get(name)) + (f" (default: {_shown(param.default)})" if shown else "")
        options = {"dest": name, "default": argparse.SUPPRESS, "required": param.default is param.empty,
                   "help": help_text, **derived, **spelling}
        parser.add_argument(*flags, **options)
        names.append(name)
    return names


def help_requested(parser: argparse.ArgumentParser, argv: Sequence[str]) -> bool:
    """Print the help when asked; checked before parsing, so that it works without the required options."""
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        return True
    return False


def checked_adapters(adapters: Adapters, required: bool) -> list[tuple[Path, float]]:
    """Fail before loading a multi-GB model: every file exists and every weight is a finite number."""
    checked = [(Path(path), float(weight)) for path, weight in adapters]
    if required and not checked:
        raise ValueError("name at least one adapter file: --adapter FILE[:WEIGHT]")
    for path, weight in checked:
        if not path.is_file():
            raise FileNotFoundError(f"adapter file not found: {path} (--adapter FILE[:WEIGHT], e.g. "
                                    f"--adapter {path.name}:0.8)")
        if not math.isfinite(weight):
            raise ValueError(f"--adapter {path}: weight {weight} is not a finite number")
    return checked


def import_object(path: str, default_module: str = "") -> object:
    """``package.module.Name`` (a bare ``Name``: from ``default_module``) → the object; ValueError saying why not."""
    module, _, attribute = path.rpartition(".")
    module = module or default_module
    if not module:
        raise ValueError("not an import path (module.Name)")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as err:
        raise ValueError(f"cannot import {module} ({err})") from None
    except AttributeError:
        raise ValueError(f"{module} has no {attribute!r}") from None


def reading_algorithms(extra: Sequence[str | lycoris.Algorithm]) -> tuple[type[lycoris.Adapter], ...]:
    """The adapter classes that read adapter files: those of ``extra`` (a user's `lycoris.Strategy` or
    `lycoris.Adapter`, or its import path ``module.Class``) first, then lycoris' own."""
    classes = []
    for algorithm in extra:
        try:
            found = import_object(algorithm) if isinstance(algorithm, str) else algorithm
        except ValueError as err:
            raise ValueError(f"--algorithm {algorithm}: {err}: name a lycoris.Strategy or lycoris.Adapter class as "
                             "module.Class, with its module on PYTHONPATH") from None
        try:
            classes += lycoris.adapter_classes([found])
        except TypeError as err:
            raise ValueError(f"--algorithm {algorithm}: {err}") from None
    return (*classes, *lycoris.ALGORITHMS)


def load_base(path: str, config: str | None) -> Components:
    return Pretrained(path, config=config).load()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
