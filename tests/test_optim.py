"""`lycoflow.optim.AdamW8bit`: bitsandbytes' 8-bit AdamW where installed; without it torch's AdamW with the same
arguments, said once in the log, and its state saved, restored and resumed exactly, also through Lightning."""

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

import lycoflow.optim
from lycoflow.lightning_cli import run_lightning

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
         "--trainer.callbacks=[{class_path: callbacks.RunCheckpoint}]", "--model.optimizer=lycoflow.optim.AdamW8bit",
         "--model.optimizer.init_args.weight_decay=0.1", "--model.optimizer.init_args.betas=[0.9, 0.99]"]


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """lycoflow.optim as imported where bitsandbytes is not installed (a fresh copy of the module)."""
    for name in {"bitsandbytes", "bitsandbytes.optim", *(m for m in sys.modules if m.startswith("bitsandbytes."))}:
        monkeypatch.setitem(sys.modules, name, None)  # `from bitsandbytes.optim import ...` raises ImportError
    spec = importlib.util.spec_from_file_location("optim_without_bnb", lycoflow.optim.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5000, generator=gen)), torch.nn.Parameter(torch.randn(3, 4, generator=gen))]


def groups(params):
    """Two named groups, the second exempt from weight decay: as `DiffusionFinetune.configure_optimizers` gives."""
    return [{"name": "unet", "params": params[:1], "lr": 1e-2}, {"name": "unet", "params": params[1:], "lr": 1e-2,
                                                                  "weight_decay": 0.0}]


def steps(optimizer, params, n: int, start: int = 0) -> None:
    for k in range(start, start + n):
        optimizer.zero_grad()
        sum(((p - k) ** 2).sum() for p in params).backward()
        optimizer.step()


