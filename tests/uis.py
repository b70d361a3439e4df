"""What ComfyUI and AUTOMATIC1111's built-in Lora extension compute from a LyCORIS file: restated, not imported.

Each function here restates one computation of one UI, in this project's own code, from a reading of that UI's
source (the docstring names the file and function). They are test oracles for ``tests/test_ui_loading.py``: given
one layer's tensors as they lie in a file (suffix → tensor, e.g. ``{"lora_up.weight": ..., "alpha": ...}``), the
layer's original weight W0 (and bias) and the strength the user picked, they return the weight (and bias) that UI
runs with. Neither UI is installed or needed.

Sources read (2026): ComfyUI ``comfy/lora.py`` (``load_lora``, ``calculate_weight``, ``model_lora_keys_unet``,
``model_lora_keys_clip``), ``comfy/utils.py`` (``unet_to_diffusers``) and ``comfy/weight_adapter/*.py``;
AUTOMATIC1111/stable-diffusion-webui ``extensions-builtin/Lora/``: ``network.py`` (``NetworkModule``),
``network_*.py`` (each ``calc_updown``), ``lyco_helpers.py`` and ``networks.py`` (``load_network``,
``network_apply_weights``, ``convert_diffusers_name_to_compvis``).

Restated faithfully, failures included: where a UI raises while patching a layer, both catch the error, log it and
run with the layer unchanged, and so do these functions (`comfy_patch`, `a1111_patch`). Deliberate simplifications,
none of which changes a result: the UIs compute in float32 (ComfyUI's ``intermediate_dtype``, A1111's
``.float().inverse()`` for OFT) and these in the dtype given; device moves and casts are left out; only the key
spellings lycoflow writes are read in full (the other spellings are listed in the registries).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

Tensors = Mapping[str, Tensor]  # one layer's file tensors, by suffix


# ================================================================================================================
# shared helpers (each UI has its own copy of these; they agree)
# ================================================================================================================
def _alpha(t: Tensors) -> float | None:
    """The ``alpha`` a file stores for a layer, as a Python number (both UIs call ``.item()`` on it)."""
    return float(t["alpha"].item()) if "alpha" in t else None


def _tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """W[o, i, ...] = Σ_ab wa[a, o] · core[a, b, ...] · wb[b, i]: LyCORIS' rank-first Tucker factors, contracted
    in the index order both UIs use (ComfyUI ``'i j k l, j r, i p -> p r k l'``, A1111 ``make_weight_cp``)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def _row_norm(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def _column_norm(w: Tensor) -> Tensor:
    return _row_norm(w.transpose(0, 1)).transpose(0, 1)


def _cayley(q: Tensor) -> Tensor:
    """(I+Q)(I−Q)⁻¹ per block (both UIs invert I−Q explicitly, in float32)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rows_by_block(w: Tensor, r: Tensor) -> Tensor:
    """Mix each block of output rows as Rᵀ·W (the einsum ``'k n m, k n ... -> k m ...'`` both UIs use for OFT)."""
    blocks = w.reshape(r.shape[0], r.shape[-1], *w.shape[1:])
    return torch.einsum("knm,kn...->km...", r, blocks).reshape(w.shape)


def _butterfly(w: Tensor, stages: Iterable[Tensor]) -> Tensor:
    """Apply BOFT's butterfly stages to the output rows of ``w`` (rows first), as both UIs do: stage i gathers rows
    2^i·b/2 apart into blocks of b, multiplies each block by its R (R·rows), and puts the rows back."""
    rest = w.shape[1:]
    for i, r in enumerate(stages):
        b = r.shape[-1]
        k = 2**i * (b // 2)
        x = w.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)  # rows (c g k) -> blocks of (c k g)
        x = torch.einsum("bij,bj...->bi...", r, x)
        w = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(w.shape)  # and back
    return w


# ================================================================================================================
# ComfyUI
# ================================================================================================================
class ComfyError(RuntimeError):
    """What ComfyUI catches inside ``calculate_weight`` (it logs "ERROR <name> <key> <error>" and keeps W)."""


def comfy_weight_decompose(dora_scale: Tensor, w0: Tensor, diff: Tensor, scale: float, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/base.py ``weight_decompose``: DoRA for every adapter that has ``dora_scale``.

    W' = W + scale·diff, then W'·m/‖·‖ with the norm chosen by the magnitude's first size: one magnitude per output
    row (``dora_scale.shape[0] == out``) divides by the row norms of the ORIGINAL weight W0, not of W'; otherwise by
    the column norms of W'. eps (the dtype's) is added to the norm. Strength s ≠ 1 gives W0 + s·(W'' − W0).
    (An older ComfyUI, before the per-row branch, always took the column norms of W'.)
    """
    w_calc = w0 + scale * diff
    norm = _row_norm(w0) if dora_scale.shape[0] == w_calc.shape[0] else _column_norm(w_calc)
    w_calc = w_calc * (dora_scale / (norm + torch.finfo(w0.dtype).eps))
    return w_calc if strength == 1.0 else w0 + strength * (w_calc - w0)


def _comfy_add(w0: Tensor, t: Tensors, diff: Tensor, scale: float, strength: float) -> Tensor:
    """The common ending of every ComfyUI ``calculate_weight``: DoRA if the file has it, else W + s·scale·diff."""
    if "dora_scale" in t:
        return comfy_weight_decompose(t["dora_scale"], w0, diff, scale, strength)
    return w0 + (strength * scale) * diff


def comfy_lora(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/lora.py ``LoRAAdapter.calculate_weight`` (LoRA, LoCon, DyLoRA files).

    Scale alpha/rank with rank = ``lora_down.weight.shape[0]`` (1 without alpha). With ``lora_mid.weight`` (Tucker)
    the mid core is first folded into down (down ← (downᵀ·midᵀ)ᵀ, an (r, in, k, k) kernel); then ΔW = up·down.
    """
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    alpha = _alpha(t)
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"]
        folded = down.transpose(0, 1).flatten(1) @ mid.transpose(0, 1).flatten(1)  # (in, r·k·k)
        down = folded.reshape(down.shape[1], down.shape[0], *mid.shape[2:]).transpose(0, 1)
    diff = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    return _comfy_add(w0, t, diff, scale, strength)


def comfy_loha(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/loha.py ``LoHaAdapter.calculate_weight``.

    ΔW = (w1a·w1b) ⊙ (w2a·w2b), each factor pair rebuilt with its Tucker core ``hada_t1``/``hada_t2`` when present;
    scale alpha / ``hada_w1_b.shape[0]``.
    """
    w1a, w1b, w2a, w2b = (t[f"hada_w{i}_{s}"] for i in (1, 2) for s in "ab")
    alpha = _alpha(t)
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    if "hada_t1" in t:
        m1, m2 = _tucker(t["hada_t1"], w1a, w1b), _tucker(t["hada_t2"], w2a, w2b)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return _comfy_add(w0, t, (m1 * m2).reshape(w0.shape), scale, strength)


def comfy_lokr(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/lokr.py ``LoKrAdapter.calculate_weight``.

    w1 = ``lokr_w1`` or ``lokr_w1_a``·``lokr_w1_b``; w2 = ``lokr_w2``, or ``lokr_w2_a``·``lokr_w2_b``, or the Tucker
    product with ``lokr_t2``. The scale is alpha/dim where dim is the rank of the last low-rank block (w2's, else
    w1's); with both blocks full it is 1 whatever alpha says. A 4-d w2 gets w1 unsqueezed to (·,·,1,1), then
    ΔW = kron(w1, w2). The Tucker w2 comes straight from einsum, not made contiguous: where torch.kron rejects
    such a tensor (torch 2.x does, "view size is not compatible"), ComfyUI logs the error and leaves the layer as
    it was; this restatement raises `ComfyError` there (`comfy_patch` then keeps W0, as ComfyUI does).
    """
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    alpha = _alpha(t)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    try:
        diff = torch.kron(w1, w2).reshape(w0.shape)
    except RuntimeError as err:
        raise ComfyError(f"lokr: {err}") from err
    return _comfy_add(w0, t, diff, scale, strength)


def comfy_glora(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/glora.py ``GLoRAAdapter.calculate_weight``.

    Tells the pre-2.0 LyCORIS layout from the current one by the factor shapes (old: ``b2.shape[1] == b1.shape[0]
    == a1.shape[0] == a2.shape[1]``, unless the current layout also fits and the layer is square with rank = out).
    Current layout: ΔW = W0·a1·a2 + b1·b2 (a1: in×r, a2: r×in, b1: out×r, b2: r×in·k·k, all flattened to 2-d),
    scale alpha / rank with rank = a2's first size. Old layout: ΔW = b2·b1 + W0·a2·a1, rank = a1's first size.
    """
    a1_, a2_, b1_, b2_ = (t[f"{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
    old = b2_.shape[1] == b1_.shape[0] == a1_.shape[0] == a2_.shape[1]
    rank = a1_.shape[0]
    if b2_.shape[0] == b1_.shape[1] == a1_.shape[1] == a2_.shape[0] and not (
        old and a2_.shape[0] == w0.shape[0] == w0.shape[1]
    ):
        old, rank = False, a2_.shape[0]
    a1, a2, b1, b2 = (x.flatten(1) for x in (a1_, a2_, b1_, b2_))
    alpha = _alpha(t)
    scale = alpha / rank if alpha is not None else 1.0
    if old:
        diff = (b2 @ b1 + (w0.flatten(1) @ a2) @ a1).reshape(w0.shape)
    else:
        mixed = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w0, a1), a2)
        diff = mixed.reshape(w0.shape) + (b1 @ b2).reshape(w0.shape)
    return _comfy_add(w0, t, diff, scale, strength)


def comfy_oft(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/oft.py ``OFTAdapter.calculate_weight`` (3-d ``oft_blocks``).

    Q = B − Bᵀ, its norm capped at ``alpha`` itself when alpha > 0 (Q·alpha/(‖Q‖+1e-8) once ‖Q‖+1e-8 > alpha);
    R = (I+Q)(I−Q)⁻¹. The rotation is blended by the strength s and the result scaled by s again:
    ΔW = s·(Rᵀ − I)·W0 per block, W = W0 + s·ΔW, so W0 + s²·(RᵀW0 − W0). ``rescale`` is read from the file but
    never used in this (weight-patching) path.
    """
    blocks = t["oft_blocks"]
    alpha = _alpha(t) or 0.0
    q = blocks - blocks.transpose(1, 2)
    if alpha > 0:
        norm = q.norm() + 1e-8
        if norm > alpha:
            q = q * alpha / norm
    r = _cayley(q)
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    diff = _rows_by_block(w0, strength * r - strength * eye)
    return _comfy_add(w0, t, diff, 1.0, strength)


def comfy_boft(w0: Tensor, t: Tensors, strength: float) -> Tensor:
    """ComfyUI comfy/weight_adapter/boft.py ``BOFTAdapter.calculate_weight`` (4-d ``oft_blocks``).

    Q per block, the norm of all of them together capped at ``alpha`` when alpha > 0; R_i by Cayley. At strength
    s ≠ 1 each stage is first blended, R_i ← s·R_i + (1−s)·I; the butterfly product is applied to W0's rows, then
    ``rescale`` (per row) if present; ΔW = result − W0 and W = W0 + s·ΔW.
    """
    blocks = t["oft_blocks"]
    alpha = _alpha(t) or 0.0
    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        norm = q.norm() + 1e-8
        if norm > alpha:
            q = q * alpha / norm
    r = _cayley(q)
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    stages = [ri if strength == 1 else ri * strength + (1 - strength) * eye for ri in r]
    rotated = _butterfly(w0, stages)
    if "rescale" in t:
        rotated = rotated * t["rescale"]
    return _comfy_add(w0, t, rotated - w0, 1.0, strength)


def comfy_diff(w0: Tensor, diff: Tensor, strength: float) -> Tensor:
    """ComfyUI comfy/lora.py ``calculate_weight``, patch type ``"diff"`` (from ``diff``, ``diff_b``, ``w_norm``,
    ``b_norm``): W + s·diff when the shapes agree (a mismatch is logged and the weight left alone)."""
    if diff.shape != w0.shape:
        raise ComfyError(f"diff: shape mismatch {tuple(diff.shape)} != {tuple(w0.shape)}")
    return w0 + strength * diff


def _has(*keys: str) -> Callable[[Tensors], bool]:
    return lambda t: all(k in t for k in keys)


def _any(*keys: str) -> Callable[[Tensors], bool]:
    return lambda t: any(k in t for k in keys)


#: ComfyUI's readers of one layer's keys, in the order ``comfy/lora.py load_lora`` tries them: the adapter classes
#: registered in comfy/weight_adapter/__init__.py (``adapters``: LoRA, LoHa, LoKr, GLoRA, OFT, BOFT; each ``load``
#: classmethod's key test), then the patch types load_lora builds itself (``w_norm``, ``diff``, ``diff_b``,
#: ``set_weight``). There is no (IA)³ reader: an (IA)³ file's ``weight``/``on_input`` keys are logged as
#: "lora key not loaded".
COMFY_READERS: tuple[tuple[str, Callable[[Tensors], bool]], ...] = (
    ("lora", _any("lora_up.weight", "_lora.up.weight", "lora_B.weight", "lora.up.weight", "lora_B",
                  "lora_linear_layer.up.weight", "lora_B.default.weight")),
    ("loha", _has("hada_w1_a")),
    ("lokr", _any("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")),
    ("glora", _has("a1.weight")),
    ("oft", lambda t: "oft_blocks" in t and t["oft_blocks"].dim() == 3),
    ("boft", lambda t: "oft_blocks" in t and t["oft_blocks"].dim() == 4),
    ("w_norm", _has("w_norm")),
    ("diff", _has("diff")),
    ("diff_b", _has("diff_b")),
    ("set_weight", _has("set_weight")),
)

_COMFY_WEIGHT = {"lora": comfy_lora, "loha": comfy_loha, "lokr": comfy_lokr, "glora": comfy_glora,
                 "oft": comfy_oft, "boft": comfy_boft}


def comfy_readers(t: Tensors) -> list[str]:
    """The ComfyUI readers that claim a layer's keys (comfy/lora.py ``load_lora``: it tries every one)."""
    return [name for name, claims in COMFY_READERS if claims(t)]


def comfy_patch(w0: Tensor, b0: Tensor | None, t: Tensors, strength: float) -> tuple[Tensor, Tensor | None]:
    """ComfyUI comfy/lora.py ``load_lora`` + ``calculate_weight``: the (weight, bias) a layer runs with.

    Every reader that claims the keys adds its patch (a later one replaces an earlier one for the same weight);
    a patch whose computation raises is logged and skipped, leaving the weight as it was. The bias is patched by
    ``b_norm`` (read only beside ``w_norm``: ``if w_norm is not None: ... if b_norm is not None``), then by
    ``diff_b``, each a "diff" patch of ``<layer>.bias``.
    """
    w, b = w0.clone(), None if b0 is None else b0.clone()
    patch: Callable[[], Tensor] | None = None
    for name in comfy_readers(t):
        if name in _COMFY_WEIGHT:
            patch = (lambda f: lambda: f(w0, t, strength))(_COMFY_WEIGHT[name])
        elif name in ("w_norm", "diff"):
            patch = (lambda key: lambda: comfy_diff(w0, t[key], strength))(name)
    if patch is not None:
        try:
            w = patch()
        except RuntimeError:  # ComfyError included: logged, weight kept
            w = w0.clone()
    bias_key = "diff_b" if "diff_b" in t else "b_norm" if "w_norm" in t and "b_norm" in t else None
    if b0 is not None and bias_key is not None:
        with contextlib.suppress(ComfyError):  # a shape mismatch is logged and the bias left alone
            b = comfy_diff(b0, t[bias_key], strength)
    return w, b


# -- key names ---------------------------------------------------------------------------------------------------
#: ComfyUI comfy/utils.py: the parameters of one UNet resnet (LDM name → diffusers name), of a Transformer2D
#: wrapper and of one transformer block, as ``unet_to_diffusers`` enumerates them (UNET_MAP_RESNET,
#: UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_BASIC).
_COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                 "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_COMFY_BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def comfy_unet_to_diffusers(config: Mapping[str, object]) -> dict[str, str]:
    """ComfyUI comfy/utils.py ``unet_to_diffusers``: diffusers weight name → LDM (``diffusion_model.``-relative)
    weight name, from ComfyUI's UNet config (``num_res_blocks``, ``channel_mult``, ``transformer_depth``,
    ``transformer_depth_output``, ``transformer_depth_middle``).

    Down level x starts at input block 1 + (num_res_blocks[x]+1)·x: its resnets and, where that input block has
    transformers, attentions; then its downsampler (op). Middle: attention 0 at middle_block.1, resnets at 0 and 2.
    Up level x (num_res_blocks reversed) has num_res_blocks+1 output blocks from (num_res_blocks+1)·x; each takes
    its transformer depth from the END of ``transformer_depth_output``; the last one carries the upsampler, at
    index 1 or 2 as it has an attention.
    """
    res = list(config["num_res_blocks"])
    depth = list(config["transformer_depth"])
    depth_out = list(config["transformer_depth_output"])
    levels = len(config["channel_mult"])
    out: dict[str, str] = {}

    def add(diffusers: str, ldm: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{diffusers}.{kind}"] = f"{ldm}.{kind}"

    def attention(diffusers: str, ldm: str, n: int) -> None:
        for name in _COMFY_ATTENTION:
            add(f"{diffusers}.{name}", f"{ldm}.{name}")
        for block in range(n):
            for name in _COMFY_TRANSFORMER:
                add(f"{diffusers}.transformer_blocks.{block}.{name}", f"{ldm}.transformer_blocks.{block}.{name}")

    for x in range(levels):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            for ldm, diffusers in _COMFY_RESNET.items():
                add(f"down_blocks.{x}.resnets.{i}.{diffusers}", f"input_blocks.{n}.0.{ldm}")
            transformers = depth.pop(0)
            if transformers > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        add(f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
    attention("mid_block.attentions.0", "middle_block.1", int(config.get("transformer_depth_middle") or 0))
    for i, n in enumerate((0, 2)):
        for ldm, diffusers in _COMFY_RESNET.items():
            add(f"mid_block.resnets.{i}.{diffusers}", f"middle_block.{n}.{ldm}")
    res_up = res[::-1]
    for x in range(levels):
        n = (res_up[x] + 1) * x
        last = res_up[x]
        for i in range(last + 1):
            for ldm, diffusers in _COMFY_RESNET.items():
                add(f"up_blocks.{x}.resnets.{i}.{diffusers}", f"output_blocks.{n}.0.{ldm}")
            c = 1
            transformers = depth_out.pop()
            if transformers > 0:
                c = 2
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == last:
                add(f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{c}.conv")
            n += 1
    for diffusers, ldm in _COMFY_BASIC.items():
        add(diffusers, ldm)
    return out


def comfy_unet_config(unet) -> dict[str, object]:
    """The part of ComfyUI's UNet config that ``unet_to_diffusers`` reads, for a diffusers SD-1.x-style UNet.

    Not a restatement: ComfyUI finds these numbers in the checkpoint's state dict (comfy/model_detection.py
    ``detect_unet_config``); here they are read off the diffusers model. ``transformer_depth`` lists each input
    block's transformer count in order; ``transformer_depth_output`` lists the output blocks' in reverse (ComfyUI's
    UNet and ``unet_to_diffusers`` both pop them from the end).
    """
    def count(block, j: int) -> int:
        attentions = getattr(block, "attentions", None) or ()
        return len(attentions[j].transformer_blocks) if j < len(attentions) else 0

    down = [count(block, j) for block in unet.down_blocks for j in range(len(block.resnets))]
    up = [count(block, j) for block in unet.up_blocks for j in range(len(block.resnets))]
    mid = unet.mid_block.attentions[0] if getattr(unet.mid_block, "attentions", None) else None
    return {"num_res_blocks": [len(block.resnets) for block in unet.down_blocks],
            "channel_mult": [None] * len(unet.down_blocks), "transformer_depth": down,
            "transformer_depth_output": up[::-1],
            "transformer_depth_middle": len(mid.transformer_blocks) if mid is not None else 0}


def comfy_model_lora_keys_unet(model_keys: Iterable[str], config: Mapping[str, object]) -> dict[str, str]:
    """ComfyUI comfy/lora.py ``model_lora_keys_unet`` (the SD 1.x part): file layer name → model weight key.

    Every ``diffusion_model.<ldm path>.weight`` of the model is reachable as ``lora_unet_<ldm path, "_">``, and every
    diffusers weight name that `comfy_unet_to_diffusers` knows as ``lora_unet_<diffusers path, "_">`` (and
    ``lycoris_…``) pointing at its LDM weight. The diffusers-attention-processor spellings are left out.
    """
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for diffusers, ldm in comfy_unet_to_diffusers(config).items():
        if diffusers.endswith(".weight"):
            name = diffusers[:-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{name}"] = f"diffusion_model.{ldm}"
            key_map[f"lycoris_{name}"] = f"diffusion_model.{ldm}"
    return key_map


#: ComfyUI comfy/lora.py LORA_CLIP_MAP: the only CLIP layer kinds ``model_lora_keys_clip`` maps by kohya name.
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


def comfy_model_lora_keys_clip(model_keys: Iterable[str]) -> dict[str, str]:
    """ComfyUI comfy/lora.py ``model_lora_keys_clip``, for SD 1.x's CLIP-L (model keys ``clip_l.transformer.…``):
    ``lora_te_text_model_encoder_layers_<b>_<kind>`` (and ``lora_te1_…``) for layers b < 32 and the six kinds of
    `COMFY_CLIP_MAP`, plus the generic ``text_encoders.<key>``."""
    keys = set(model_keys)
    key_map = {f"text_encoders.{k[:-len('.weight')]}": k for k in keys if k.endswith(".weight")}
    for b in range(32):
        for hf, kohya in COMFY_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{hf}.weight"
            if k in keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
    return key_map


# ================================================================================================================
# AUTOMATIC1111 stable-diffusion-webui, extensions-builtin/Lora
# ================================================================================================================
class A1111Module:
    """A1111 extensions-builtin/Lora/network.py ``NetworkModule``: what every module type shares.

    ``dim`` is set by each type (None: no rank); ``calc_scale`` is the file's ``scale`` if any, else alpha/dim when
    both are known, else 1. ``finalize_updown`` reshapes the type's ΔW to W0's shape, multiplies it by the scale,
    applies DoRA when the file has ``dora_scale`` (`apply_weight_decompose`), and multiplies the result (and Δb) by
    the strength: linear in the strength for every algorithm.
    """

    def __init__(self, t: Tensors, strength: float):
        self.t, self.strength = t, strength
        self.dim: int | None = None
        self.alpha = _alpha(t)
        self.scale = float(t["scale"].item()) if "scale" in t else None
        self.dora_scale = t.get("dora_scale")

    def calc_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown: Tensor, w0: Tensor) -> Tensor:
        """A1111 network.py ``NetworkModule.apply_weight_decompose``: m·(W0+ΔW)/‖W0+ΔW‖ − W0, the norm always per
        input COLUMN (no eps), whatever shape ``dora_scale`` has: a per-row (out, 1) magnitude broadcasts against
        the (1, in) norms into an (out, in) factor."""
        merged = w0 + updown
        return merged * (self.dora_scale / _column_norm(merged)) - w0

    def finalize_updown(self, updown: Tensor, w0: Tensor, output_shape, ex_bias: Tensor | None = None):
        """A1111 network.py ``NetworkModule.finalize_updown`` (without the file-``bias`` branch lycoflow never
        writes)."""
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if updown.numel() == w0.numel():
            updown = updown.reshape(w0.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.strength
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, w0)
        return updown * self.strength, ex_bias


class A1111Lora(A1111Module):
    """A1111 extensions-builtin/Lora/network_lora.py ``NetworkModuleLora`` (LoRA, LoCon, DyLoRA; ``lora_A/B`` too).

    dim = ``lora_down.weight.shape[0]``. ``calc_updown``: with ``lora_mid.weight``, the Tucker product
    Σ mid[n, m]·up[i, n]·down[m, j] (lyco_helpers ``rebuild_cp_decomposition``); else up·down reshaped to
    (out, in[, k, k]) (``rebuild_conventional``), keeping only the first ``dyn_dim`` ranks when the prompt gives
    ``<lora:name:s:dyn=N>`` — with the scale still alpha/dim at the FULL rank.
    """

    def __init__(self, t: Tensors, strength: float, dyn_dim: int | None = None):
        super().__init__(t, strength)
        if "lora_up.weight" not in t:  # PEFT spelling, renamed on load
            t = {**t, "lora_up.weight": t["lora_B.weight"], "lora_down.weight": t["lora_A.weight"]}
            self.t = t
        self.dim = t["lora_down.weight"].shape[0]
        self.dyn_dim = dyn_dim

    def calc_updown(self, w0: Tensor):
        up, down = self.t["lora_up.weight"], self.t["lora_down.weight"]
        shape = [up.shape[0], down.shape[1]]
        if "lora_mid.weight" in self.t:
            mid = self.t["lora_mid.weight"]
            updown = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
            shape += list(mid.shape[2:])
        else:
            if down.dim() == 4:
                shape += list(down.shape[2:])
            u, d = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if self.dyn_dim is not None:
                u, d = u[:, : self.dyn_dim], d[: self.dyn_dim]
            updown = (u @ d).reshape(shape)
        return self.finalize_updown(updown, w0, shape)


class A1111Hada(A1111Module):
    """A1111 extensions-builtin/Lora/network_hada.py ``NetworkModuleHada`` (LoHa): dim = ``hada_w1_b.shape[0]``;
    ΔW = (w1a·w1b) ⊙ (w2a·w2b), each pair through its Tucker core when ``hada_t1``/``hada_t2`` are present
    (lyco_helpers ``make_weight_cp``)."""

    def __init__(self, t: Tensors, strength: float):
        super().__init__(t, strength)
        self.dim = t["hada_w1_b"].shape[0]

    def calc_updown(self, w0: Tensor):
        w1a, w1b, w2a, w2b = (self.t[f"hada_w{i}_{s}"] for i in (1, 2) for s in "ab")
        if "hada_t1" in self.t:
            shape = [w1a.shape[1], w1b.shape[1], *self.t["hada_t1"].shape[2:]]
            m1 = _tucker(self.t["hada_t1"], w1a, w1b)
        else:
            shape = [w1a.shape[0], w1b.shape[1], *(w1b.shape[2:] if w1b.dim() == 4 else ())]
            m1 = (w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)).reshape(shape)
        if "hada_t2" in self.t:
            m2 = _tucker(self.t["hada_t2"], w2a, w2b)
        else:
            m2 = (w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)).reshape(shape)
        return self.finalize_updown(m1 * m2, w0, shape)


class A1111Lokr(A1111Module):
    """A1111 extensions-builtin/Lora/network_lokr.py ``NetworkModuleLokr``: dim = ``lokr_w2_b``'s first size,
    else ``lokr_w1_b``'s, else none (scale 1); w1, w2 as in the file (w2 through ``lokr_t2`` when present),
    ΔW = kron(w1 (unsqueezed for a 4-d w2), w2 made contiguous) reshaped to (out, in) or W0's conv shape
    (``make_kron``). (Some older A1111 versions tested ``if self.w1b`` on a tensor, which raises for any
    factored block; the current one tests ``is not None``, restated here.)"""

    def __init__(self, t: Tensors, strength: float):
        super().__init__(t, strength)
        if "lokr_w1_b" in t:
            self.dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            self.dim = t["lokr_w2_b"].shape[0]

    def calc_updown(self, w0: Tensor):
        t = self.t
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        shape = list(w0.shape) if w0.dim() == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
        return self.finalize_updown(updown, w0, shape)


class A1111Full(A1111Module):
    """A1111 extensions-builtin/Lora/network_full.py ``NetworkModuleFull``: ΔW = ``diff``, Δb = ``diff_b``
    (no dim: scale 1)."""

    def calc_updown(self, w0: Tensor):
        return self.finalize_updown(self.t["diff"], w0, self.t["diff"].shape, self.t.get("diff_b"))


class A1111Norm(A1111Module):
    """A1111 extensions-builtin/Lora/network_norm.py ``NetworkModuleNorm`` (built only when both ``w_norm`` and
    ``b_norm`` are present): ΔW = ``w_norm``, Δb = ``b_norm`` (no dim: scale 1), for the GroupNorm/LayerNorm
    layers networks.py patches like any other (``network_GroupNorm_forward``, ``network_LayerNorm_forward``)."""

    def calc_updown(self, w0: Tensor):
        return self.finalize_updown(self.t["w_norm"], w0, self.t["w_norm"].shape, self.t.get("b_norm"))


class A1111Ia3(A1111Module):
    """A1111 extensions-builtin/Lora/network_ia3.py ``NetworkModuleIa3``: ΔW = W0 ⊙ w, with w = ``weight``
    reshaped to a column (one factor per output row) unless ``on_input`` (then broadcast as stored, against W0's
    last dimensions).

    On a Linear both sides work. On a convolution the input-side (1, in, 1, 1) factor broadcasts right, but the
    output-side one becomes (out, 1) and meets W0's trailing (k, k) (or (1, 1)) dimensions: the product fails or
    grows to the wrong shape, the patch raises, and A1111 leaves the layer unchanged.
    """

    def calc_updown(self, w0: Tensor):
        w = self.t["weight"]
        on_input = bool(self.t["on_input"].item())
        shape = [w.shape[0], w0.shape[1]]
        if on_input:
            shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return self.finalize_updown(w0 * w, w0, shape)


class A1111Glora(A1111Module):
    """A1111 extensions-builtin/Lora/network_glora.py ``NetworkModuleGLora``: ΔW = b2·b1 + (W0·a2)·a1, the
    pre-2.0 LyCORIS layout (a2: in×r, a1: r×in, b2: in×r, b1: r×out). No dim is set, so alpha is ignored (scale 1).
    With the current layout (a1: in×r, a2: r×in, b1: out×r, b2: r×in·k·k) the products do not chain, the patch
    raises and the layer is left unchanged."""

    def calc_updown(self, w0: Tensor):
        a1, a2, b1, b2 = (self.t[f"{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
        updown = b2 @ b1 + (w0 @ a2) @ a1
        return self.finalize_updown(updown, w0, [a1.shape[0], b1.shape[1]])


class A1111Oft(A1111Module):
    """A1111 extensions-builtin/Lora/network_oft.py ``NetworkModuleOFT`` (``oft_blocks``: OFT 3-d, BOFT 4-d).

    Scale fixed at 1. The constraint is alpha·out_dim (0 without alpha: no cap): ‖Q‖ is clamped to it, Q scaled by
    (‖Q‖clamped+1e-8)/(‖Q‖+1e-8). OFT: each block of rows becomes RᵀW0; BOFT: the butterfly stages (the strength is
    not folded into them: ``scale = 1.0``). Then ``rescale`` (per row) multiplies the result, ΔW = result − W0,
    and the strength scales ΔW linearly (finalize_updown).
    """

    def calc_updown(self, w0: Tensor):
        blocks = self.t["oft_blocks"]
        alpha = self.alpha or 0.0
        constraint = alpha * w0.shape[0]
        q = blocks - blocks.transpose(-1, -2)
        if constraint != 0:
            norm = q.norm()
            q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
        r = _cayley(q)
        rotated = _butterfly(w0, r) if blocks.dim() == 4 else _rows_by_block(w0, r)
        if "rescale" in self.t:
            rotated = self.t["rescale"].reshape(-1, *[1] * (w0.dim() - 1)) * rotated
        return self.finalize_updown(rotated - w0, w0, w0.shape)


def _a1111_norm(t: Tensors) -> bool:
    return all(k in t for k in ("w_norm", "b_norm"))


#: A1111 extensions-builtin/Lora/networks.py ``module_types``, in its order: the first type whose
#: ``create_module`` accepts a layer's keys builds it (network_lora, network_hada, network_ia3, network_lokr,
#: network_full, network_norm, network_glora, network_oft).
A1111_MODULE_TYPES: tuple[tuple[str, Callable[[Tensors], bool]], ...] = (
    ("lora", lambda t: _has("lora_up.weight", "lora_down.weight")(t) or _has("lora_A.weight", "lora_B.weight")(t)),
    ("hada", _has("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    ("ia3", _has("weight")),
    ("lokr", lambda t: ("lokr_w1" in t or _has("lokr_w1_a", "lokr_w1_b")(t))
     and ("lokr_w2" in t or _has("lokr_w2_a", "lokr_w2_b")(t))),
    ("full", _has("diff")),
    ("norm", _a1111_norm),
    ("glora", _has("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight")),
    ("oft", lambda t: "oft_blocks" in t or "oft_diag" in t),
)

_A1111_CLASSES = {"lora": A1111Lora, "hada": A1111Hada, "ia3": A1111Ia3, "lokr": A1111Lokr, "full": A1111Full,
                  "norm": A1111Norm, "glora": A1111Glora, "oft": A1111Oft}


def a1111_module_type(t: Tensors) -> str | None:
    """The A1111 module type that builds a layer from its keys (networks.py ``load_network``), or None (A1111 then
    raises "Could not find a module type … that would accept those keys" and the whole file fails to load)."""
    return next((name for name, accepts in A1111_MODULE_TYPES if accepts(t)), None)


def a1111_patch(
    w0: Tensor, b0: Tensor | None, t: Tensors, strength: float, dyn_dim: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """A1111 extensions-builtin/Lora/networks.py ``network_apply_weights``: the (weight, bias) a layer runs with.

    W = W0 + updown and b = b0 + Δb from the module's ``calc_updown``; a RuntimeError while computing or adding
    them is logged (debug level) and counted, and the layer keeps its original weights.
    """
    kind = a1111_module_type(t)
    if kind is None:
        raise ValueError(f"A1111 has no module type for keys {sorted(t)}")
    module = A1111Lora(t, strength, dyn_dim) if kind == "lora" else _A1111_CLASSES[kind](t, strength)
    try:
        updown, ex_bias = module.calc_updown(w0)
        w = w0 + updown
        if w.shape != w0.shape:  # Tensor.copy_ into the layer's weight refuses a larger broadcast result
            raise RuntimeError(f"output with shape {tuple(w0.shape)} doesn't match the broadcast shape "
                               f"{tuple(w.shape)}")
        b = b0 if ex_bias is None or b0 is None else b0 + ex_bias
    except RuntimeError:
        return w0.clone(), None if b0 is None else b0.clone()
    return w, b


# -- key names ---------------------------------------------------------------------------------------------------
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert_diffusers_name_to_compvis(key: str, is_sd2: bool = False) -> str:
    """A1111 extensions-builtin/Lora/networks.py ``convert_diffusers_name_to_compvis``: a kohya/diffusers layer name
    → A1111's module name (LDM path with "_"), by fixed SD 1.x/2.x arithmetic: down block d, item j → input block
    1 + 3d + j (two resnets per level assumed), up block u, item j → output block 3u + j, downsampler d → input block
    3 + 3d, upsampler u → output block 2 + 3u (sub-index 1 for u = 0, else 2); conv_in, conv_out, time_embedding
    and the CLIP text-encoder layers by name. Anything else is returned unchanged."""
    m = re.match(r"lora_unet_conv_in(.*)", key)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", key)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        side, block, kind, item, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        rest = _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        index = 1 + block * 3 + item if side == "down" else block * 3 + item
        part = "input_blocks" if side == "down" else "output_blocks"
        return f"diffusion_model_{part}_{index}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        rest = _A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        layer, rest = m[1], m[2]
        if is_sd2:
            rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{layer}_{rest}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"
    return key


def a1111_find_module(name: str, layer_names: set[str], is_sd2: bool = False) -> str | None:
    """A1111 extensions-builtin/Lora/networks.py ``load_network``: the module a file's layer name is applied to,
    or None (the keys are then dropped with a debug-level log only).

    ``layer_names`` is A1111's ``network_layer_mapping``: every module of the checkpoint's text encoder
    (``cond_stage_model.wrapped``, e.g. ``transformer_text_model_…``) and of ``sd_model.model``
    (``diffusion_model_…``), "." replaced by "_". Tried in order: the converted name; without a trailing
    ``_[qkv]_proj``; ``lora_unet`` → ``diffusion_model`` (compvis-named files); ``lora_te1_text_model`` →
    ``0_transformer_text_model`` then ``transformer_text_model``.
    """
    key = a1111_convert_diffusers_name_to_compvis(name, is_sd2)
    if key in layer_names:
        return key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m[1] in layer_names:
        return m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in layer_names else None
    if "lora_te1_text_model" in name:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", replacement)
            if key in layer_names:
                return key
    return None
