"""LyCORIS safetensors files: write, read (ours, the LyCORIS library's, kohya sd-scripts'), and bake in.

Keys. A file maps ``<prefix>_<module path with "_">.<suffix>`` to tensors, e.g.
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``: the prefixes are
``lora_unet`` and ``lora_te`` (SD 1.x/2.x), the module paths the canonical SD ones that the UIs look up, the
suffixes the algorithm's parameter names (a network's ``state_dict()`` is the file content). Each low-rank
layer stores its ``alpha``, and the scale α/rank is applied once, as A1111 and ComfyUI compute it.
Text-encoder keys are always written as ``lora_te_text_model_encoder_…``, also with transformers 5, whose
``CLIPTextModel`` dropped the ``text_model.`` level (names without it are silently ignored by the UIs); both
spellings load. SDXL files carry ``lora_unet`` with the UNet's LDM (compvis) paths and ``lora_te1`` (CLIP-L) /
``lora_te2`` (CLIP-G), as kohya's sd-scripts writes them. Other trainers' spellings are read too: diffusers
paths after ``lora_unet_``, SimpleTuner's ``lycoris_<diffusers path>``, and diffusers/PEFT LoRA files
(``unet.<path>.lora_A.weight``, ``text_encoder.…``, ``text_encoder_2.…``; alphas from diffusers'
``lora_adapter_metadata``, scale 1 without it).

Reading groups keys by layer, finds the layer in the given models under either spelling of its path,
recognises the algorithm from the suffixes (`Adapter.signature`; a user's algorithm by its adapter class or
its strategy, see `load_file`), checks every shape against what that layer needs and names the first key
that does not fit, and refuses files with NaN/inf values. Keys that match no layer are an error (a warning
with ``strict=False``). Only safetensors is read: nothing is unpickled. The file's metadata is kohya's
``ss_*`` keys (`kohya_metadata`), which A1111, ComfyUI and Civitai show.

Conventions worth knowing:

- Every adapter starts at ΔW = 0 (one factor zero), so a fresh network leaves the model unchanged.
- Norm layers (GroupNorm/LayerNorm, with ``train_norm``: preset full by default) store ``w_norm`` and ``b_norm``,
  the differences of their affine weight and bias, whatever the algorithm of the other layers: the LyCORIS
  library's keys, which ComfyUI and A1111 add to γ and β times the strength (`lycoris.NormAdapter`).
- ``multiplier`` is linear for every algorithm: the layer computes with W0 + multiplier·ΔW, where
  ``delta_weights()`` gives ΔW (for OFT/BOFT, (IA)³, GLoRA and DoRA, ΔW depends on W0). Which algorithms
  A1111, ComfyUI and the LyCORIS library compute exactly from these files, at which strengths, is the
  README's compatibility table (tests/test_ui_loading.py, tests/test_lycoris_library_files.py).
- ``merge()`` keeps a copy of each original weight so that ``unmerge()``/``remove()`` restore it bit for bit;
  `merge_into` bakes without a copy.
- LoKr with both blocks full (the paper's dim 10000) has no rank, so its scale is 1 whatever ``alpha``
  says, as in the UIs. OFT/BOFT store their constraint in ``alpha`` and use it as the cap on ‖Q‖ directly,
  as ComfyUI reads it; the blocks are written already capped (`Adapter.file_tensors`), so that A1111's and the
  LyCORIS library's looser cap (alpha·out_dim) does not act either and all three compute the same rotation.
- DoRA normalises each input column by default (``dora_scale`` of shape (1, in, …), LyCORIS'
  ``wd_on_output=False``), what ComfyUI and A1111 compute exactly; ``dora_on_output=True`` writes per-output-row
  magnitudes (shape (out, 1, …), LyCORIS' default), the only ones its ``create_lycoris_from_weights`` reloads.
  Both load here, trained and read in the orientation the file stores.
- The LyCORIS library differs at multipliers other than 1 for DoRA, rescaled OFT and BOFT, and caps a
  constrained OFT at alpha·out_dim; ``tests/test_interop.py`` pins each difference as a strict xfail.
- DyLoRA trains with scale α/b at the sampled rank b and is saved with LoCon keys at full rank, so a file
  truncated to rank b reproduces it.
- Training never builds what it need not: LoRA/LoCon, DyLoRA, GLoRA and (IA)³ run through their factors
  (bypass), LoKr applies w1 ⊗ w2 through reshapes, LoHa's ΔW goes through a memory-saving autograd function,
  OFT/BOFT rotate the layer's output and DoRA on LoRA/LoCon runs through its factors where their cost models
  say that is cheaper (3×3 convolutions, few-token layers), else the weight is rebuilt once per call; a merged
  network costs exactly the base model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _save_tensors
from torch import Tensor, nn

from .base import Adapter, Network, Strategy
from .boft import BOFTAdapter
from .full import FullAdapter
from .glora import GLoRAAdapter
from .ia3 import IA3Adapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter
from .norm import NormAdapter
from .oft import OFTAdapter
from .targeting import file_namer, layers_by_name, lycoris_name

#: Adapter classes `load_file` recognises, tried in order. Pass your own tuple to add an algorithm.
ALGORITHMS: tuple[type[Adapter], ...] = (
    LoRAAdapter, LoHaAdapter, LoKrAdapter, OFTAdapter, BOFTAdapter, GLoRAAdapter, IA3Adapter, FullAdapter,
    NormAdapter,
)

#: What ``algorithms=`` takes: an adapter class, or a strategy (class or instance), read by its ``adapter_class``
#: (and by `NormAdapter`, which every strategy that trains norms writes beside it).
Algorithm = type[Adapter] | type[Strategy] | Strategy


def adapter_classes(algorithms: Iterable[Algorithm]) -> tuple[type[Adapter], ...]:
    """The adapter classes that read ``algorithms``' files, in order; TypeError naming any other item. A strategy
    stands for its ``adapter_class`` followed by `NormAdapter`: its files hold its norm layers too."""
    classes = []
    for algorithm in algorithms:
        cls = type(algorithm) if isinstance(algorithm, Strategy) else algorithm
        if isinstance(cls, type) and issubclass(cls, Strategy):
            strategy, cls = cls, getattr(cls, "adapter_class", None)
            if not (isinstance(cls, type) and issubclass(cls, Adapter)):
                raise TypeError(f"{strategy.__module__}.{strategy.__qualname__} sets no adapter_class: give it "
                                "`adapter_class = <its Adapter subclass>` so that its files can be read")
            classes += [cls, NormAdapter]
        elif isinstance(cls, type) and issubclass(cls, Adapter):
            classes.append(cls)
        else:
            raise TypeError(f"{algorithm!r} is neither a lycoris.Adapter class nor a lycoris.Strategy")
    return tuple(classes)


def kohya_metadata(
    network_args: Mapping[str, Any],
    dim: int,
    alpha: float | None,
    base_version: str,
    output_name: str,
    epoch: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    comment: str | None = None,
    v_parameterization: bool = False,
    zero_terminal_snr: bool = False,
) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` metadata of an adapter file, in its key order: what A1111, ComfyUI and Civitai
    show about a file. An SDXL file (``base_version`` ``sdxl_…``, whose name does not say the prediction type as
    SD 2.x's does) also gets sd-scripts' ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` and the SAI model
    spec that sd-scripts writes beside them (``modelspec.architecture`` ``stable-diffusion-xl-v1-base/lora``,
    ``modelspec.prediction_type`` ``epsilon`` or ``v``); SD 1.x/2.x files keep exactly the keys they always had.

    Args:
        network_args: ``ss_network_args``, e.g. `Strategy.network_args` (``algo`` and the settings).
        dim: ``ss_network_dim``, the rank.
        alpha: ``ss_network_alpha``; None means alpha = dim (scale 1).
        base_version: ``ss_base_model_version``: ``sd_v1``, ``sd_v2_512``, ``sd_v2_768_v`` or ``sdxl_base_v1-0``.
        output_name: ``ss_output_name``, the name the UIs list the file under.
        epoch: ``ss_epoch``, for a trained file (1 after the first epoch).
        steps: ``ss_steps``, optimiser steps taken.
        seed: ``ss_seed``, the training seed.
        comment: ``ss_training_comment``: how the file was made.
        v_parameterization: SDXL: the base predicts v (NoobAI-v and other v-prediction SDXL).
        zero_terminal_snr: SDXL: its noise schedule is rescaled to zero terminal SNR.
    """
    meta = {
        "ss_base_model_version": base_version,
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim if alpha is None else alpha),
        "ss_network_args": json.dumps(dict(network_args), default=str),
        "ss_output_name": output_name,
    }
    optional = {"ss_epoch": epoch, "ss_steps": steps, "ss_seed": seed, "ss_training_comment": comment}
    meta |= {key: str(value) for key, value in optional.items() if value is not None}
    if base_version.startswith("sdxl_"):
        meta |= {"ss_v_parameterization": str(v_parameterization), "ss_zero_terminal_snr": str(zero_terminal_snr),
                 "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                 "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                 # sd-scripts' SDXL default where no training size is given (lycoflow's buckets vary).
                 "modelspec.title": output_name, "modelspec.resolution": "1024x1024",
                 "modelspec.prediction_type": "v" if v_parameterization else "epsilon"}
    return meta


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
        for name, adapter in net.named_children():
            for suffix, value in adapter.file_tensors().items():
                value = value.detach().to("cpu")
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                tensors[f"{prefix}{name[len(net.prefix):]}.{suffix}"] = value.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _save_tensors(tensors, tmp, metadata=meta)
        # mkstemp (and safetensors) create files only their owner may read: give the file the mode the user's
        # umask gives new files, so a UI running as another user can load it.
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def default_file_mode() -> int:
    """The mode the user's umask gives a new file (what ``open`` would create; mkstemp creates 0600). lycoflow's
    torch-free ``lycoflow.cache`` has the same three lines: it cannot import this package."""
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return 0o666 & ~mask


