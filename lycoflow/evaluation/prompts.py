"""Evaluation prompt suites (paper §4.1 and §5.2): what to generate for each (sub)class.

Prompt types, per leaf concept:

- ``train``: its training captions (``"{trigger} {class word}, tag1, ..."``), in order;
- ``trigger``: the concept descriptor alone (``"{trigger} {class word}"``);
- ``alter``: content-alteration templates (``"{} in a chef's outfit, cooking in a kitchen"``): the concept's own
  ``alter_prompts`` from the manifest, else its category's templates, else the default ones; plus the manifest's
  ``prompts`` of the concept;
- ``style``: style-alteration templates (pencil drawing, watercolor, Van Gogh, Monet, pixel art), none for the
  concepts of an unstyled category (the paper's style concepts);
- ``agnostic``: the training captions with the trigger removed (``"{class word}, tag1, ..."``): does the concept
  leak into prompts that do not name it?

``{}`` in a template stands for the descriptor. Each type yields ``images`` prompts per concept, spread over its
prompt list either cycling (prompt 0, 1, 2, 0, ...) or in consecutive blocks (the paper's: the first
``images mod k`` of k prompts get one image more), each with its seed: ``seed + index`` (the paper's) or hashed
from (seed, concept, type, index). Either way the same images are asked for at every epoch and in every run, so
checkpoints and configurations are comparable.

Every prompt also carries ``text``, the prompt given to CLIP for controllability: the descriptor replaced by the
concept's `Concept.evaluated_descriptor` (``suru robot`` → ``robot``; ``"hmv anime girl, wafc outfit"`` →
``"anime girl"``), since CLIP does not know made-up trigger words, then cleaned by `clip_text`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..data import Concept, build_caption

PromptType = Literal["train", "trigger", "alter", "style", "agnostic"]
PROMPT_TYPES: tuple[PromptType, ...] = ("train", "trigger", "alter", "style", "agnostic")

#: Content alteration for data sets that are not the paper's: the concept placed in scenes, outfits and
#: situations it was not trained in.
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
#: Style alteration for data sets that are not the paper's: its five styles, phrased as image kinds.
GENERIC_STYLE_TEMPLATES: tuple[str, ...] = (
    "a pencil drawing of {}",
    "a watercolor painting of {}",
    "a painting of {} in the style of Vincent Van Gogh",
    "a painting of {} in the style of Claude Monet",
    "pixel art of {}",
)

# The paper's prompts, as its authors' evaluation code wrote them (typos included: they are what was measured).
#: The paper's style prompts, for every concept outside its style category.
STYLE_TEMPLATES: tuple[str, ...] = (
    "{} in the style of pencil drawing",
    "{} in the style of watercolor painting",
    "{} in the style of Vincent Van Gogh",
    "{} in the style of Claude Monet",
    "{} in the style of pixel art",
)
#: The paper's alteration prompts for people and anime characters.
PEOPLE_TEMPLATES: tuple[str, ...] = (
    "{} selfie standing under the pink blossoms of a cherry tree",
    "{} in a chef's outfit, cooking in a kitchen",
    "{} paddling a canoe on a tranquil lake",
    "{} playing with their pet dog",
    "{} in an astronaut suit, floating in a spaceship",
    "{} dressed in a a firefighter's outfit, a raging forest fire in the background",
    "{} wearing Victorian-era clothing, reading a book in a classic British library",
    "{} dressed as a knight, riding a horse in a medieval castle",
    "{} kneeling under trees with aurora in the background",
    "{} wearing red dress jumping in the sky in a rainy day",
)
#: The paper's alteration prompts for stuffed toys.
STUFFED_TOY_TEMPLATES: tuple[str, ...] = (
    "{} in grand canyon",
    "{} swimming in a pool",
    "{} sitting at the beach with a view of the sea",
    "{} in times square",
    "{} in front of a medieval castle",
    "{} wearing sunglasses",
    "{} working on the laptop",
    "{} on a boat in the sea",
    "{} wearing headphones",
    "{} lying in the middle of the road",
)
#: The paper's alteration prompts for style concepts ("{}" is e.g. "pgs style").
STYLE_CONCEPT_TEMPLATES: tuple[str, ...] = (
    "{} of a city skyline during sunset",
    "{} of a bustling marketplace in the 1800s",
    "{} of a lone tree standing in a vast desert",
    "{} of children flying kites on a breezy day",
    "{} of a roaring lion in the heart of the jungle",
    "{} of a mountain climber scaling a snowy peak",
    "{} of a dancer lost in the rhythm of music",
    "{} of a quaint countryside cottage surrounded by wildflowers",
    "{} of a serene monk meditating atop a hill",
    "{} of a vintage car speeding along a coastal road",
)

Allocation = Literal["blocks", "cycle"]
SeedRule = Literal["sequential", "hashed"]


@dataclass(frozen=True)
class EvalPrompt:
    """One image to generate: for which concept and prompt type, from which prompt and seed."""

    category: str
    class_name: str
    subclass: str
    prompt_type: str
    index: int  # position within (concept, prompt type)
    prompt: str  # what the model is given
    text: str  # what CLIP compares the image with: the descriptor replaced by its evaluated form (`clip_text`)
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


def clip_text(text: str) -> str:
    """A text as given to CLIP: leading and trailing spaces and commas, then a leading "of ", removed — what is left
    once a descriptor is deleted (the paper's rule: "pgs style of a city skyline" → "a city skyline")."""
    text = text.strip(" ,")
    return text[3:] if text.startswith("of ") else text


def allocate(images: int, prompts: int, allocation: Allocation) -> list[int]:
    """Which prompt (0 … prompts-1) each of ``images`` images gets: cycling through them, or in consecutive blocks
    with the first ``images mod prompts`` one image longer (the paper's)."""
    if allocation == "cycle":
        return [i % prompts for i in range(images)]
    size, longer = divmod(images, prompts)
    return [j for j in range(prompts) for _ in range(size + (j < longer))]


def concept_prompts(concept: Concept, prompt_type: str, captions: Sequence[tuple[str, ...]], keep_tokens: int = 1,
                    alter_templates: Sequence[str] = ALTER_TEMPLATES,
                    style_templates: Sequence[str] = GENERIC_STYLE_TEMPLATES) -> list[tuple[str, str]]:
    """The distinct (prompt, CLIP text) pairs of one concept and prompt type; ``captions`` are the tag lists
    of its training images, in order; ``alter_templates`` are the concept's (its ``prompts`` are added)."""
    own, evaluated = concept.descriptor, concept.evaluated_descriptor
    if prompt_type in ("train", "agnostic"):
        head = own if prompt_type == "train" else concept.class_word
        text_head = evaluated if prompt_type == "train" else concept.class_word
        return [(build_caption(head, tags, keep_tokens), clip_text(build_caption(text_head, tags, keep_tokens)))
                for tags in captions]
    if prompt_type == "trigger":
        return [(own, clip_text(evaluated))]
    templates = [*alter_templates, *concept.prompts] if prompt_type == "alter" else list(style_templates)
    return [(t.format(own), clip_text(t.format(evaluated))) for t in templates]


def _check_templates(name: str, templates: Iterable[str]) -> None:
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"{name}: {template!r} must contain '{{}}' exactly once (where the concept goes)")


