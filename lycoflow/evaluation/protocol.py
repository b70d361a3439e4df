"""Evaluation protocols: everything around the metric formulas that decides the numbers — which prompts, how many
images each and with which seeds, how dataset images are fitted to the encoder, how diversity is pooled and which
metric is measured on which prompt type.

`PaperProtocol` is the paper's evaluation as its authors' code ran it (its numbers are comparable with the
paper's); `GenericProtocol` is lycoflow's own for data sets that are not the paper's (concept-neutral templates,
per-prompt diversity everywhere). `Protocol` takes every setting, for a protocol of one's own. Each protocol's
``name`` is written into the ``protocol`` column of ``metrics.csv``: the analysis never ranks values measured
under different protocols against each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from ..data import Concept, world
from .prompts import (
    ALTER_TEMPLATES,
    GENERIC_STYLE_TEMPLATES,
    PEOPLE_TEMPLATES,
    PROMPT_TYPES,
    STUFFED_TOY_TEMPLATES,
    STYLE_CONCEPT_TEMPLATES,
    STYLE_TEMPLATES,
    Allocation,
    EvalPrompt,
    PromptType,
    SeedRule,
    build_suite,
)

ReferenceFit = Literal["letterbox", "crop"]


class Protocol:
    """How a checkpoint is evaluated, apart from the sampler and the encoders.

    Args:
        name: what the ``protocol`` column of metrics.csv says.
        prompt_types: which of train, trigger, alter, style, agnostic are generated.
        seed: the first seed (``seeds: sequential``) or the seed hashed with each image's place (``hashed``).
        seeds: ``sequential``: image i of a (concept, prompt type) gets ``seed + i`` (the paper's); ``hashed``: a
            seed from (seed, concept, type, i), different for every image of the suite.
        allocation: how a prompt type's images are spread over its prompts: ``blocks``, consecutive, the first
            ``images mod k`` of k prompts one image longer (the paper's); ``cycle``, prompt 0, 1, …, 0, 1, ….
        alter_templates: alteration templates of the concepts whose category has none in
            ``category_alter_templates`` and whose manifest gives no ``alter_prompts``.
        category_alter_templates: category folder name → its alteration templates.
        style_templates: the style prompts.
        unstyled_categories: categories whose concepts get no style prompts (the paper's styles: a style in the
            style of Monet measures nothing).
        references: how a class's dataset images are fitted to the image encoder's square: ``letterbox``, the whole
            image with black bars (the paper's); ``crop``, the centre square.
        vendi_per_prompt: prompt types whose diversity is the mean of one Vendi score per prompt; the others pool
            all their images into one score (the paper pools train and trigger images, and scores alter per prompt).
        style_loss_prompt_types: prompt types measured by the style loss against the base model's image of the
            same prompt and seed (base images are generated for them).
        style_loss_only: of those, the types measured by nothing else (the paper's style prompts: a style changes
            what fidelity and controllability compare); every other type gets every other metric of
            `lycoflow.metrics.METRICS`, a metric added there too.
    """

    def __init__(self, name: str, prompt_types: Sequence[PromptType], seed: int, seeds: SeedRule,
                 allocation: Allocation, alter_templates: Sequence[str],
                 category_alter_templates: Mapping[str, Sequence[str]], style_templates: Sequence[str],
                 unstyled_categories: Sequence[str], references: ReferenceFit, vendi_per_prompt: Sequence[PromptType],
                 style_loss_prompt_types: Sequence[PromptType], style_loss_only: Sequence[PromptType] = ()) -> None:
        if not name.strip():
            raise ValueError("Protocol: name must be a non-empty string (it labels metrics.csv rows)")
        for where, types in (("prompt_types", prompt_types), ("vendi_per_prompt", vendi_per_prompt),
                             ("style_loss_prompt_types", style_loss_prompt_types),
                             ("style_loss_only", style_loss_only)):
            unknown = [t for t in types if t not in PROMPT_TYPES]
            if unknown:
                raise ValueError(f"Protocol {name}: {where}: unknown prompt type {unknown[0]!r}; choose from "
                                 f"{', '.join(PROMPT_TYPES)}")
        unmeasured = [t for t in style_loss_only if t not in style_loss_prompt_types]
        if unmeasured:
            raise ValueError(f"Protocol {name}: style_loss_only: {unmeasured[0]!r} would be measured by nothing; "
                             "add it to style_loss_prompt_types too")
        self.name = name
        self.prompt_types = list(prompt_types)
        self.seed, self.seeds, self.allocation = seed, seeds, allocation
        self.alter_templates = list(alter_templates)
        self.category_alter_templates = {c: list(t) for c, t in category_alter_templates.items()}
        self.style_templates = list(style_templates)
        self.unstyled_categories = list(unstyled_categories)
        self.references = references
        self.vendi_per_prompt = list(vendi_per_prompt)
        self.style_loss_prompt_types, self.style_loss_only = list(style_loss_prompt_types), list(style_loss_only)

    def measures(self, prompt_type: str, metric: str) -> bool:
        """Whether ``metric`` is reported for the images of ``prompt_type``."""
        if metric == "style_loss":
            return prompt_type in self.style_loss_prompt_types
        return prompt_type not in self.style_loss_only

    def suite(self, concepts: Sequence[Concept], captions: Sequence[Sequence[tuple[str, ...]]], images: int,
              keep_tokens: int = 1) -> list[EvalPrompt]:
        """The prompts to generate: ``images`` per concept and prompt type (`build_suite`)."""
        return build_suite(concepts, captions, self.prompt_types, images, self.seed, keep_tokens,
                           self.alter_templates, self.style_templates, self.category_alter_templates,
                           self.unstyled_categories, self.allocation, self.seeds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


#: The paper's alteration templates by category folder: the names in its authors' evaluation code (``anime``,
#: ``people``, ``stuffed_toy``, ``style``) and in the paper's text. Scenes have one set each, in the manifest.
PAPER_CATEGORY_TEMPLATES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("anime", "anime characters", "people", "movie characters"), PEOPLE_TEMPLATES),
    **dict.fromkeys(("stuffed_toy", "stuffed toys"), STUFFED_TOY_TEMPLATES),
    **dict.fromkeys(("style", "styles"), STYLE_CONCEPT_TEMPLATES),
}
PAPER_UNSTYLED_CATEGORIES = ("style", "styles")


class PaperProtocol(Protocol):
    """The paper's evaluation protocol, as its authors' code ran it: numbers comparable with the paper's.

    Per leaf concept 100 images per prompt type (``images`` of the Evaluation), in consecutive blocks over its
    prompts with seeds 1000, 1001, …: train over its captions, trigger 1 × 100, alter 10 × 10 (people/anime,
    stuffed-toy and style templates by category; a scene's own through its manifest ``alter_prompts``), style
    5 × 20 ("{} in the style of pencil drawing", …; none for style concepts). Reference images letterboxed;
    Vendi pooled over the train and over the trigger images, per prompt for alter; style prompts measured by the
    style loss alone.

    Args:
        category_alter_templates: category folder → alteration templates, when the data set's category folders
            are not named as the paper's (None: `PAPER_CATEGORY_TEMPLATES`).
        unstyled_categories: the categories of style concepts (None: ``style``, ``styles``).
    """

    def __init__(self, category_alter_templates: dict[str, list[str]] | None = None,
                 unstyled_categories: list[str] | None = None) -> None:
        super().__init__(
            "paper", ["train", "trigger", "alter", "style"], seed=1000, seeds="sequential", allocation="blocks",
            alter_templates=ALTER_TEMPLATES,
            category_alter_templates=(PAPER_CATEGORY_TEMPLATES if category_alter_templates is None
                                      else category_alter_templates),
            style_templates=STYLE_TEMPLATES,
            unstyled_categories=PAPER_UNSTYLED_CATEGORIES if unstyled_categories is None else unstyled_categories,
            references="letterbox", vendi_per_prompt=["alter"], style_loss_prompt_types=["style"],
            style_loss_only=["style"],
        )


class GenericProtocol(Protocol):
    """lycoflow's protocol for data sets that are not the paper's: ten concept-neutral alteration templates, the
    paper's five styles phrased as image kinds for every concept, prompts cycled, seeds hashed per image, dataset
    images centre-cropped, Vendi per prompt for every type, every metric but the style loss on every type.

    Args:
        prompt_types: which of train, trigger, alter, style, agnostic (None: the first four).
        alter_templates: content-alteration templates (None: `ALTER_TEMPLATES`); a concept's manifest
            ``alter_prompts`` replace them, its ``prompts`` are added.
        style_templates: style templates (None: `GENERIC_STYLE_TEMPLATES`).
        style_loss_prompt_types: prompt types also measured by the style loss against base-model images (None:
            style).
        unstyled_categories: the categories of style concepts, which get no style prompts (None: none).
        seed: hashed with each image's (concept, type, index) into its seed.
    """

    def __init__(self, prompt_types: list[PromptType] | None = None, alter_templates: list[str] | None = None,
                 style_templates: list[str] | None = None, style_loss_prompt_types: list[PromptType] | None = None,
                 unstyled_categories: list[str] | None = None, seed: int = 0) -> None:
        super().__init__(
            "generic", list(prompt_types or ["train", "trigger", "alter", "style"]), seed=seed, seeds="hashed",
            allocation="cycle",
            alter_templates=ALTER_TEMPLATES if alter_templates is None else alter_templates,
            category_alter_templates={},
            style_templates=GENERIC_STYLE_TEMPLATES if style_templates is None else style_templates,
            unstyled_categories=list(unstyled_categories or []), references="crop", vendi_per_prompt=list(PROMPT_TYPES),
            style_loss_prompt_types=list(style_loss_prompt_types or ["style"]),
        )


class ToyWorldProtocol(GenericProtocol):
    """`GenericProtocol` with prompts in the toy world's words (`lycoflow.data.world`), which the toy base draws
    and the toy encoders read: alterations of background, size and position, and the world's four rendering
    styles, but for the style concepts (category ``styles``, the quickstart's beaded pictures). For the quickstart
    and the toy sweep; ``protocol`` column ``toy-world``.

    Args:
        prompt_types: which of train, trigger, alter, style, agnostic (None: the first four).
        seed: hashed with each image's (concept, type, index) into its seed.
    """

    def __init__(self, prompt_types: list[PromptType] | None = None, seed: int = 0) -> None:
        super().__init__(prompt_types, list(world.ALTER_TEMPLATES), list(world.STYLE_TEMPLATES),
                         unstyled_categories=["styles"], seed=seed)
        self.name = "toy-world"
