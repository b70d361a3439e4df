"""Do ComfyUI and A1111 compute, from lycoflow's files, the weight lycoflow trained? Behaviour, not key names.

For every algorithm variant lycoflow writes, a small model (a Linear 16→24, a 3×3 and a 1×1 Conv2d 16→24, and for
the norm variant a GroupNorm and a LayerNorm of 24 channels, float64) gets the variant's adapters with seeded
random, non-neutral parameters (ΔW ≠ 0), is saved with `lycoris.save_file`, and the file's tensors are handed to
restatements of each UI's weight computation (``tests/uis.py``, from the UIs' source). The weight (and bias) the UI
would run with must equal lycoflow's own W0 + s·ΔW (``Adapter.delta_weight``), at strength s = 1 and 0.5.

Cells where a UI computes something else are kept, as ``xfail(strict=True, raises=AssertionError)`` with the
UI's source in the reason, so that a fix on either side fails the suite and the README table gets updated;
any other error (a TypeError from lycoflow, say) still fails. Where a UI has no reader at all, a test asserts
that its registry (restated from source) has none. The key-name tests check that every layer name lycoflow writes
for an SD 1.x UNet and text encoder reaches the right module under each UI's name mapping.

The README's compatibility table is backed by these tests; the test ids name the cells.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import uis  # tests/uis.py (pytest puts tests/ on sys.path: no __init__.py)
from safetensors.torch import load_file as read_tensors
from torch import Tensor, nn

import lycoris
from lycoris.targeting import lycoris_name, supported_layers

LAYERS = ("linear", "conv3x3", "conv1x1")
CONVS = ("conv3x3", "conv1x1")
NORM_LAYERS = ("groupnorm", "layernorm")  # the norm variant's layers (the other variants leave them alone)
STRENGTHS = (1.0, 0.5)
UIS = ("comfyui", "a1111")
PATCH = {"comfyui": uis.comfy_patch, "a1111": uis.a1111_patch}

#: variant → the strategy that writes it (dim/alpha chosen so that alpha/rank ≠ 1 wherever a scale exists).
VARIANTS: dict[str, Callable[[], lycoris.Strategy]] = {
    "lora": lambda: lycoris.LoRA(dim=4, alpha=2),  # LoRA on the Linear, LoCon on the convolutions
    "lora_tucker": lambda: lycoris.LoRA(dim=4, alpha=2, use_tucker=True),  # Tucker on the 3×3 only
    "dylora": lambda: lycoris.DyLoRA(dim=4, alpha=2, block_size=2),
    "loha": lambda: lycoris.LoHa(dim=4, alpha=2),
    "loha_tucker": lambda: lycoris.LoHa(dim=4, alpha=2, use_tucker=True),
    "lokr_full": lambda: lycoris.LoKr(dim=10000, alpha=1),  # the paper's: both blocks full, scale 1
    "lokr_factor2_full": lambda: lycoris.LoKr(dim=10000, factor=2),
    "lokr_lowrank": lambda: lycoris.LoKr(dim=2, alpha=3),  # w2 = w2_a·w2_b
    "lokr_both": lambda: lycoris.LoKr(dim=1, alpha=2, decompose_both=True),  # w1 and w2 low-rank
    "lokr_tucker": lambda: lycoris.LoKr(dim=2, alpha=3, use_tucker=True),  # lokr_t2 on the 3×3
    "glora": lambda: lycoris.GLoRA(dim=4, alpha=2),
    "oft": lambda: lycoris.OFT(dim=4),
    "oft_constrained": lambda: lycoris.OFT(dim=4, constraint=0.5),  # the cap acts in training: ‖Q‖ > 0.5
    "oft_constrained_inactive": lambda: lycoris.OFT(dim=4, constraint=20.0),  # ‖Q‖ < 20: no cap acts
    "oft_rescaled": lambda: lycoris.OFT(dim=4, rescaled=True),
    "boft": lambda: lycoris.BOFT(dim=6),
    "boft_constrained": lambda: lycoris.BOFT(dim=6, constraint=0.5),
    "boft_rescaled": lambda: lycoris.BOFT(dim=6, rescaled=True),
    "ia3": lambda: lycoris.IA3(),
    "ia3_on_input": lambda: lycoris.IA3(train_on_input=True),
    "full": lambda: lycoris.Full(),
    "norm": lambda: lycoris.Full(targets=["*norm"], train_norm=True),  # w_norm/b_norm on the norms only
    "dora_lora": lambda: lycoris.LoRA(dim=4, alpha=2, weight_decompose=True),
    "dora_loha": lambda: lycoris.LoHa(dim=4, alpha=2, weight_decompose=True),
    "dora_lokr": lambda: lycoris.LoKr(dim=2, alpha=3, weight_decompose=True),
    "dora_lora_out": lambda: lycoris.LoRA(dim=4, alpha=2, weight_decompose=True, dora_on_output=True),
    "dora_loha_out": lambda: lycoris.LoHa(dim=4, alpha=2, weight_decompose=True, dora_on_output=True),
    "dora_lokr_out": lambda: lycoris.LoKr(dim=2, alpha=3, weight_decompose=True, dora_on_output=True),
}

#: The reader each UI picks for each variant's keys (None: no reader).
COMFY_READER = {v: "lora" for v in ("lora", "lora_tucker", "dylora", "dora_lora", "dora_lora_out")} | {
    v: "loha" for v in ("loha", "loha_tucker", "dora_loha", "dora_loha_out")} | {
    v: "lokr" for v in VARIANTS if "lokr" in v} | {
    "glora": "glora", "oft": "oft", "oft_constrained": "oft", "oft_constrained_inactive": "oft",
    "oft_rescaled": "oft", "boft": "boft", "boft_constrained": "boft", "boft_rescaled": "boft",
    "ia3": None, "ia3_on_input": None, "full": "diff", "norm": "w_norm"}
A1111_TYPE = {v: {"lora": "lora", "loha": "hada", "diff": "full", "w_norm": "norm"}.get(r, r)
              for v, r in COMFY_READER.items()} | {
    "boft": "oft", "boft_constrained": "oft", "boft_rescaled": "oft", "ia3": "ia3", "ia3_on_input": "ia3"}

# -- what each UI is known to compute differently (source in each reason) ----------------------------------------
COMFY_KRON = ("ComfyUI comfy/weight_adapter/lokr.py LoKrAdapter.calculate_weight: the Tucker w2 from einsum is not "
              "contiguous and torch.kron rejects it ('view size is not compatible'); ComfyUI logs the error and "
              "leaves the 3x3 layer unpatched (A1111's make_kron calls .contiguous() first)")
COMFY_OFT_STRENGTH = ("ComfyUI comfy/weight_adapter/oft.py OFTAdapter.calculate_weight: blends R by the strength "
                      "(s·R − s·I) and scales by s again: W0 + s²·ΔW, not W0 + s·ΔW")
COMFY_OFT_RESCALE = ("ComfyUI comfy/weight_adapter/oft.py OFTAdapter.calculate_weight: reads 'rescale' but never "
                     "applies it (only the bypass path would)")
COMFY_BOFT_STRENGTH = ("ComfyUI comfy/weight_adapter/boft.py BOFTAdapter.calculate_weight: at s != 1 blends every "
                       "butterfly stage R_i -> s·R_i + (1-s)·I, then scales ΔW by s again")
COMFY_DORA_ROW = ("ComfyUI comfy/weight_adapter/base.py weight_decompose: with per-output-row dora_scale it divides "
                  "by the row norms of W0, not of W0+ΔW")
A1111_DORA_ROW = ("A1111 extensions-builtin/Lora/network.py NetworkModule.apply_weight_decompose: always normalises "
                  "per input column, so an (out, 1) dora_scale broadcasts against (1, in) column norms")
A1111_GLORA = ("A1111 extensions-builtin/Lora/network_glora.py NetworkModuleGLora.calc_updown: b2@b1 + (W0@a2)@a1 "
               "is the pre-2.0 LyCORIS layout; with lycoflow's (the current) layout the products do not chain, the "
               "RuntimeError is caught in networks.py network_apply_weights and the layer stays unpatched")
A1111_IA3_CONV = ("A1111 extensions-builtin/Lora/network_ia3.py NetworkModuleIa3.calc_updown: an output-side "
                  "(1, out, 1, 1) weight is reshaped to (out, 1) and broadcast against W0's trailing kernel dims; "
                  "the patch raises and networks.py network_apply_weights leaves the conv unpatched")

def known_difference(ui: str, variant: str, layer: str, strength: float) -> str | None:
    """Why ``ui`` is known to compute another weight for this cell, or None where it must be exact."""
    if variant.endswith("_out") and variant.startswith("dora"):
        return COMFY_DORA_ROW if ui == "comfyui" else A1111_DORA_ROW
    if ui == "comfyui":
        if variant == "lokr_tucker" and layer == "conv3x3":
            return COMFY_KRON
        if variant == "oft_rescaled":
            return COMFY_OFT_RESCALE
        if variant.startswith("oft") and strength != 1:
            return COMFY_OFT_STRENGTH
        if variant.startswith("boft") and strength != 1:
            return COMFY_BOFT_STRENGTH
    else:
        if variant == "glora":
            return A1111_GLORA
        if variant == "ia3" and layer in CONVS:
            return A1111_IA3_CONV
    return None


# -- building the files ------------------------------------------------------------------------------------------
def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.linear = nn.Linear(16, 24)
    model.conv3x3 = nn.Conv2d(16, 24, 3, padding=1)
    model.conv1x1 = nn.Conv2d(16, 24, 1)
    model.groupnorm = nn.GroupNorm(4, 24)
    model.layernorm = nn.LayerNorm(24)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # γ, β off (1, 0), so that a UI replacing them instead of adding would show
        for norm in (model.groupnorm, model.layernorm):
            norm.weight.copy_(1 + 0.2 * torch.randn(24, generator=gen))
            norm.bias.copy_(0.2 * torch.randn(24, generator=gen))
    return model.double()


def variant_layers(variant: str) -> tuple[str, ...]:
    return NORM_LAYERS if variant == "norm" else LAYERS


def randomize(net: lycoris.Network, seed: int) -> None:
    """Every adapter parameter to a seeded random value away from its neutral one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in net.adapters():
            for name, p in adapter.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if name == "dora_scale":  # magnitudes: positive, around ‖W0‖
                    p.mul_(torch.exp(0.3 * noise))
                elif name == "rescale":
                    p.copy_(1 + 0.2 * noise)
                elif name in ("oft_blocks", "diff", "diff_b"):
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(0.5 * noise)


