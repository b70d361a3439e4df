"""lycoris: LyCORIS adapter algorithms for PyTorch models, with files the whole ecosystem reads.

    net = lycoris.LoKr(factor=8, dim=10000, preset="attn-mlp").apply(unet, prefix="lora_unet")
    lycoris.save_file("out.safetensors", {"lora_unet": net})
    nets = lycoris.load_file("out.safetensors", {"lora_unet": unet})

Note: the PyPI package ``lycoris-lora`` installs an import package of the same name; this one replaces it.
"""

from .base import Adapter, Decomposable, Network, Strategy
from .boft import BOFT, BOFTAdapter
from .dylora import DyLoRA, DyLoRAAdapter
from .extract import (
    LayerExtraction,
    LayerPair,
    changed_tensors,
    extract_layer,
    layer_pairs,
    lowrank_factors,
    mismatched_tensors,
)
from .full import Full, FullAdapter
from .functional import butterfly_factor, factorization
from .glora import GLoRA, GLoRAAdapter
from .ia3 import IA3, IA3Adapter
from .io import ALGORITHMS, Algorithm, adapter_classes, kohya_metadata, load_file, merge_into, save_file
from .loha import LoHa, LoHaAdapter
from .lokr import LoKr, LoKrAdapter
from .lora import LoRA, LoRAAdapter
from .norm import NormAdapter
from .oft import OFT, OFTAdapter
from .quantize import Quantization, Quantized, quantize_frozen
from .targeting import PRESETS

__all__ = [
    "ALGORITHMS", "Adapter", "Algorithm", "BOFT", "BOFTAdapter", "Decomposable", "DyLoRA", "DyLoRAAdapter", "Full",
    "FullAdapter", "GLoRA", "GLoRAAdapter", "IA3", "IA3Adapter", "LayerExtraction", "LayerPair", "LoHa",
    "LoHaAdapter", "LoKr", "LoKrAdapter", "LoRA", "LoRAAdapter", "Network", "NormAdapter", "OFT", "OFTAdapter",
    "PRESETS", "Quantization", "Quantized", "Strategy", "adapter_classes", "butterfly_factor", "changed_tensors",
    "extract_layer", "factorization", "kohya_metadata", "layer_pairs", "load_file", "lowrank_factors", "merge_into",
    "mismatched_tensors", "quantize_frozen", "save_file",
]
