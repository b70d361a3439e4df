"""The layout holds: every package imports only from the packages below it, the dispatcher stays light, and every
class path that recipes, old runs' config.yaml files and the README name still resolves."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse._util import import_object

import lycoflow

ROOT = Path(__file__).parent.parent

#: Bottom to top: a unit may import itself and the units of lower rank, nothing above.
RANKS = {
    "lycoris": 0,
    "lycoflow": 1, "lycoflow.cache": 1, "lycoflow.optim": 1,
    "lycoflow.models": 2,
    "lycoflow.tiny": 3,
    "lycoflow.data": 4,
    "lycoflow.toy": 5,
    "lycoflow.metrics": 6,
    "lycoflow.evaluation": 7,
    "lycoflow.module": 8, "lycoflow.loggers": 8,
    "lycoflow.tools": 9, "lycoflow.analysis": 9, "lycoflow.sweep": 9, "lycoflow.pretrain": 9,
    "lycoflow.lightning_cli": 10,
    "lycoflow.cli": 11,
    "callbacks": 12,
}


def unit_of(module: str) -> str | None:
    """The layout unit a module belongs to (the longest prefix in RANKS), None for third-party modules."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANKS and (prefix != "lycoflow" or n == len(parts)):  # the root: its __init__ only
            return prefix
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((node.lineno, base))
            # `from . import x` / `from .pkg import sub` may name submodules
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if unit_of(f"{base}.{alias.name}")
                    and unit_of(f"{base}.{alias.name}") != unit_of(base)]
    return out


SOURCES = sorted(p for d in ("lycoris", "lycoflow", "callbacks") for p in (ROOT / d).rglob("*.py"))


def test_every_module_belongs_to_a_unit_of_the_layout():
    assert [module_name(p) for p in SOURCES if unit_of(module_name(p)) is None] == []


def unit_rank(path: Path) -> tuple[str, int]:
    unit = unit_of(module_name(path))
    assert unit is not None, f"{path} belongs to no unit of the layout"
    return unit, RANKS[unit]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_only_downwards(path):
    mine, rank = unit_rank(path)
    upward = [f"line {line}: {module} ({unit_of(module)})" for line, module in imported_modules(path)
              if unit_of(module) and unit_of(module) != mine and RANKS[unit_of(module)] >= rank]
    assert upward == [], f"{mine} (rank {rank}) imports from its level or above"


def test_no_module_of_the_project_imports_a_moved_name():
    # The old names are for users' recipes and old runs; the code itself names where things live now.
    stale = [f"{p.relative_to(ROOT)}:{line} {m}" for p in [*SOURCES, *sorted((ROOT / "tests").glob("*.py")),
                                                           *sorted((ROOT / "benchmarks").glob("*.py"))]
             for line, m in imported_modules(p) if any(m == old or m.startswith(old + ".") for old in lycoflow.MOVED)]
    assert stale == []


#: Class paths that recipes, the README and config.yaml files of runs written before the layout change name.
CLASS_PATHS = [
    "lycoflow.data.HierarchicalDataModule", "lycoflow.synthetic.SyntheticConcepts", "lycoflow.models.Pretrained",
    "lycoflow.tiny.TinySD", "lycoflow.loggers.WandbLogger", "lycoflow.generation.Sampler",
    "lycoflow.metrics.encoders.DINOv2", "lycoflow.metrics.encoders.CLIP", "lycoflow.metrics.encoders.VGG19",
    "lycoflow.metrics.encoders.TinyDINOv2", "lycoflow.metrics.encoders.TinyCLIP", "lycoflow.metrics.encoders.TinyVGG19",
    "callbacks.AdapterExport", "callbacks.RunCheckpoint", "callbacks.Evaluation",
    "lycoris.LoRA", "lycoris.LoHa", "lycoris.LoKr", "lycoris.DyLoRA", "lycoris.GLoRA", "lycoris.IA3", "lycoris.OFT",
    "lycoris.BOFT", "lycoris.Full",
]


@pytest.mark.parametrize("class_path", CLASS_PATHS)
def test_old_class_paths_resolve_to_the_classes_now_in_the_packages(class_path):
    cls = import_object(class_path)
    assert isinstance(cls, type) and cls.__name__ == class_path.rsplit(".", 1)[1]
    module = class_path.rsplit(".", 1)[0]
    if module in lycoflow.MOVED:  # the very same class as under its new name, not a copy
        assert import_object(f"{lycoflow.MOVED[module]}.{cls.__name__}") is cls


def test_moved_module_names_are_the_new_modules():
    import importlib

    for old, new in lycoflow.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "no-such-sweep.yaml", "--list"]], ids=["help", "sweep-error"])
def test_help_and_a_light_commands_error_import_none_of_the_heavy_stack(argv):
    # A mistyped sweep file is said at once: deciding that an error is the user's imports nothing heavy.
    code = ("import sys, contextlib, io\nfrom lycoflow.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:\n"
            f"    code = main({argv!r})\n"
            "heavy = [m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            f"assert code == {0 if argv == ['--help'] else 2}, (code, err.getvalue())\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
