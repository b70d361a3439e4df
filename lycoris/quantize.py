"""A frozen base stored in 8 bits: `quantize_frozen` keeps the weights of a model's frozen Linear and convolution
layers in one byte each with one scale per output channel, through torchao: ``int8`` (``Int8Tensor``, symmetric:
each weight one of 255 steps of its channel's largest) or ``float8`` (``Float8Tensor``, e4m3: a 3-bit mantissa
per weight, finer than int8 for the small weights of a channel, coarser for the large ones). Both are weight
storage only: the layer computes in the activations' dtype, so neither needs fp8 hardware (no fp8 matmul, which
would round the activations too).

Memory is the point, so no full-precision copy of a quantized weight outlives the layer's call: the layer's op is
an autograd function that keeps only the 8-bit weight for backward and dequantises it again there for the input
gradient (autograd through a dequantised weight would keep every layer's full-precision copy until backward,
which is what torchao's own ``F.linear`` does). Forward and backward dequantise the weight per call into the
activations' dtype (what torchao's weight-only matmul does inside; it has no convolution).

Adapters see the base through `Adapter.w0`, which dequantises: the factored (bypass) paths — LoRA/LoCon, LoKr
through reshapes, OFT/BOFT by rotated outputs, (IA)³ — call the quantized op and add their own terms
(tests/test_quantize.py checks that they keep no dense weight); the algorithms that rebuild the weight (LoHa,
GLoRA, Full, the rebuilt paths of the others, chosen by their cost models) dequantise W0 per layer on the fly into
the weight they build, which, as without quantization, is kept for backward; DoRA's norms need W0 itself, so its
layers keep their dequantised W0 for backward. Merging into a quantized base is refused: an 8-bit weight cannot
hold W0 + ΔW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How a frozen base may be stored, weight-only with one scale per output channel: int8 or float8 (e4m3).
Quantization = Literal["int8", "float8"]


class Quantized(nn.Module):
    """Marks a layer whose weight `quantize_frozen` stored in 8 bits; its forward is the frozen op."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self, nn.Linear):
            # On 2-D input F.linear returns a fresh tensor; on more dimensions a view, which a custom function may
            # not return if adapters are to add to it in place. A view taken out here may be.
            return _FrozenOp.apply(x.reshape(-1, x.shape[-1]), self).view(*x.shape[:-1], -1)
        return _FrozenOp.apply(x, self)


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The layer's weight as an ordinary tensor: dequantised if the layer is `Quantized`, into ``dtype`` (default:
    the weight's logical dtype, ``weight_dtype``)."""
    weight = layer.weight
    if not isinstance(layer, Quantized):
        return weight
    dtype = dtype or weight.dtype
    if weight.qdata.is_floating_point():  # float8 takes part in no type promotion: cast, then scale in place
        return weight.qdata.to(dtype).mul_(weight.scale.to(dtype))
    # Symmetric int8 (zero point 0): int8 × a floating scale promotes to the scale's dtype in one pass, where
    # torchao's general dequantize takes several (measured: the int8 base's step 4.7× the bf16 one with it).
    return weight.qdata * weight.scale.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer's op computes in: autocast's where it is on (one cast of the 8-bit weight, not two)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _FrozenOp(torch.autograd.Function):
    """The layer's op with its quantized weight; the gradient flows to the input only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype
        weight = dense_weight(layer, _compute_dtype(x))
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        weight = dense_weight(layer, grad.dtype)
        if isinstance(layer, nn.Linear):
            return (grad @ weight).to(ctx.input_dtype), None
        conv_input = torch.nn.grad.conv2d_input if isinstance(layer, nn.Conv2d) else torch.nn.grad.conv1d_input
        return conv_input(ctx.input_shape, weight, grad, layer.stride, layer.padding, layer.dilation,
                          layer.groups).to(ctx.input_dtype), None


class QuantizedLinear(Quantized, nn.Linear):
    """A frozen `nn.Linear` whose weight is stored in 8 bits (`quantize_frozen` swaps the class in place)."""


class QuantizedConv1d(Quantized, nn.Conv1d):
    """A frozen `nn.Conv1d` whose weight is stored in 8 bits."""


class QuantizedConv2d(Quantized, nn.Conv2d):
    """A frozen `nn.Conv2d` whose weight is stored in 8 bits."""


_QUANTIZED = {nn.Linear: QuantizedLinear, nn.Conv1d: QuantizedConv1d, nn.Conv2d: QuantizedConv2d}


def storage(quantization: Quantization) -> Callable[[Tensor], Tensor]:
    """How ``quantization`` stores a weight (one scale per output channel), or a message that says what to install
    or choose; callers check it before loading a model."""
    if quantization not in get_args(Quantization):
        raise ValueError(f"quantization={quantization!r}: lycoris stores a frozen base as 'int8' or 'float8' "
                         "(weight-only, one scale per output channel)")
    try:
        from torchao.quantization import Float8Tensor, Int8Tensor
        from torchao.quantization.granularity import PerAxis
    except ImportError as error:
        raise ImportError("an 8-bit frozen base needs torchao: pip install 'lycoflow[quantize]' (or torchao)") \
            from error
    if quantization == "int8":
        return lambda weight: Int8Tensor.from_hp(weight, PerAxis(0))
    # The lower bound on a channel's largest weight: torchao's float8 scale of an all-zero channel is 0, and its
    # weights 0/0 = NaN (int8's scale has a floor of its own).
    return lambda weight: Float8Tensor.from_hp(weight, torch.float8_e4m3fn, PerAxis(0), hp_value_lb=1e-12)


def quantize_frozen(model: nn.Module, quantization: Quantization = "int8") -> int:
    """Store the weights of ``model``'s frozen Linear and (zero-padded) convolution layers in 8 bits (``int8`` or
    ``float8``), in place, before adapters are attached; returns how many layers were quantized. Layers of other
    types (norms, embeddings), subclasses of these, and layers with a trainable weight stay as they are. The
    dequantised dtype is the weight's dtype before (``weight_dtype``).

    Needs torchao (``pip install 'lycoflow[quantize]'``)."""
    store = storage(quantization)
    count = 0
    for layer in model.modules():
        kind = _QUANTIZED.get(type(layer))
        if kind is None or layer.weight.requires_grad or getattr(layer, "padding_mode", "zeros") != "zeros" \
                or isinstance(getattr(layer, "padding", 0), str):
            continue
        if "forward" in layer.__dict__:
            raise RuntimeError(f"quantize the frozen base before attaching adapters: {layer} already has one")
        with torch.no_grad():
            weight = store(layer.weight.detach())
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.__class__ = kind
        count += 1
    return count
