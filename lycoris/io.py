"""LyCORIS safetensors files: write, read (ours, the LyCORIS library's, kohya sd-scripts'), and bake in.

A file maps ``<prefix>_<module path with _>.<suffix>`` to tensors (DESIGN §4). Reading groups keys by
layer, finds the layer in the given models under either spelling of its path, recognises the algorithm
from the suffixes, checks every shape against what that layer needs, and refuses non-finite values.
Loading never unpickles: safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as _load_tensors
from safetensors.torch import save_file as _save_tensors
from torch import Tensor, nn

from .base import Adapter, Network
from .boft import BOFTAdapter
from .full import FullAdapter
from .glora import GLoRAAdapter
from .ia3 import IA3Adapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter
from .oft import OFTAdapter
from .targeting import layers_by_name, lycoris_name

#: Adapter classes `load_file` recognises, tried in order. Pass your own tuple to add an algorithm.
ALGORITHMS: tuple[type[Adapter], ...] = (
    LoRAAdapter, LoHaAdapter, LoKrAdapter, OFTAdapter, BOFTAdapter, GLoRAAdapter, IA3Adapter, FullAdapter,
)


def save_file(
    path: str | os.PathLike,
    networks: Mapping[str, Network],
    metadata: Mapping[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write networks to one safetensors file, atomically (temporary file + rename).

    Args:
        path: destination ``.safetensors`` file; parent folders are created.
        networks: file prefix → network, e.g. ``{"lora_unet": unet_net, "lora_te": te_net}``.
        metadata: stored as safetensors metadata; values that are not strings are JSON-encoded.
        dtype: cast floating tensors (e.g. ``torch.float16``); None keeps the training dtype.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for prefix, net in networks.items():
        for key, value in net.state_dict().items():
            name, suffix = key.split(".", 1)
            key = f"{prefix}{name[len(net.prefix):]}.{suffix}"
            value = value.detach().to("cpu")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[key] = value.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _save_tensors(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}{tuple(layer.weight.shape)}"


def _read(
    path: str | os.PathLike,
    modules: Mapping[str, nn.Module],
    strict: bool,
    algorithms: Iterable[type[Adapter]],
) -> dict[str, dict[str, Adapter]]:
    """prefix → {canonical LyCORIS name → adapter holding the file's values}, not attached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        tensors = _load_tensors(str(path))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: refusing to load: NaN/inf values in {len(bad)} tensor(s), e.g. {bad[:3]}")

    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    tables = {prefix: layers_by_name(module, prefix) for prefix, module in modules.items()}
    algorithms = tuple(algorithms)
    placed: dict[str, dict[str, Adapter]] = {prefix: {} for prefix in modules}
    unplaced: list[str] = []
    for name, group in groups.items():
        prefix = next((p for p, table in tables.items() if name in table), None)
        if prefix is None:
            unplaced.append(name)
            continue
        canonical, layer = tables[prefix][name]
        algorithm = next((cls for cls in algorithms if cls.detects(group)), None)
        if algorithm is None:
            raise ValueError(f"{path}: {name}: no known algorithm has the keys {sorted(group)}")
        try:
            adapter = algorithm.from_state_dict(layer, group)
        except ValueError as err:
            raise ValueError(f"{path}: {name} does not fit the model's {canonical} ({_describe(layer)}): {err}") \
                from None
        _load_checked(adapter, group, f"{path}: {name}", f"{canonical} ({_describe(layer)})")
        placed[prefix][lycoris_name(prefix, canonical)] = adapter
    if unplaced:
        msg = (
            f"{path}: {len(unplaced)} layer(s) in the file match no layer of {sorted(modules)}: "
            f"{sorted(unplaced)[:8]}{' ...' if len(unplaced) > 8 else ''}. Is the file for another model, or is "
            f"a prefix missing from the modules given? Pass strict=False to load the rest."
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return placed


def _load_checked(adapter: Adapter, group: dict[str, Tensor], where: str, layer: str) -> None:
    expected = adapter.state_dict()
    for suffix, value in group.items():
        if suffix not in expected:
            raise ValueError(f"{where}.{suffix}: unexpected for {type(adapter).__name__}")
        if expected[suffix].shape != value.shape:
            raise ValueError(
                f"{where}.{suffix} has shape {tuple(value.shape)} in the file, but the model's layer {layer} "
                f"needs {tuple(expected[suffix].shape)}: the file was made for a different model"
            )
    missing = sorted(set(expected) - set(group) - {"alpha"})  # alpha may be absent: it then equals the rank
    if missing:
        raise ValueError(f"{where}: missing {missing} for {type(adapter).__name__}")
    adapter.load_state_dict(group, strict=False)


def load_file(
    path: str | os.PathLike,
    modules: Mapping[str, nn.Module],
    multiplier: float = 1.0,
    strict: bool = True,
    algorithms: Iterable[type[Adapter]] = ALGORITHMS,
) -> dict[str, Network]:
    """Attach the adapters of a LyCORIS/kohya file to ``modules``; returns prefix → network.

    Args:
        path: the ``.safetensors`` file.
        modules: file prefix → model, e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``.
        multiplier: strength of every loaded adapter (settable later on each network).
        strict: raise on keys that match no layer (otherwise warn and load the rest).
        algorithms: adapter classes to recognise, tried in order.
    """
    placed = _read(path, modules, strict, algorithms)
    return {prefix: Network(adapters, prefix, multiplier) for prefix, adapters in placed.items() if adapters}


def merge_into(
    modules: Mapping[str, nn.Module],
    files: Iterable[tuple[str | os.PathLike, float]],
    strict: bool = True,
    algorithms: Iterable[type[Adapter]] = ALGORITHMS,
) -> dict[str, int]:
    """Bake adapter files into the base weights, one after another, each at its weight.

    Returns the number of layers changed per prefix. The model then runs at the base model's cost.
    """
    changed = {prefix: 0 for prefix in modules}
    for path, weight in files:
        for prefix, adapters in _read(path, modules, strict, algorithms).items():
            for adapter in adapters.values():
                adapter.to_base().eval().bake(float(weight))
            changed[prefix] += len(adapters)
    return changed
