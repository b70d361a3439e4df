"""Evaluation prompt suites (paper §4.1 and §5.2): what to generate for each (sub)class.

Prompt types, per leaf concept:

- ``train``: its training captions (``"{trigger} {class word}, tag1, ..."``), cycled over its images in order;
- ``trigger``: the concept descriptor alone (``"{trigger} {class word}"``);
- ``alter``: content-alteration templates (``"{} in a chef's outfit, cooking in a kitchen"``), plus the
  manifest's ``prompts`` of the concept;
- ``style``: style-alteration templates (pencil drawing, watercolor, Van Gogh, Monet, pixel art);
- ``agnostic``: the training captions with the trigger removed (``"{class word}, tag1, ..."``): does the concept
  leak into prompts that do not name it?

``{}`` in a template stands for the descriptor. Each type yields ``images`` prompts per concept, cycling through
its prompt list, each with its own seed derived from (seed, concept, type, index) alone: the same images are
asked for at every epoch and in every run, so checkpoints and configurations are comparable.

Every prompt also carries ``text``, the prompt given to CLIP for controllability: the trigger replaced by the
concept's evaluation text (``suru robot`` → ``robot``), since CLIP does not know made-up trigger words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..data import Concept, build_caption

PromptType = Literal["train", "trigger", "alter", "style", "agnostic"]
PROMPT_TYPES: tuple[PromptType, ...] = ("train", "trigger", "alter", "style", "agnostic")

#: Content alteration: the concept placed in scenes, outfits and situations it was not trained in (paper §5.2).
ALTER_TEMPLATES: tuple[str, ...] = (
    "{} in a chef's outfit, cooking in a kitchen",
    "{} wearing a spacesuit, floating in outer space",
    "{} sitting on a park bench in autumn",
    "{} on a beach at sunset",
    "{} in the snow, in a mountain village",
    "{} reading a book in a library",
    "{} riding a bicycle through a city street",
    "{} under an umbrella in the rain",
    "{} in a medieval castle, wearing armor",
    "{} in a futuristic neon-lit city at night",
)
#: Style alteration: the five styles of the paper.
STYLE_TEMPLATES: tuple[str, ...] = (
    "a pencil drawing of {}",
    "a watercolor painting of {}",
    "a painting of {} in the style of Vincent Van Gogh",
    "a painting of {} in the style of Claude Monet",
    "pixel art of {}",
)


@dataclass(frozen=True)
class EvalPrompt:
    """One image to generate: for which concept and prompt type, from which prompt and seed."""

    category: str
    class_name: str
    subclass: str
    prompt_type: str
    index: int  # position within (concept, prompt type)
    prompt: str  # what the model is given
    text: str  # what CLIP compares the image with: the trigger replaced by the evaluation text
    prompt_id: int  # which distinct prompt of (concept, type) this is: diversity is measured per prompt
    seed: int

    @property
    def key(self) -> str:
        """``category/class[/subclass]``, as in the data set."""
        return "/".join(p for p in (self.category, self.class_name, self.subclass) if p)


def image_seed(seed: int, key: str, prompt_type: str, index: int) -> int:
    """A 63-bit seed from (seed, concept, type, index) alone (SHA-256: stable across processes and runs)."""
    digest = hashlib.sha256(f"{seed}/{key}/{prompt_type}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _descriptor(concept: Concept, trigger: str) -> str:
    return " ".join(p for p in (trigger, concept.class_word) if p)


def concept_prompts(concept: Concept, prompt_type: str, captions: Sequence[tuple[str, ...]], keep_tokens: int = 1,
                    alter_templates: Sequence[str] = ALTER_TEMPLATES,
                    style_templates: Sequence[str] = STYLE_TEMPLATES) -> list[tuple[str, str]]:
    """The distinct (prompt, CLIP text) pairs of one concept and prompt type; ``captions`` are the tag lists
    of its training images, in order."""
    own, evaluated = concept.descriptor, _descriptor(concept, concept.eval_text)
    if prompt_type in ("train", "agnostic"):
        head = own if prompt_type == "train" else concept.class_word
        text_head = evaluated if prompt_type == "train" else concept.class_word
        return [(build_caption(head, tags, keep_tokens), build_caption(text_head, tags, keep_tokens))
                for tags in captions]
    if prompt_type == "trigger":
        return [(own, evaluated)]
    templates = [*alter_templates, *concept.prompts] if prompt_type == "alter" else list(style_templates)
    return [(t.format(own), t.format(evaluated)) for t in templates]


def build_suite(concepts: Sequence[Concept], captions: Sequence[Sequence[tuple[str, ...]]],
                prompt_types: Sequence[str], images: int, seed: int = 0, keep_tokens: int = 1,
                alter_templates: Sequence[str] = ALTER_TEMPLATES,
                style_templates: Sequence[str] = STYLE_TEMPLATES) -> list[EvalPrompt]:
    """``images`` prompts per concept and type, cycling through the type's distinct prompts.

    ``captions[c]`` lists the tag tuples of concept c's training images (used by ``train`` and ``agnostic``).
    """
    for t in prompt_types:
        if t not in PROMPT_TYPES:
            raise ValueError(f"unknown prompt type {t!r}; choose from {', '.join(PROMPT_TYPES)}")
    for name, templates in (("alter_templates", alter_templates), ("style_templates", style_templates)):
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(f"{name}: {template!r} must contain '{{}}' exactly once (where the concept goes)")
    suite = []
    for concept, tags in zip(concepts, captions):
        for prompt_type in prompt_types:
            pairs = concept_prompts(concept, prompt_type, tags, keep_tokens, alter_templates, style_templates)
            if not pairs:
                continue
            for i in range(images):
                prompt, text = pairs[i % len(pairs)]
                suite.append(EvalPrompt(concept.category, concept.class_name, concept.subclass, prompt_type, i,
                                        prompt, text, i % len(pairs), image_seed(seed, concept.key, prompt_type, i)))
    return suite
