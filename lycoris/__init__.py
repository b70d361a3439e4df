"""lycoris: LyCORIS adapter algorithms for PyTorch models, with files the whole ecosystem reads.

    net = lycoris.LoKr(factor=8, dim=10000, preset="attn-mlp").apply(unet, prefix="lora_unet")
    lycoris.save_file("out.safetensors", {"lora_unet": net})
    nets = lycoris.load_file("out.safetensors", {"lora_unet": unet})

Note: the PyPI package ``lycoris-lora`` installs an import package of the same name; this one replaces it.
"""

from .base import Adapter, Network, Strategy
from .boft import BOFT, BOFTAdapter
from .dylora import DyLoRA, DyLoRAAdapter
from .full import Full, FullAdapter
from .functional import butterfly_factor, factorization
from .glora import GLoRA, GLoRAAdapter
from .ia3 import IA3, IA3Adapter
from .io import ALGORITHMS, load_file, merge_into, save_file
from .loha import LoHa, LoHaAdapter
from .lokr import LoKr, LoKrAdapter
from .lora import LoRA, LoRAAdapter
from .oft import OFT, OFTAdapter
from .targeting import PRESETS

__all__ = [
    "ALGORITHMS", "Adapter", "BOFT", "BOFTAdapter", "DyLoRA", "DyLoRAAdapter", "Full", "FullAdapter", "GLoRA",
    "GLoRAAdapter", "IA3", "IA3Adapter", "LoHa", "LoHaAdapter", "LoKr", "LoKrAdapter", "LoRA", "LoRAAdapter",
    "Network", "OFT", "OFTAdapter", "PRESETS", "Strategy", "butterfly_factor", "factorization", "load_file",
    "merge_into", "save_file",
]