def test_without_bitsandbytes_it_is_torch_adamw_with_the_same_arguments_said_once(without_bitsandbytes, caplog):
    assert not without_bitsandbytes.EIGHT_BIT
    ours, theirs = parameters(), parameters()
    with caplog.at_level(logging.WARNING):
        optimizer = without_bitsandbytes.AdamW8bit(groups(ours), weight_decay=0.1, betas=(0.9, 0.99))
        without_bitsandbytes.AdamW8bit(parameters(), weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    said = [r.getMessage() for r in caplog.records if "bitsandbytes is not installed" in r.getMessage()]
    assert said == ["lycoflow.optim.AdamW8bit: bitsandbytes is not installed, so this is torch.optim.AdamW with the "
                    "same arguments (32-bit moments: more memory, the same update up to 8-bit rounding); for the "
                    "8-bit optimizer: pip install 'lycoflow[bnb]'"]
    reference = torch.optim.AdamW(groups(theirs), weight_decay=0.1, betas=(0.9, 0.99))
    steps(optimizer, ours, 3)
    steps(reference, theirs, 3)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_the_fallbacks_state_round_trip_resumes_exactly(without_bitsandbytes, tmp_path):
    straight = parameters()
    optimizer = without_bitsandbytes.AdamW8bit(groups(straight), weight_decay=0.1, betas=(0.9, 0.99))
    steps(optimizer, straight, 2)
    torch.save({"params": [p.detach() for p in straight], "optimizer": optimizer.state_dict()}, tmp_path / "s.pt")
    steps(optimizer, straight, 3, start=2)

    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    again = without_bitsandbytes.AdamW8bit(groups(resumed), weight_decay=0.1, betas=(0.9, 0.99))
    again.load_state_dict(saved["optimizer"])
    steps(again, resumed, 3, start=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert again.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_a_state_of_bitsandbytes_is_refused_in_words_without_it(without_bitsandbytes):
    params = parameters()
    optimizer = without_bitsandbytes.AdamW8bit(groups(params))
    steps(optimizer, params, 1)
    state = optimizer.state_dict()
    # bitsandbytes 0.50's layout: its moments under a key of its own, no exp_avg.
    state["state"] = {i: {"step": torch.tensor(1.0), "__bnb_optimizer_quant_state__": {"state1": torch.zeros(1)}}
                      for i in state["state"]}
    with pytest.raises(ValueError, match=r"written by bitsandbytes' 8-bit AdamW.*pip install 'lycoflow\[bnb\]'"):
        without_bitsandbytes.AdamW8bit(groups(parameters())).load_state_dict(state)


def test_with_bitsandbytes_it_is_its_8bit_adamw():
    bnb = pytest.importorskip("bitsandbytes.optim")
    params = parameters()
    optimizer = lycoflow.optim.AdamW8bit(groups(params), weight_decay=0.1, betas=(0.9, 0.99))
    assert lycoflow.optim.EIGHT_BIT and isinstance(optimizer, bnb.AdamW8bit)


def test_recipes_name_it_and_lightning_checkpoints_resume_it_exactly(tiny, tmp_path):
    quickstart = str(REPO / "recipes" / "tiny.yaml")

    def fit(run, *extra):
        return run_lightning(["fit", quickstart, *tiny, f"--trainer.default_root_dir={tmp_path / run}", *QUICK, *extra])

    straight = fit("straight", "--trainer.max_epochs=2")
    assert type(straight.trainer.optimizers[0]) is lycoflow.optim.AdamW8bit
    assert straight.trainer.optimizers[0].defaults["betas"] == (0.9, 0.99)
    fit("resumed", "--trainer.max_epochs=1")
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = checkpoint["optimizer_states"]
    assert len(state["state"]) == sum(len(g["params"]) for g in state["param_groups"]) > 0
    resumed = fit("resumed", "--trainer.max_epochs=2", "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 2
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


#: Other trainers' optimizers, named by class path in a recipe (optional extras): paged 8-bit AdamW (its 8-bit
#: moments for every tensor of 16 values or more: the tiny model's adapters are small) and Prodigy (its learning
#: rate is a multiplier of the step size it estimates: 1.0).
OTHERS = {
    "paged-adamw-8bit": ("bitsandbytes.optim", ["--model.optimizer=bitsandbytes.optim.PagedAdamW8bit",
                                                "--model.optimizer.init_args.min_8bit_size=16"]),
    "prodigy": ("prodigyopt", ["--model.optimizer=prodigyopt.Prodigy", "--model.lr=1.0",
                               "--model.optimizer.init_args.weight_decay=0.01"]),
}


@pytest.mark.parametrize("name", OTHERS)
def test_other_optimizers_by_class_path_keep_their_state_in_checkpoints_and_resume_exactly(name, tiny, tmp_path):
    module, options = OTHERS[name]
    pytest.importorskip(module)
    quick = [*QUICK[:4], *options, "--model.warmup_steps=2"]

    def fit(run, *extra):
        return run_lightning(["fit", str(REPO / "recipes" / "tiny.yaml"), *tiny,
                              f"--trainer.default_root_dir={tmp_path / run}", *quick, *extra])

    straight = fit("straight", "--trainer.max_epochs=4")
    assert type(straight.trainer.optimizers[0]).__module__.startswith(module)
    fit("resumed", "--trainer.max_epochs=2")
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = checkpoint["optimizer_states"]
    tensors = [t for s in state["state"].values() for t in torch.utils._pytree.tree_leaves(s)
               if isinstance(t, torch.Tensor)]
    if name == "paged-adamw-8bit":  # the 8-bit moments themselves, not 32-bit ones
        assert any(t.dtype == torch.uint8 and t.numel() >= 16 for t in tensors)
    else:  # Prodigy's running sums for its step-size estimate, kept in the groups, and its first iterate
        assert all(group["k"] == 2 and group["d_numerator"] > 0 for group in state["param_groups"])
        assert all("p0" in s for s in state["state"].values())
    resumed = fit("resumed", "--trainer.max_epochs=4", "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert any(not torch.equal(a[key], t) for key, t in checkpoint["state_dict"].items())  # the steps after it moved
    for key in a:
        assert torch.equal(a[key], b[key]), key
