"""lycoflow: fine-tune Stable Diffusion with LyCORIS adapters on PyTorch Lightning, and evaluate the result."""

__version__ = "0.1.0"
