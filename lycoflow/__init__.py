"""lycoflow: fine-tune Stable Diffusion with LyCORIS adapters on PyTorch Lightning, and evaluate the result.

Layout, bottom to top (each package imports only from those above it in this list):
``cache`` (atomic files, the cache folder) → ``models`` (base-model sources, `Components`) → ``tiny`` →
``data`` (data sets, captions, balance, buckets, encoding caches) → ``metrics`` (metric table, functional forms,
encoders) → ``evaluation`` (prompt suites, sampling, the `Evaluator`) → ``module`` (the LightningModule) →
``tools`` / ``analysis`` / ``sweep`` → ``lightning_cli`` → ``cli``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

#: Modules that moved into packages, old name → new name. Old runs' config.yaml files, adapter files' recipes
#: and users' scripts name the old ones; importing an old name gives the module now there (the same object).
MOVED: dict[str, str] = {
    "lycoflow.synthetic": "lycoflow.data.synthetic",
    "lycoflow.encodings": "lycoflow.data.encodings",
    "lycoflow.generation": "lycoflow.evaluation.sampling",
    "lycoflow.prompts": "lycoflow.evaluation.prompts",
    "lycoflow.convert": "lycoflow.tools.convert",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module that replaced it, imported only when asked for."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # already executed, under its new name


sys.meta_path.append(_Moved())


class _ImportNotices(logging.Filter):
    """Drops the notices the optional extras set off at import, about features lycoflow does not use: torchao 0.18
    (the 8-bit base) in torch and diffusers whenever diffusers is imported (registering enums for torch.compile;
    loading torchao-pickled checkpoints through diffusers) and bitsandbytes 0.50 on a CPU (its 4-bit matmul).
    Without this every run's log opens with four warnings."""

    NOTICES = ("is an Enum subclass and is now natively supported by torch.compile",
               "Unable to import `torchao` Tensor objects", "Failed to load CPU gemm_4bit_forward")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in self.NOTICES)


for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).addFilter(_ImportNotices())
