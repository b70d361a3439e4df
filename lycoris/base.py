"""The adapter contract: `Adapter` (one wrapped layer), `Network` (the adapters of one model), and
`Strategy` (the configurable algorithm that builds them).

An adapter never becomes a submodule of the model it adapts: it replaces the layer's ``forward`` with its
own, so the model's module tree and state dict stay exactly as they were, and the network holds only
adapter parameters. Adapter parameters are named as their LyCORIS file keys, so a network's
``state_dict()`` *is* the file content (``<lycoris name>.<suffix>``).
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    SUPPORTED_LAYERS,
    column_norm,
    kernel_size,
    layer_op,
    per_row,
    rank_mask,
    row_norm,
    weight_decompose,
)
from .quantize import Quantized, dense_weight
from .targeting import PRESETS, Preset, file_namer, matches, norm_layers, supported_layers


class Adapter(nn.Module):
    """One adapted layer W0 → W0 + multiplier·ΔW.

    Subclasses create their parameters under their LyCORIS key names and implement `_delta` (ΔW with the
    scale applied once). They override `_forward` where a cheaper factored path than rebuilding the weight
    exists, and implement `from_state_dict` to rebuild themselves from file tensors.

    Args:
        base: the layer to adapt (Linear, Conv1d or Conv2d).
        dropout: elementwise dropout on the adapter's contribution while training.
        rank_dropout: dropout over rank channels (output rows for weight-space algorithms) while training.
        module_dropout: probability of skipping the whole adapter for a training step.
        weight_decompose: DoRA: learn a magnitude (``dora_scale``) per input column on top of ΔW.
        dora_on_output: DoRA magnitudes per output row instead (see `Decomposable`).
    """

    #: File suffixes whose presence identifies this algorithm (checked by `lycoris.load_file`).
    signature: ClassVar[tuple[str, ...]] = ()
    #: The layer kinds this adapter can wrap: a file that names another kind for these keys is refused on load.
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = SUPPORTED_LAYERS
    #: Parameters whose neutral value is not zero (DoRA's magnitudes start at ‖W0‖): weight decay, which pulls
    #: towards zero, would move the model away from the base even without data, so optimisers exempt them.
    no_weight_decay: ClassVar[tuple[str, ...]] = ("dora_scale",)

    def __init__(
        self,
        base: nn.Module,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        weight_decompose: bool = False,
        dora_on_output: bool = False,
    ):
        super().__init__()
        if not isinstance(base, self.layer_types):
            kinds = ", ".join(t.__name__ for t in self.layer_types)
            raise ValueError(f"{type(self).__name__} adapts {kinds} layers, not {type(base).__name__}")
        object.__setattr__(self, "base", base)  # deliberately not registered: base weights stay the model's
        self.name = ""
        self.multiplier = 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.weight_decompose = weight_decompose
        if weight_decompose:
            norm = row_norm if dora_on_output else column_norm
            self.dora_scale = nn.Parameter(norm(dense_weight(base).detach().float()))
        #: Values of the hyperparameters the file stores as tensors (`register_constant`), read by the forward.
        self._constants: dict[str, float] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_constants())
        # While merged: (multiplier, original weight, original bias), so that unmerge is exact.
        self._merged: tuple[float, Tensor, Tensor | None] | None = None
        self._saved_requires_grad: list[bool] = []

    def register_constant(self, name: str, value: float, dtype: torch.dtype = torch.float32) -> None:
        """A hyperparameter the file stores as a tensor (``alpha``, ``on_input``): a buffer, so that it is in the
        state dict and the file, whose value the forward reads as a Python number. Reading the tensor per call
        (``float(self.alpha)``) would end torch.compile's graph at every adapter; loading a state dict updates
        both."""
        self.register_buffer(name, torch.tensor(value, dtype=dtype))
        self._constants[name] = float(value)

    def constant(self, name: str) -> float:
        return self._constants[name]

    def _read_constants(self) -> None:
        self._constants = {name: float(getattr(self, name)) for name in self._constants}

    # -- ΔW -------------------------------------------------------------------------------------------
    def _delta(self) -> Tensor:
        """The algorithm's ΔW in W0's shape, scale applied once, before DoRA."""
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        """Δb for algorithms that train the bias (`Full`, and `NormAdapter` on norm layers)."""
        return None

    @property
    def w0(self) -> Tensor:
        """The layer's original weight, also while ΔW is merged into it."""
        return dense_weight(self.base) if self._merged is None else self._merged[1]

    def _decompose(self, delta: Tensor) -> Tensor:
        if not self.weight_decompose:
            return delta
        w0 = self.w0.to(delta.dtype)
        return weight_decompose(w0, delta, self.dora_scale) - w0

    def delta_weight(self) -> Tensor:
        """ΔW such that the adapted layer computes with W0 + multiplier·ΔW (DoRA included)."""
        return self._decompose(self._delta())

    def _regularize(self, delta: Tensor) -> Tensor:
        if self.dropout:
            delta = F.dropout(delta, self.dropout)
        if self.rank_dropout:
            delta = delta * rank_mask(delta.shape[0], self.rank_dropout, delta).view(-1, *[1] * (delta.dim() - 1))
        return delta

    def adapted_weight(self) -> Tensor:
        w0 = self.w0
        delta = self._delta()
        if self.training:
            delta = self._regularize(delta)
        return (w0.to(delta.dtype) + self.multiplier * self._decompose(delta)).to(w0.dtype)

    def adapted_bias(self) -> Tensor | None:
        bias, db = self.base.bias, self.delta_bias()
        if db is None:
            return bias
        return (bias.to(db.dtype) + self.multiplier * db).to(bias.dtype)

    # -- forward --------------------------------------------------------------------------------------
    @property
    def channel_dim(self) -> int:
        """Where channels sit in activations: last for Linear (tokens), 1 for convolution maps."""
        return -1 if isinstance(self.base, nn.Linear) else 1

    def positions(self, x: Tensor) -> tuple[int, int]:
        """(input, output) positions of ``x``: tokens for Linear, batch × pixels for convolutions (output ones
        estimated from the stride): what the factored paths' cost models count per call."""
        if isinstance(self.base, nn.Linear):
            positions = x.numel() // x.shape[-1]
            return positions, positions
        positions = x.numel() // x.shape[1]
        return positions, max(1, positions // math.prod(self.base.stride))

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return type(self.base).forward(self.base, x, *args, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._merged is not None or self.multiplier == 0:
            return self.base_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self.base_forward(x, *args, **kwargs)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        """Default path: one op with the adapted weight (the weight is rebuilt once per call)."""
        weight = self.adapted_weight()
        return layer_op(self.base, x.to(weight.dtype) if x.is_floating_point() else x, weight, self.adapted_bias())

    # -- merge ----------------------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        if isinstance(self.base, Quantized):
            raise ValueError(f"{self.name}: cannot merge into a base stored in 8 bits (an 8-bit weight cannot hold "
                             "W0 + ΔW); keep the adapter attached, or merge into the full-precision model")

    @torch.no_grad()
    def bake(self, multiplier: float) -> None:
        """Add multiplier·ΔW (and Δb) to the base layer for good."""
        self._check_mergeable()
        weight, bias, db = self.base.weight, self.base.bias, self.delta_bias()
        weight.add_((multiplier * self.delta_weight()).to(weight.dtype))
        if db is not None:
            bias.add_((multiplier * db).to(bias.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Bake at the current multiplier, keeping the original (one weight copy) so that unmerge restores it
        bit for bit; `lycoris.merge_into` bakes without keeping it."""
        if self._merged is not None:
            return
        self._check_mergeable()
        bias = self.base.bias if self.delta_bias() is not None else None
        originals = (self.base.weight.clone(), None if bias is None else bias.clone())
        self.bake(self.multiplier)
        self._merged = (self.multiplier, *originals)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        _, weight, bias = self._merged
        self.base.weight.copy_(weight)
        if bias is not None:
            self.base.bias.copy_(bias)
        self._merged = None

    # -- attach ---------------------------------------------------------------------------------------
    def to_base(self) -> Adapter:
        """Move to the base layer's device; parameters in fp32 at least (mixed precision casts per op)."""
        dtype = self.base.weight.dtype if self.base.weight.dtype == torch.float64 else torch.float32
        return self.to(device=self.base.weight.device, dtype=dtype)

    def attach(self) -> None:
        if "forward" in self.base.__dict__:
            raise RuntimeError(
                f"{self.name}: this layer already has an adapter attached; remove() the other network "
                "first, or bake it in with lycoris.merge_into"
            )
        self.base.forward = self.forward
        self._saved_requires_grad = [p.requires_grad for p in self.base.parameters(recurse=False)]
        self.base.requires_grad_(False)

    def detach(self) -> None:
        self.unmerge()
        self.base.__dict__.pop("forward", None)
        for p, flag in zip(self.base.parameters(recurse=False), self._saved_requires_grad):
            p.requires_grad_(flag)

    # -- files ----------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """What the file stores for this layer (suffix → tensor): the parameters, unless an algorithm stores
        an equivalent form every reader computes alike."""
        return self.state_dict()

    @classmethod
    def from_state_dict(cls, base: nn.Module, tensors: dict[str, Tensor]) -> Adapter:
        """Build the adapter that ``tensors`` (suffix → tensor) describe, for ``base``; loads nothing."""
        raise NotImplementedError

    @classmethod
    def detects(cls, tensors: dict[str, Tensor]) -> bool:
        return any(k in tensors for k in cls.signature)

    @staticmethod
    def dora_args(base: nn.Module, tensors: dict[str, Tensor]) -> dict[str, bool]:
        """The DoRA constructor arguments a file's ``dora_scale`` implies (absent, per column, per row)."""
        scale = tensors.get("dora_scale")
        return {"weight_decompose": scale is not None,
                "dora_on_output": scale is not None and per_row(scale, base.weight)}

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}{tuple(self.base.weight.shape)}"


class Network(nn.Module):
    """The adapters of one model, keyed by LyCORIS name; attaching happens at construction.

    Args:
        adapters: LyCORIS layer name → adapter.
        prefix: the name prefix these adapters carry (``lora_unet``, ``lora_te``, ...).
        multiplier: strength applied to every adapter.
    """

    def __init__(self, adapters: dict[str, Adapter], prefix: str, multiplier: float = 1.0):
        super().__init__()
        self.prefix = prefix
        for name, adapter in adapters.items():
            adapter.name = name
            self.add_module(name, adapter.to_base())
        attached = []
        try:
            for adapter in self.adapters():
                adapter.attach()
                attached.append(adapter)
        except RuntimeError:
            for adapter in attached:
                adapter.detach()
            raise
        self.multiplier = multiplier

    def adapters(self) -> list[Adapter]:
        return list(self.children())

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for adapter in self.adapters():
            if adapter._merged is not None and adapter._merged[0] != value:
                raise RuntimeError("unmerge() before changing the multiplier of a merged network")
            adapter.multiplier = self._multiplier

    def merge(self) -> None:
        """Fold every ΔW into its base weight: inference then costs exactly the base model."""
        for adapter in self.adapters():
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters():
            adapter.unmerge()

    def remove(self) -> None:
        """Detach every adapter and restore the model exactly (weights, forward, requires_grad)."""
        for adapter in self.adapters():
            adapter.detach()

    def parameters_by_decay(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(parameters to decay, parameters exempt from weight decay: see `Adapter.no_weight_decay`)."""
        decay, exempt = [], []
        for adapter in self.adapters():
            for name, param in adapter.named_parameters():
                (exempt if name in adapter.no_weight_decay else decay).append(param)
        return decay, exempt

    @torch.no_grad()
    def delta_weights(self) -> dict[str, Tensor]:
        """LyCORIS layer name → ΔW (scale applied, multiplier not)."""
        return {name: adapter.delta_weight() for name, adapter in self.named_children()}


class Strategy:
    """Base class of every adapter algorithm: hyperparameters shared by all, and layer targeting.

    Subclasses implement `make_adapter` and name the `Adapter` that reads their files back in ``adapter_class``;
    everything else (selection by preset/patterns, per-pattern overrides, naming, attaching) happens here, so a
    new algorithm is one small file.

    A strategy stores each constructor argument under its own name (``dim`` as ``self.dim``, ``use_tucker`` as
    ``self.use_tucker``), normalised at most (``exclude=None`` as ``[]``): `settings` and `network_args` (the
    files' ``ss_network_args``), per-layer overrides, recipes and the run analysis read the arguments back by
    those names, so a subclass stores its own the same way.

    Args:
        dim: rank of the low-rank factors (OFT/BOFT: block size; unused by IA3 and Full).
        alpha: scale numerator, ΔW is multiplied by alpha/dim; None means alpha = dim (scale 1).
        conv_dim: rank for convolutions with a kernel larger than 1; None uses ``dim``, 0 skips them.
        conv_alpha: alpha for those convolutions; None uses ``alpha`` (or their rank if that is None too).
        dropout: elementwise dropout on the adapter's contribution while training.
        rank_dropout: dropout over rank channels while training.
        module_dropout: probability of skipping a whole adapted layer for a training step.
        preset: named set of layers, the paper's "trained layers": attn-only, attn-mlp (paper default) or full.
        targets: glob patterns over canonical dotted module paths to adapt (added to the preset's).
            With neither preset nor targets, every Linear/Conv layer is adapted.
        exclude: glob patterns of module paths never to adapt.
        overrides: glob pattern → hyperparameters for the matching layers, e.g.
            ``{"*attn2*": {"dim": 16}}``; later patterns win.
        train_norm: also train the affine weight and bias of the GroupNorm/LayerNorm layers that the preset
            and targets select (`lycoris.NormAdapter`, the LyCORIS library's ``train_norm``), whatever the
            algorithm; None: as the preset says, which is on for full only (the norms of its ResNet and
            transformer blocks). With neither preset nor targets, True trains every norm layer.
    """

    _TARGETING = frozenset({"preset", "targets", "exclude", "overrides", "train_norm"})
    #: The algorithm's name in LyCORIS metadata (``ss_network_args``); a user strategy defaults to its class name.
    algo: ClassVar[str] = ""
    #: The adapter that reads this algorithm's files back: what `lycoris.load_file` and `merge_into` use for the
    #: strategy given in ``algorithms=``. Every algorithm sets it; a strategy without it cannot stand for its files.
    adapter_class: ClassVar[type[Adapter]]

    def __init__(
        self,
        dim: int = 4,
        alpha: float | None = None,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        preset: Preset | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        train_norm: bool | None = None,
    ):
        self.dim, self.alpha, self.conv_dim, self.conv_alpha = dim, alpha, conv_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.preset, self.targets, self.exclude = preset, targets, exclude or []
        self.train_norm = train_norm
        self.overrides = dict(overrides or {})
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"{type(self).__name__}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{type(self).__name__}: {name}={p} must be in [0, 1)")
        if dim < 1:
            raise ValueError(f"{type(self).__name__}: dim={dim} must be >= 1")
        known = self.hyperparameters()
        for pattern, values in self.overrides.items():
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: overrides[{pattern!r}] sets unknown hyperparameter(s) "
                    f"{unknown}; known: {sorted(known)}"
                )

    @classmethod
    def hyperparameters(cls) -> set[str]:
        """Names a per-pattern override may set: every constructor argument except targeting."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None and klass is not object:
                names |= {p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")}
        return names - cls._TARGETING

    def make_adapter(self, layer: nn.Module, dim: int, alpha: float) -> Adapter:
        """Build the adapter of this algorithm for one layer, at the given rank and alpha."""
        raise NotImplementedError

    def common(self) -> dict[str, float]:
        """The regularisation arguments every `Adapter` takes."""
        return {"dropout": self.dropout, "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout}

    @property
    def trains_norm(self) -> bool:
        """Whether the selected norm layers get a `lycoris.NormAdapter` (``train_norm``, resolved)."""
        return self.preset == "full" if self.train_norm is None else self.train_norm

    def selects(self, path: str) -> bool:
        if matches(path, self.exclude):
            return False
        if self.preset is None and self.targets is None:
            return True
        return (self.preset is not None and matches(path, PRESETS[self.preset])) or (
            self.targets is not None and matches(path, self.targets)
        )

    def for_layer(self, path: str) -> Strategy:
        """This strategy with the overrides whose pattern matches ``path`` applied."""
        hits = [values for pattern, values in self.overrides.items() if matches(path, [pattern])]
        if not hits:
            return self
        strategy = copy.copy(self)
        for values in hits:
            for key, value in values.items():
                setattr(strategy, key, value)
        return strategy

    def apply(self, module: nn.Module, prefix: str = "lora_unet", multiplier: float = 1.0) -> Network:
        """Wrap the targeted layers of ``module`` in place; returns the network of their adapters."""
        adapters: dict[str, Adapter] = {}
        name = file_namer(module, prefix)
        for _, path, layer in supported_layers(module):
            if not self.selects(path):
                continue
            strategy = self.for_layer(path)
            spatial = any(k > 1 for k in kernel_size(layer))
            dim = strategy.conv_dim if spatial and strategy.conv_dim is not None else strategy.dim
            if dim == 0:
                continue
            alpha = strategy.conv_alpha if spatial and strategy.conv_alpha is not None else strategy.alpha
            alpha = dim if alpha is None else alpha
            try:
                adapters[name(path)] = strategy.make_adapter(layer, dim, alpha)
            except ValueError as err:
                raise ValueError(f"{name(path)} ({path}): {err}") from None
        if self.trains_norm:
            from .norm import NormAdapter  # norm.py builds on Adapter above: importing it at the top is a cycle

            for _, path, layer in norm_layers(module):
                if self.selects(path):
                    strategy = self.for_layer(path)
                    adapters[name(path)] = NormAdapter(
                        layer, dropout=strategy.dropout, rank_dropout=strategy.rank_dropout,
                        module_dropout=strategy.module_dropout)
        if not adapters:
            raise ValueError(
                f"{type(self).__name__} matched no layer of {type(module).__name__} "
                f"(preset={self.preset!r}, targets={self.targets!r}, exclude={self.exclude!r})"
            )
        return Network(adapters, prefix, multiplier)

    def settings(self) -> dict[str, Any]:
        """Every constructor argument (hyperparameters and targeting) with its current value."""
        return {k: getattr(self, k) for k in sorted(self.hyperparameters() | self._TARGETING)}

    def network_args(self) -> dict[str, Any]:
        """kohya/LyCORIS ``ss_network_args`` metadata: ``algo`` and every setting that is not empty."""
        set_ = {k: v for k, v in self.settings().items() if v is not None and v != [] and v != {}}
        return {"algo": self.algo or type(self).__name__.lower(), **set_}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class Decomposable(Strategy):
    """A strategy whose adapters can add DoRA (Liu et al. 2024): W = m·(W0+ΔW)/‖W0+ΔW‖, m learnt.

    The norm, and so ``dora_scale``, is taken per input column by default: from such files ComfyUI and A1111
    compute exactly the weight lycoflow trained, while from per-output-row files ComfyUI divides by ‖W0‖ and
    A1111 normalises per column anyway (README, compatibility table). The LyCORIS library's
    ``create_lycoris_from_weights`` reloads per-output-row files only. Training uses the orientation the file
    stores, so a file is always the model that was trained.

    Args:
        weight_decompose: DoRA: also learn the magnitudes ``dora_scale``.
        dora_on_output: one magnitude per output row (the LyCORIS library's default) instead of per input column.
        **kwargs: shared hyperparameters, see `lycoris.Strategy`.
    """

    def __init__(self, weight_decompose: bool = False, dora_on_output: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.weight_decompose = weight_decompose
        self.dora_on_output = dora_on_output

    def common(self) -> dict[str, float]:
        return {**super().common(), "weight_decompose": self.weight_decompose, "dora_on_output": self.dora_on_output}