#: diffusers/PEFT LoRA files: the model part a key starts with → its kohya prefix (SD 1.x's text encoder: ``lora_te``),
#: and the parameter suffixes → kohya's.
_PEFT_PARTS = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_PEFT_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _kohya_tensors(tensors: dict[str, Tensor], config: Mapping[str, Any], prefixes: Collection[str]
                   ) -> dict[str, Tensor]:
    """The file's tensors under kohya's keys (``<prefix>_<path with _>.<suffix>``) where another trainer spelled
    them: SimpleTuner's ``lycoris_<UNet diffusers path>``, SDXL's CLIP-L as ``lora_te_``, and diffusers/PEFT's
    ``<part>.<path>.lora_A.weight``, whose alphas diffusers keeps in the file's ``lora_adapter_metadata``
    (``<part>.lora_alpha``, per-layer ``<part>.alpha_pattern``, matched as PEFT does: ``config``); without it the
    scale is 1, as diffusers then loads it."""
    out: dict[str, Tensor] = {}
    # The LyCORIS library names a bare model's layers ``lycoris_``: its own prefix when the caller gives it.
    simpletuner = "lycoris" not in prefixes and "lora_unet" in prefixes
    # SDXL: an SD 1.x-style ``lora_te_`` is CLIP-L, as ComfyUI reads it (comfy/lora.py model_lora_keys_clip).
    first_encoder = "lora_te1" in prefixes and "lora_te" not in prefixes
    for key, value in tensors.items():
        if simpletuner and key.startswith("lycoris_"):
            out["lora_unet_" + key.removeprefix("lycoris_")] = value
            continue
        if first_encoder and key.startswith("lora_te_"):
            out["lora_te1_" + key.removeprefix("lora_te_")] = value
            continue
        part, _, rest = key.partition(".")
        if part in _PEFT_PARTS and "lora_magnitude_vector" in rest:
            raise ValueError(f"{key}: a diffusers/PEFT DoRA file, which is not read (only PEFT's plain LoRA is)")
        suffix = next((s for s in _PEFT_SUFFIXES if rest.endswith("." + s)), None)
        if part not in _PEFT_PARTS or suffix is None:
            out[key] = value
            continue
        path = rest.removesuffix("." + suffix)
        name = lycoris_name("lora_te" if part == "text_encoder" and "lora_te" in prefixes else _PEFT_PARTS[part],
                            path)
        out[f"{name}.{_PEFT_SUFFIXES[suffix]}"] = value
        patterns = config.get(f"{part}.alpha_pattern") or {}
        alpha = next((a for pattern, a in patterns.items() if re.match(rf"(.*\.)?({pattern})$", path)),
                     config.get(f"{part}.lora_alpha"))
        if alpha is not None:
            rank = value.shape[0 if suffix == "lora_A.weight" else 1]
            # rsLoRA scales by α/√r where kohya's alpha means α/r: the same scale is alpha·√r.
            out[f"{name}.alpha"] = torch.tensor(float(alpha) * (rank ** 0.5 if config.get(f"{part}.use_rslora")
                                                                else 1.0))
    return out


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}{tuple(layer.weight.shape)}"