def build_suite(concepts: Sequence[Concept], captions: Sequence[Sequence[tuple[str, ...]]],
                prompt_types: Sequence[str], images: int, seed: int = 0, keep_tokens: int = 1,
                alter_templates: Sequence[str] = ALTER_TEMPLATES,
                style_templates: Sequence[str] = GENERIC_STYLE_TEMPLATES,
                category_alter_templates: Mapping[str, Sequence[str]] | None = None,
                unstyled_categories: Collection[str] = (), allocation: Allocation = "cycle",
                seeds: SeedRule = "hashed") -> list[EvalPrompt]:
    """``images`` prompts per concept and type, spread over the type's distinct prompts by ``allocation``.

    ``captions[c]`` lists the tag tuples of concept c's training images (used by ``train`` and ``agnostic``). A
    concept's alteration templates are its manifest ``alter_prompts``, else ``category_alter_templates`` of its
    category, else ``alter_templates``; the concepts of ``unstyled_categories`` get no style prompts.
    """
    for t in prompt_types:
        if t not in PROMPT_TYPES:
            raise ValueError(f"unknown prompt type {t!r}; choose from {', '.join(PROMPT_TYPES)}")
    categories = dict(category_alter_templates or {})
    for name, templates in (("alter_templates", alter_templates), ("style_templates", style_templates),
                            *((f"category_alter_templates[{c!r}]", t) for c, t in categories.items())):
        _check_templates(name, templates)
    suite = []
    for concept, tags in zip(concepts, captions):
        if concept.alter_prompts is not None:
            _check_templates(f"{concept.key}: alter_prompts", concept.alter_prompts)
        _check_templates(f"{concept.key}: prompts", concept.prompts)
        alter = concept.alter_prompts if concept.alter_prompts is not None else categories.get(concept.category,
                                                                                                alter_templates)
        style = () if concept.category in unstyled_categories else style_templates
        for prompt_type in prompt_types:
            pairs = concept_prompts(concept, prompt_type, tags, keep_tokens, alter, style)
            if not pairs:
                continue
            for i, j in enumerate(allocate(images, len(pairs), allocation)):
                prompt, text = pairs[j]
                image = seed + i if seeds == "sequential" else image_seed(seed, concept.key, prompt_type, i)
                suite.append(EvalPrompt(concept.category, concept.class_name, concept.subclass, prompt_type, i,
                                        prompt, text, j, image))
    return suite
