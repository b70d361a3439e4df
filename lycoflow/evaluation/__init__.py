"""The paper's evaluation of a checkpoint (§4–§5.2): prompt suites, sampling, measuring, the metrics table.

Modules, bottom to top (each imports only from those before it):

- ``prompts``: the prompt suites of each (sub)class and prompt type, with their seeds (:func:`build_suite`).
- ``sampling``: text-to-image sampling with the adapters attached (:class:`Sampler`, `sample`).
- ``images``: the suite's images on disk (8-bit PNGs) and where each one goes.
- ``protocol``: what is generated and measured how: :class:`PaperProtocol` (the paper's), :class:`GenericProtocol`,
  :class:`ToyWorldProtocol`.
- ``measuring``: generating a rank's share of the suite, its records, the metric values (:data:`COMPUTATIONS`).
- ``table``: ``metrics.csv`` and its ``config`` column (:func:`config_id`).
- ``evaluator``: :class:`Evaluator`, one checkpoint's evaluation, and its :class:`EvaluationResult`.
"""

from .evaluator import EvaluationResult, Evaluator
from .images import load_png, quantize, save_png
from .measuring import COMPUTATIONS, MetricEncoders, Record
from .prompts import (
    ALTER_TEMPLATES,
    GENERIC_STYLE_TEMPLATES,
    PROMPT_TYPES,
    STYLE_TEMPLATES,
    EvalPrompt,
    PromptType,
    build_suite,
    clip_text,
)
from .protocol import GenericProtocol, PaperProtocol, Protocol, ToyWorldProtocol
from .sampling import Sampler, adapters_off, sample
from .table import config_id, write_metrics

__all__ = [
    "ALTER_TEMPLATES", "COMPUTATIONS", "GENERIC_STYLE_TEMPLATES", "PROMPT_TYPES", "STYLE_TEMPLATES", "EvalPrompt",
    "EvaluationResult", "Evaluator", "GenericProtocol", "MetricEncoders", "PaperProtocol", "PromptType", "Protocol",
    "Record", "Sampler", "ToyWorldProtocol", "adapters_off", "build_suite", "clip_text", "config_id", "load_png",
    "quantize", "sample", "save_png", "write_metrics",
]