def _read(
    path: str | os.PathLike,
    modules: Mapping[str, nn.Module],
    strict: bool,
    algorithms: Iterable[Algorithm],
) -> dict[str, dict[str, Adapter]]:
    """prefix → {canonical LyCORIS name → adapter holding the file's values}, not attached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:  # one open for the tensors and diffusers' LoRA settings in the metadata
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if not tensors:  # would load, generate and merge as if it were an adapter, changing nothing
        raise ValueError(f"{path}: holds no tensors, so no adapter: was it saved from an untrained or empty network?")
    try:
        peft_config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError as err:
        raise ValueError(f"{path}: its lora_adapter_metadata (diffusers' LoRA settings) is not JSON: {err}") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: refusing to load: NaN/inf values in {len(bad)} tensor(s), e.g. {bad[:3]}")

    groups: dict[str, dict[str, Tensor]] = {}
    try:
        respelled = _kohya_tensors(tensors, peft_config, modules)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    for key, value in respelled.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    tables = {prefix: layers_by_name(module, prefix) for prefix, module in modules.items()}
    namers = {prefix: file_namer(module, prefix) for prefix, module in modules.items()}
    algorithms = adapter_classes(algorithms)
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
        placed[prefix][namers[prefix](canonical)] = adapter  # named as apply names it, whatever the file's spelling
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
    algorithms: Iterable[Algorithm] = ALGORITHMS,
) -> dict[str, Network]:
    """Attach the adapters of a LyCORIS/kohya file to ``modules``; returns prefix → network.

    Args:
        path: the ``.safetensors`` file.
        modules: file prefix → model, e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``.
        multiplier: strength of every loaded adapter (settable later on each network).
        strict: raise on keys that match no layer (otherwise warn and load the rest).
        algorithms: the algorithms to recognise, tried in order: adapter classes, or strategies (classes or
            instances) for their ``adapter_class``. A user's algorithm goes first, before the built-in ones:
            ``algorithms=(my_algos.ScaledDiff, *lycoris.ALGORITHMS)``.
    """
    placed = _read(path, modules, strict, algorithms)
    return {prefix: Network(adapters, prefix, multiplier) for prefix, adapters in placed.items() if adapters}


def merge_into(
    modules: Mapping[str, nn.Module],
    files: Iterable[tuple[str | os.PathLike, float]],
    strict: bool = True,
    algorithms: Iterable[Algorithm] = ALGORITHMS,
) -> dict[str, int]:
    """Bake adapter files into the base weights, one after another, each at its weight.

    Returns the number of layers changed per prefix. The model then runs at the base model's cost. ``strict``
    and ``algorithms`` are `load_file`'s.
    """
    algorithms = adapter_classes(algorithms)  # once: an iterator would be spent by the first file
    changed = {prefix: 0 for prefix in modules}
    for path, weight in files:
        for prefix, adapters in _read(path, modules, strict, algorithms).items():
            for name, adapter in adapters.items():
                adapter.name = name  # for its messages
                adapter.to_base().eval().bake(float(weight))
            changed[prefix] += len(adapters)
    return changed
