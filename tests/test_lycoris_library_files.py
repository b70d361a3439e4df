"""Files written by the LyCORIS library (lycoris-lora 4.1.3) load into ours and reproduce its outputs.

The fixtures in tests/fixtures/lycoris_lib/ were written by the library itself (see the README there): for
each algorithm, its adapter file (prefix ``lycoris``) and, beside it, the base weights, inputs and the
library's adapted outputs of every layer.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as read_tensors
from torch import nn

import lycoris

FIXTURES = Path(__file__).parent / "fixtures" / "lycoris_lib"
LAYERS = ("to_q", "conv", "proj", "seq")


class Block(nn.Module):
    """The module the fixtures were made on: Linear, 3x3 stride-2 Conv2d, 1x1 Conv2d, Conv1d."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 32)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(16, 32, 1)
        self.seq = nn.Conv1d(16, 32, 3, padding=1)


CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.expected.safetensors"))


def test_fixtures_are_present():
    assert len(CASES) == 13


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_library_file_reproduces_library_outputs(case):
    expected = read_tensors(FIXTURES / f"{case}.expected.safetensors")
    root = nn.Module()
    root.block = Block()
    root.block.load_state_dict({k[len("base."):]: v for k, v in expected.items() if k.startswith("base.")})
    nets = lycoris.load_file(FIXTURES / f"{case}.safetensors", {"lycoris": root})
    assert len(nets["lycoris"].adapters()) == 4
    for layer in LAYERS:
        y = getattr(root.block, layer)(expected[f"x.{layer}"])
        torch.testing.assert_close(y, expected[f"y.{layer}"], atol=1e-5, rtol=1e-5, msg=f"{case}/{layer}")


# -- the other direction: lycoflow's files in the LyCORIS library ------------------------------------
# tests/fixtures/lycoflow_in_library/ (see the README there): make_files.py wrote lycoflow's files (prefix
# ``lycoris``) for every variant; run_library.py, with the library (lycoris-lora 4.1.3) imported instead of
# ours, loaded each with ``create_lycoris_from_weights(1.0, file, root)``, applied it and stored its outputs
# (``<case>.library.safetensors``), or recorded what it raised (``library_report.json``, which also holds how
# the library's own file for the same settings differs from ours and whether the library reloads that).
OURS = Path(__file__).parent / "fixtures" / "lycoflow_in_library"
REPORT = json.loads((OURS / "library_report.json").read_text())
OUR_CASES = sorted(
    p.name[: -len(".safetensors")] for p in OURS.glob("*.safetensors")
    if p.name != "base.safetensors" and not p.name.endswith(".library.safetensors")
)
LOADED = sorted(p.name[: -len(".library.safetensors")] for p in OURS.glob("*.library.safetensors"))

DORA_ON_INPUT_FAILURE = (
    "doesn't match the broadcast shape",
    "the library's make_module_from_state_dict builds DoRA with per-output-row magnitudes (wd_on_out=True, "
    "dora_scale (out, 1, ...)) whatever the file holds, so copying a per-input-column (1, in, ...) dora_scale "
    "fails; its own wd_on_output=False files fail the same way. dora_on_output=True files load.",
)
#: case → (what the library's error says, why). Each is a limitation of the library's loader, not of the file:
#: the library's own file for the same settings has the same keys and shapes and fails the same way.
LIBRARY_FAILURES = {
    "dora_lora": DORA_ON_INPUT_FAILURE,
    "dora_lokr": DORA_ON_INPUT_FAILURE,
    "dora_loha": DORA_ON_INPUT_FAILURE,
    "ia3": (
        "IA3Module.make_module_from_state_dict() takes 4 positional arguments but 5 were given",
        "IA3Module.weight_list is ['weight', 'on_input'] but its make_module_from_state_dict takes only weight: "
        "create_lycoris_from_weights loads no (IA)^3 file, the library's own included",
    ),
    "ia3_on_input": (
        "IA3Module.make_module_from_state_dict() takes 4 positional arguments but 5 were given",
        "as ia3; besides, that loader ignores on_input and would build output-side scales",
    ),
    "lokr_tucker": (
        "'LokrModule' object has no attribute 'lokr_w2_a'",
        "LokrModule.make_module_from_state_dict takes the rank from lokr_w2_a.size(1), which in the Tucker layout "
        "(lokr_w2_a of shape (rank, out_k)) is out_k; it then builds a full w2 and cannot copy lokr_w2_a. The "
        "library's own use_tucker files fail the same way.",
    ),
}


def _block_with_base() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    base = read_tensors(OURS / "base.safetensors")
    root = nn.Module()
    root.block = Block()
    root.block.load_state_dict({k[len("base."):]: v for k, v in base.items() if k.startswith("base.")})
    return root, base


def test_lycoflow_files_for_the_library_are_present_and_accounted_for():
    assert len(OUR_CASES) == 26
    assert REPORT["lycoris-lora"] == "4.1.3"
    assert not set(LOADED) & set(REPORT["errors"])
    assert set(LOADED) | set(REPORT["errors"]) == set(OUR_CASES)  # every file was loaded or failed
    assert set(REPORT["errors"]) == set(LIBRARY_FAILURES)


# Constrained OFT/BOFT among them: the library caps ||Q|| at constraint * out_dim and we at alpha, but lycoflow writes
# the blocks as its cap leaves them (lycoris.Adapter.file_tensors), on which neither cap acts.
@pytest.mark.parametrize("case", LOADED)
@torch.no_grad()
def test_library_reproduces_lycoflow_outputs(case):
    """The library loads lycoflow's file (one module per layer, every key used) and computes lycoflow's outputs."""
    with safe_open(OURS / f"{case}.library.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["library"])
    assert meta["lycoris-lora"] == "4.1.3"
    assert len(meta["modules"]) == 4
    assert meta["unused_keys"] == []
    library = read_tensors(OURS / f"{case}.library.safetensors")
    root, base = _block_with_base()
    nets = lycoris.load_file(OURS / f"{case}.safetensors", {"lycoris": root})
    assert len(nets["lycoris"].adapters()) == 4
    for layer in LAYERS:
        y = getattr(root.block, layer)(base[f"x.{layer}"])
        torch.testing.assert_close(y, library[f"y.{layer}"], atol=1e-5, rtol=1e-5, msg=f"{case}/{layer}")


@pytest.mark.parametrize("case", sorted(LIBRARY_FAILURES))
def test_library_cannot_load(case):
    """What the library raised on lycoflow's file; the library's own file for the same settings (where it has
    them) has the same layout and fails with the same error, so the file is not at fault."""
    message, _reason = LIBRARY_FAILURES[case]
    assert message in REPORT["errors"][case]
    if REPORT["layout_differences"][case] is not None:
        assert REPORT["layout_differences"][case] == []
        assert REPORT["own_file_errors"][case] == REPORT["errors"][case]
    root, _ = _block_with_base()
    assert len(lycoris.load_file(OURS / f"{case}.safetensors", {"lycoris": root})["lycoris"].adapters()) == 4


@pytest.mark.parametrize("case", sorted(c for c, d in REPORT["layout_differences"].items() if d is not None))
def test_lycoflow_files_have_the_library_layout(case):
    """The library's own file for the same settings has the same keys, shapes and alpha/on_input values."""
    assert REPORT["layout_differences"][case] == []