@dataclass
class Layer:
    w0: Tensor
    b0: Tensor | None
    tensors: dict[str, Tensor]  # the layer's keys in the file, by suffix
    delta: Tensor  # lycoflow's ΔW (the layer computes with W0 + s·ΔW)
    delta_bias: Tensor | None
    adapter: lycoris.Adapter


def q_norm(tensors: dict[str, Tensor]) -> float:
    blocks = tensors["oft_blocks"]
    return float((blocks - blocks.transpose(-1, -2)).norm())


def check_file(variant: str, layer: str, built: Layer) -> None:
    """What the variant is meant to write; pytest.fail (not an AssertionError, which an xfail would swallow)."""
    t, w0 = built.tensors, built.w0
    if variant.startswith("dora"):
        out, inp = w0.shape[:2]
        want = (out, *[1] * (w0.dim() - 1)) if variant.endswith("_out") else (1, inp, *[1] * (w0.dim() - 2))
        if tuple(t["dora_scale"].shape) != want:
            pytest.fail(f"{variant}/{layer}: dora_scale has shape {tuple(t['dora_scale'].shape)}, expected {want}")
    if variant.endswith("_constrained"):
        # The trained blocks exceed the cap (so it acts in training); the file holds them as the cap leaves them.
        trained = {"oft_blocks": built.adapter.oft_blocks.detach()}
        if not q_norm(trained) > float(t["alpha"]):
            pytest.fail(f"{variant}/{layer}: ‖Q‖ = {q_norm(trained):.3g} does not exceed the constraint")
        if not q_norm(t) <= float(t["alpha"]) * (1 + 1e-6):
            pytest.fail(f"{variant}/{layer}: the file's ‖Q‖ = {q_norm(t):.3g} is over the constraint")
    if variant == "norm" and set(t) != {"w_norm", "b_norm"}:
        pytest.fail(f"{variant}/{layer}: keys {sorted(t)}, expected the LyCORIS library's w_norm and b_norm")
    if variant == "oft_constrained_inactive" and not q_norm(t) < float(t["alpha"]):
        pytest.fail(f"{variant}/{layer}: ‖Q‖ = {q_norm(t):.3g} is not below the constraint")
    if float(built.delta.abs().max()) < 1e-3:
        pytest.fail(f"{variant}/{layer}: ΔW is (nearly) zero, the comparison would prove nothing")


