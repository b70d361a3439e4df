"""Files written by the LyCORIS library (lycoris-lora 4.1.3) load into ours and reproduce its outputs.

The fixtures in tests/fixtures/lycoris_lib/ were written by the library itself (see the README there): for
each algorithm, its adapter file (prefix ``lycoris``) and, beside it, the base weights, inputs and the
library's adapted outputs of every layer.
"""

from pathlib import Path

import pytest
import torch
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