def build_variant(variant: str, path) -> dict[str, Layer]:
    model = small_model()
    net = VARIANTS[variant]().apply(model, prefix="lora_unet")
    randomize(net, zlib.crc32(variant.encode()))
    net.eval()
    lycoris.save_file(path, {"lora_unet": net})
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in read_tensors(str(path)).items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    adapters = dict(net.named_children())
    layers = {}
    with torch.no_grad():
        for layer in variant_layers(variant):
            name = f"lora_unet_{layer}"
            adapter = adapters[name]
            base = getattr(model, layer)
            db = adapter.delta_bias()
            layers[layer] = Layer(
                w0=base.weight.detach().clone(), b0=None if base.bias is None else base.bias.detach().clone(),
                tensors=groups[name], delta=adapter.delta_weight().detach().clone(),
                delta_bias=None if db is None else db.detach().clone(), adapter=adapter,
            )
    return layers


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui_files")
    cache: dict[str, dict[str, Layer]] = {}

    def get(variant: str) -> dict[str, Layer]:
        if variant not in cache:
            cache[variant] = build_variant(variant, folder / f"{variant}.safetensors")
        return cache[variant]

    return get


# -- the weight each UI computes ---------------------------------------------------------------------------------
def weight_cases():
    for variant in VARIANTS:
        for ui in UIS:
            if ui == "comfyui" and COMFY_READER[variant] is None:
                continue  # no reader: test_ui_has_no_reader
            for layer in variant_layers(variant):
                for strength in STRENGTHS:
                    reason = known_difference(ui, variant, layer, strength)
                    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
                    yield pytest.param(ui, variant, layer, strength, marks=marks,
                                       id=f"{ui}-{variant}-{layer}-s{strength:g}")


@pytest.mark.parametrize(("ui", "variant", "layer", "strength"), list(weight_cases()))
def test_ui_weight(built, ui, variant, layer, strength):
    """The weight (and bias) the UI runs with, from the file, is lycoflow's W0 + s·ΔW (b0 + s·Δb)."""
    lay = built(variant)[layer]
    check_file(variant, layer, lay)
    weight, bias = PATCH[ui](lay.w0, lay.b0, lay.tensors, strength)
    # ComfyUI compares ‖Q‖ + 1e-8 with the cap, so on blocks written at the cap it rescales Q once more, by
    # alpha/(alpha + 1e-8): ΔW moves by ~1e-9 here, far below what a float16/32 UI resolves.
    atol = 1e-8 if variant.endswith("_constrained") else 1e-10
    torch.testing.assert_close(weight, lay.w0 + strength * lay.delta, rtol=1e-9, atol=atol)
    if lay.delta_bias is not None:
        torch.testing.assert_close(bias, lay.b0 + strength * lay.delta_bias, rtol=1e-9, atol=1e-10)
    elif lay.b0 is not None:
        torch.testing.assert_close(bias, lay.b0, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ui_readers(built, variant):
    """Which reader each UI's registry (restated from source) picks for the variant's keys: ComfyUI
    comfy/weight_adapter/__init__.py adapters + comfy/lora.py load_lora; A1111 networks.py module_types."""
    for layer, lay in built(variant).items():
        comfy = uis.comfy_readers(lay.tensors)
        expected = COMFY_READER[variant]
        if expected == "diff":  # Full: the weight's diff, and the bias' diff_b (every layer here has a bias)
            assert comfy == ["diff", "diff_b"], (layer, comfy)
        else:
            assert comfy == ([] if expected is None else [expected]), (layer, comfy)
        assert uis.a1111_module_type(lay.tensors) == A1111_TYPE[variant], layer


@pytest.mark.parametrize("variant", ["ia3", "ia3_on_input"])
def test_ui_has_no_reader(built, variant):
    """ComfyUI reads no (IA)³: none of comfy/weight_adapter/__init__.py ``adapters`` (LoRA, LoHa, LoKr, GLoRA, OFT,
    BOFT) nor comfy/lora.py load_lora's own patch types (w_norm, diff, diff_b, set_weight) claims ``weight`` /
    ``on_input``; ComfyUI logs "lora key not loaded" and the model runs unchanged."""
    for layer, lay in built(variant).items():
        assert set(lay.tensors) == {"weight", "on_input"}, layer
        assert uis.comfy_readers(lay.tensors) == [], layer
        weight, _ = uis.comfy_patch(lay.w0, lay.b0, lay.tensors, 1.0)
        torch.testing.assert_close(weight, lay.w0, rtol=0, atol=0)


# -- DyLoRA at a lower rank --------------------------------------------------------------------------------------
def dylora_at_rank(lay: Layer, rank: int, strength: float) -> Tensor:
    """The weight lycoflow's DyLoRA computes when trained at rank ``rank`` (its training path, α/rank), read off the
    Linear's outputs for the identity input."""
    adapter = lay.adapter
    eye = torch.eye(lay.w0.shape[1], dtype=lay.w0.dtype)
    previous = adapter.multiplier
    adapter.multiplier = strength
    try:
        with torch.no_grad():
            out = adapter._add_bypass(eye, adapter.lora_down.weight[:rank], adapter.lora_up.weight[:, :rank],
                                      float(adapter.alpha) / rank)
    finally:
        adapter.multiplier = previous
    return (out - lay.b0).T


@pytest.mark.parametrize("ui", UIS)
@pytest.mark.parametrize("strength", STRENGTHS)
def test_dylora_truncated_file(built, ui, strength):
    """A DyLoRA file cut to its first b ranks (down[:b], up[:, :b], alpha kept) gives in each UI the adapter
    lycoflow trained at rank b: both scale by alpha / down.shape[0] = alpha/b."""
    lay = built("dylora")["linear"]
    t = dict(lay.tensors)
    t["lora_down.weight"], t["lora_up.weight"] = t["lora_down.weight"][:2], t["lora_up.weight"][:, :2]
    weight, _ = PATCH[ui](lay.w0, lay.b0, t, strength)
    torch.testing.assert_close(weight, dylora_at_rank(lay, 2, strength), rtol=1e-9, atol=1e-10)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "A1111 extensions-builtin/Lora/network_lora.py NetworkModuleLora.calc_updown with <lora:name:s:dyn=b>: "
    "rebuild_conventional keeps the first b ranks but calc_scale stays alpha / full rank, not alpha/b"))
def test_dylora_a1111_dyn_prompt(built):
    lay = built("dylora")["linear"]
    weight, _ = uis.a1111_patch(lay.w0, lay.b0, lay.tensors, 1.0, dyn_dim=2)
    torch.testing.assert_close(weight, dylora_at_rank(lay, 2, 1.0), rtol=1e-9, atol=1e-10)


# -- key names ---------------------------------------------------------------------------------------------------
def sd15_unet_on_meta():
    """SD 1.5's UNet layout (diffusers' defaults are SD 1.x's), parameters on the meta device: no memory, no time."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)


def tiny_unet():
    from lycoflow.tiny import tiny_unet

    return tiny_unet(seed=0)


UNETS = {"sd15": sd15_unet_on_meta, "tiny": tiny_unet}


def written_names(module: nn.Module, prefix: str) -> list[str]:
    """The layer names of the file lycoflow writes for ``module`` with preset "full" (what `lycoris.save_file`
    puts before the first "." of each key)."""
    device = next(module.parameters()).device
    with torch.device(device):
        net = lycoris.LoRA(dim=1, preset="full").apply(module, prefix=prefix)
    try:
        return sorted({key.split(".", 1)[0] for key in net.state_dict()})
    finally:
        net.remove()


def unet_truth(unet) -> dict[str, str]:
    """lycoflow's layer name → the LDM module path (relative to ``diffusion_model.``) it belongs to, from the
    diffusers → LDM rename of lycoflow/tools/convert.py ``unet_to_ldm`` (parameter order is kept)."""
    from lycoflow.tools.convert import UNET_PREFIX, unet_to_ldm

    truth = {}
    for diffusers, ldm in zip(unet.state_dict(), unet_to_ldm(unet)):
        if diffusers.endswith(".weight"):
            truth[lycoris_name("lora_unet", diffusers[: -len(".weight")])] = ldm[len(UNET_PREFIX): -len(".weight")]
    return truth


def a1111_unet_layer_names(ldm_paths) -> set[str]:
    """A1111 networks.py assign_network_names_to_compvis_modules for ``sd_model.model``: every module, "_"-joined."""
    names = set()
    for path in ldm_paths:
        parts = f"diffusion_model.{path}".split(".")
        names |= {"_".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return names


@pytest.mark.parametrize("unet_kind", ["sd15", "tiny"])
def test_unet_keys_comfyui(unet_kind):
    """Every UNet layer lycoflow writes (diffusers names, preset "full") reaches its own LDM weight in ComfyUI:
    comfy/lora.py model_lora_keys_unet through comfy/utils.py unet_to_diffusers."""
    unet = UNETS[unet_kind]()
    truth = unet_truth(unet)
    names = written_names(unet, "lora_unet")
    assert {"lora_unet_mid_block_resnets_0_norm1", "lora_unet_mid_block_attentions_0_norm",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_norm3"} <= set(names)  # full trains norms too
    model_keys = [f"diffusion_model.{ldm}.weight" for ldm in truth.values()]
    key_map = uis.comfy_model_lora_keys_unet(model_keys, uis.comfy_unet_config(unet))
    wrong = {n: key_map.get(n) for n in names if key_map.get(n) != f"diffusion_model.{truth[n]}.weight"}
    assert not wrong, f"{len(wrong)} of {len(names)} miss or hit the wrong weight: {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("unet_kind", [
    "sd15",
    pytest.param("tiny", marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "A1111 extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis hard-codes SD 1.5's two "
        "resnets per level (input block 1 + 3d + j); the tiny UNet has one, so its layers land elsewhere or nowhere"))),
])
def test_unet_keys_a1111(unet_kind):
    """Every UNet layer lycoflow writes reaches its own LDM module in A1111: networks.py load_network
    (convert_diffusers_name_to_compvis, then the fallbacks) against network_layer_mapping."""
    unet = UNETS[unet_kind]()
    truth = unet_truth(unet)
    names = written_names(unet, "lora_unet")
    assert "lora_unet_mid_block_resnets_0_norm1" in names  # full trains norms too
    layer_names = a1111_unet_layer_names(truth.values())
    found = {n: uis.a1111_find_module(n, layer_names) for n in names}
    wrong = {n: m for n, m in found.items() if m != "diffusion_model_" + truth[n].replace(".", "_")}
    assert not wrong, f"{len(wrong)} of {len(names)} miss or hit the wrong module: {dict(list(wrong.items())[:5])}"


def test_text_encoder_keys():
    """Every text-encoder layer lycoflow writes (``lora_te_text_model_encoder_layers_…``) reaches its module in
    ComfyUI (comfy/lora.py model_lora_keys_clip, ``clip_l.transformer.…``) and in A1111 (networks.py
    convert_diffusers_name_to_compvis → ``transformer_text_model_…`` of cond_stage_model.wrapped)."""
    from lycoflow.tiny import tiny_text_encoder

    te = tiny_text_encoder(seed=0)
    canonical = {lycoris_name("lora_te", canon): canon for _, canon, _ in supported_layers(te)}
    names = written_names(te, "lora_te")
    assert names and all(n.startswith("lora_te_text_model_encoder_layers_") for n in names), names[:3]
    comfy = uis.comfy_model_lora_keys_clip(f"clip_l.transformer.{c}.weight" for c in canonical.values())
    layer_names = {"transformer_" + c.replace(".", "_") for c in canonical.values()}
    for n in names:
        assert comfy.get(n) == f"clip_l.transformer.{canonical[n]}.weight", n
        assert uis.a1111_find_module(n, layer_names) == "transformer_" + canonical[n].replace(".", "_"), n
