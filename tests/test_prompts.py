"""Evaluation prompt suites: types, cycling, seeds, evaluation texts (on the quickstart's generated data set); the
paper protocol's prompts, allocation, seeds and CLIP texts on a data set of the paper's shape."""

from collections import Counter

import pytest
from PIL import Image

from lycoflow.data import scan
from lycoflow.evaluation import GenericProtocol, PaperProtocol, Protocol
from lycoflow.evaluation.prompts import (
    ALTER_TEMPLATES,
    GENERIC_STYLE_TEMPLATES,
    PEOPLE_TEMPLATES,
    STUFFED_TOY_TEMPLATES,
    STYLE_TEMPLATES,
    allocate,
    build_suite,
    clip_text,
    image_seed,
)


@pytest.fixture(scope="module")
def concepts_and_captions(synthetic_root):
    concepts, samples, _ = scan(synthetic_root)
    captions = [[s.tags for s in samples if s.concept == c] for c in range(len(concepts))]
    return concepts, captions


def test_every_concept_gets_n_images_per_type_with_seeds_fixed_by_concept_type_and_index(concepts_and_captions):
    concepts, captions = concepts_and_captions
    suite = build_suite(concepts, captions, ["train", "trigger", "alter", "style", "agnostic"], images=7, seed=3)
    assert Counter((p.key, p.prompt_type) for p in suite) == {
        (c.key, t): 7 for c in concepts for t in ("train", "trigger", "alter", "style", "agnostic")}
    assert len({p.seed for p in suite}) == len(suite)
    again = build_suite(concepts[::-1], captions[::-1], ["style", "train"], images=7, seed=3)
    seeds = {(p.key, p.prompt_type, p.index): p.seed for p in suite}
    assert all(seeds[(p.key, p.prompt_type, p.index)] == p.seed for p in again)  # independent of what else is asked
    assert image_seed(3, "a/b", "alter", 0) != image_seed(4, "a/b", "alter", 0)


def test_prompts_of_each_type(concepts_and_captions):
    concepts, captions = concepts_and_captions
    c = next(i for i, concept in enumerate(concepts) if concept.key == "creatures/blob/blue")
    blob, tags = concepts[c], captions[c]
    suite = build_suite([blob], [tags], ["train", "trigger", "alter", "style", "agnostic"], images=12)
    by_type = {t: [p for p in suite if p.prompt_type == t] for t in ("train", "trigger", "alter", "style", "agnostic")}
    # The manifest: trigger "mox azure", class word "creature", evaluation text "round blue crowned".
    assert blob.descriptor == "mox azure creature" and blob.eval_text == "round blue crowned"
    assert [p.prompt for p in by_type["trigger"]] == ["mox azure creature"] * 12
    assert {p.text for p in by_type["trigger"]} == {"round blue crowned creature"}
    # train: the training captions in order, cycled; CLIP sees them with the evaluation text.
    assert [p.prompt for p in by_type["train"]][:len(tags)] == [", ".join(["mox azure creature", *t]) for t in tags]
    assert by_type["train"][len(tags)].prompt == by_type["train"][0].prompt
    assert all(p.text.startswith("round blue crowned creature") for p in by_type["train"])
    # agnostic: the same captions without the trigger.
    assert by_type["agnostic"][0].prompt == ", ".join(["creature", *tags[0]])
    # alter: the ten templates, then the class's manifest prompt ("a {} wearing sunglasses").
    alter = [p.prompt for p in by_type["alter"]]
    assert alter[:10] == [t.format("mox azure creature") for t in ALTER_TEMPLATES]
    assert alter[10] == "a mox azure creature wearing sunglasses" and alter[11] == alter[0]
    assert [p.prompt_id for p in by_type["alter"]] == [*range(11), 0]
    assert [p.prompt for p in by_type["style"]][:5] == [t.format("mox azure creature")
                                                        for t in GENERIC_STYLE_TEMPLATES]
    assert by_type["style"][2].text == "a painting of round blue crowned creature in the style of Vincent Van Gogh"


def test_bad_templates_and_types_are_named(concepts_and_captions):
    concepts, captions = concepts_and_captions
    with pytest.raises(ValueError, match="unknown prompt type 'styles'"):
        build_suite(concepts, captions, ["styles"], images=1)
    with pytest.raises(ValueError, match=r"style_templates: 'a sketch' must contain '\{\}' exactly once"):
        build_suite(concepts, captions, ["style"], images=1, style_templates=["a sketch"])


# A data set of the paper's shape: an anime character with outfit subclasses, a stuffed toy, a style, a scene with
# its own alteration prompts (the paper's canal set), each with a few captioned images.
CANAL = [
    "{} surrounded by towering skyscrapers", "{} against a backdrop of snow-capped mountains",
    "{} under a star-filled night sky", "{} in the autumn season with colorful foliage",
    "{} with a hot air balloon drifting all over the sky", "{} with a cobblestone bridge arching over the water",
    "{} with a rustic wooden boat gently floating in the water", "{} with a swan gliding gracefully in the water",
    "{} with the water turned into liquid gold, reflecting the setting sun",
    "{} with the water replaced by a smooth pathway of glowing emeralds",
]
PAPER_SHAPED = {
    "anime/ikamusume/wafc outfit": [["simple background", "armpits"], [], ["day", "beach"]],
    "anime/ikamusume/none": [["smile"], ["open mouth"]],
    "stuffed_toy/plushie_pink": [["indoors", "desk"], ["sitting on box", "table"]],
    "style/vladimir_borovikovsky": [["portrait", "1man"], ["portrait"]],
    "scene/scene_canal": [["water", "boat"]],
}
MANIFEST = """
classes:
  anime/ikamusume:
    trigger: hmv
    eval_descriptor: anime girl
    subclasses:
      wafc outfit: {class_word: "anime girl, wafc outfit"}
      none: {class_word: anime girl}
  stuffed_toy/plushie_pink: {trigger: olis, class_word: stuffed toy, eval_text: pink}
  style/vladimir_borovikovsky: {trigger: sura, class_word: style, eval_descriptor: ""}
  scene/scene_canal:
    trigger: zcnl
    class_word: scene
    eval_descriptor: canal
    alter_prompts:
""" + "".join(f"      - {t!r}\n" for t in CANAL)


@pytest.fixture(scope="module")
def paper_shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-shaped")
    for folder, captions in PAPER_SHAPED.items():
        (root / folder).mkdir(parents=True)
        for i, tags in enumerate(captions):
            Image.new("RGB", (48, 32), (40 * i, 90, 160)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text(", ".join(tags), encoding="utf-8")
    (root / "dataset.yaml").write_text(MANIFEST, encoding="utf-8")
    concepts, samples, _ = scan(root)
    captions = [[s.tags for s in samples if s.concept == c] for c in range(len(concepts))]
    suite = PaperProtocol().suite(concepts, captions, images=100)
    return {(p.key, p.prompt_type): [q for q in suite if (q.key, q.prompt_type) == (p.key, p.prompt_type)]
            for p in suite}


def test_paper_allocation_is_consecutive_blocks_and_seeds_count_from_1000(paper_shaped):
    assert allocate(100, 3, "blocks") == [0] * 34 + [1] * 33 + [2] * 33
    assert allocate(100, 10, "blocks") == [j for j in range(10) for _ in range(10)]
    assert allocate(100, 5, "blocks") == [j for j in range(5) for _ in range(20)]
    assert allocate(5, 3, "cycle") == [0, 1, 2, 0, 1]
    counts = {key: len(prompts) for key, prompts in paper_shaped.items()}
    key = "anime/ikamusume/wafc outfit"
    # Every leaf: 100 images per type of the four; the style concept has no style prompts.
    assert set(counts.values()) == {100} and len(counts) == 5 * 4 - 1
    assert ("style/vladimir_borovikovsky", "style") not in counts
    for prompts in paper_shaped.values():
        assert [p.seed for p in prompts] == list(range(1000, 1100))
        assert [p.index for p in prompts] == list(range(100))
    train = paper_shaped[key, "train"]
    assert [p.prompt_id for p in train] == [0] * 34 + [1] * 33 + [2] * 33
    assert [p.prompt_id for p in paper_shaped[key, "trigger"]] == [0] * 100
    assert [p.prompt_id for p in paper_shaped[key, "alter"]] == [j for j in range(10) for _ in range(10)]
    assert [p.prompt_id for p in paper_shaped[key, "style"]] == [j for j in range(5) for _ in range(20)]


def test_paper_prompts_per_category_and_the_texts_given_to_clip(paper_shaped):
    def distinct(key, prompt_type):
        seen = {}
        for p in paper_shaped[key, prompt_type]:
            seen.setdefault(p.prompt, p.text)
        return list(seen.items())

    outfit = "anime/ikamusume/wafc outfit"
    assert distinct(outfit, "train") == [
        ("hmv anime girl, wafc outfit, simple background, armpits", "anime girl, simple background, armpits"),
        ("hmv anime girl, wafc outfit", "anime girl"),
        ("hmv anime girl, wafc outfit, day, beach", "anime girl, day, beach")]
    assert distinct(outfit, "trigger") == [("hmv anime girl, wafc outfit", "anime girl")]
    assert distinct(outfit, "alter")[0] == ("hmv anime girl, wafc outfit selfie standing under the pink blossoms of "
                                            "a cherry tree", "anime girl selfie standing under the pink blossoms of "
                                            "a cherry tree")
    assert [p for p, _ in distinct(outfit, "alter")] == [t.format("hmv anime girl, wafc outfit")
                                                         for t in PEOPLE_TEMPLATES]
    assert distinct(outfit, "style") == [(t.format("hmv anime girl, wafc outfit"), t.format("anime girl"))
                                         for t in STYLE_TEMPLATES]
    assert distinct(outfit, "style")[0][0] == "hmv anime girl, wafc outfit in the style of pencil drawing"
    assert distinct("anime/ikamusume/none", "trigger") == [("hmv anime girl", "anime girl")]
    # A stuffed toy: its trigger replaced by its noun, the stuffed-toy templates.
    toy = "stuffed_toy/plushie_pink"
    assert distinct(toy, "trigger") == [("olis stuffed toy", "pink stuffed toy")]
    assert distinct(toy, "alter")[:2] == [
        ("olis stuffed toy in grand canyon", "pink stuffed toy in grand canyon"),
        ("olis stuffed toy swimming in a pool", "pink stuffed toy swimming in a pool")]
    assert [p for p, _ in distinct(toy, "alter")] == [t.format("olis stuffed toy") for t in STUFFED_TOY_TEMPLATES]
    # A style: its descriptor deleted, then the stripping rule (a leading "of " goes).
    style = "style/vladimir_borovikovsky"
    assert distinct(style, "alter")[:4] == [
        ("sura style of a city skyline during sunset", "a city skyline during sunset"),
        ("sura style of a bustling marketplace in the 1800s", "a bustling marketplace in the 1800s"),
        ("sura style of a lone tree standing in a vast desert", "a lone tree standing in a vast desert"),
        ("sura style of children flying kites on a breezy day", "children flying kites on a breezy day")]
    assert distinct(style, "train") == [("sura style, portrait, 1man", "portrait, 1man"),
                                        ("sura style, portrait", "portrait")]
    # A scene: its own alteration prompts replace the protocol's, its trigger becomes the plain noun.
    scene = "scene/scene_canal"
    assert distinct(scene, "alter") == [(t.format("zcnl scene"), t.format("canal")) for t in CANAL]
    assert distinct(scene, "trigger") == [("zcnl scene", "canal")]


def test_clip_text_strips_commas_spaces_and_a_leading_of():
    assert clip_text(" of a city skyline during sunset") == "a city skyline during sunset"
    assert clip_text("anime girl, , ") == "anime girl"
    assert clip_text(", portrait, 1man") == "portrait, 1man"
    assert clip_text("offshore rig") == "offshore rig"  # "of" only as a word


def test_the_generic_protocol_is_the_suite_of_before(concepts_and_captions):
    concepts, captions = concepts_and_captions
    generic = GenericProtocol(prompt_types=["train", "trigger", "alter", "style", "agnostic"], seed=3)
    assert generic.suite(concepts, captions, images=7) == build_suite(
        concepts, captions, ["train", "trigger", "alter", "style", "agnostic"], images=7, seed=3)
    assert generic.references == "crop" and generic.vendi_per_prompt == ["train", "trigger", "alter", "style",
                                                                          "agnostic"]
    assert [generic.measures("style", m) for m in ("vendi_score", "style_loss")] == [True, True]
    assert [generic.measures("alter", m) for m in ("vendi_score", "style_loss")] == [True, False]
    paper = PaperProtocol()
    assert (paper.name, paper.references, paper.vendi_per_prompt, paper.seed) == ("paper", "letterbox", ["alter"], 1000)
    assert [paper.measures("style", m) for m in ("image_similarity", "vendi_score", "style_loss")] == [
        False, False, True]
    assert [paper.measures("train", m) for m in ("image_similarity", "vendi_score", "style_loss")] == [
        True, True, False]


def test_bad_protocol_settings_are_named():
    common = dict(seed=0, seeds="hashed", allocation="cycle", alter_templates=ALTER_TEMPLATES,
                  category_alter_templates={}, style_templates=STYLE_TEMPLATES, unstyled_categories=[],
                  references="crop", vendi_per_prompt=[], style_loss_prompt_types=["style"])
    with pytest.raises(ValueError, match="Protocol mine: prompt_types: unknown prompt type 'styles'"):
        Protocol("mine", ["styles"], **common)
    with pytest.raises(ValueError, match="style_loss_only: 'alter' would be measured by nothing"):
        Protocol("mine", ["alter"], **common, style_loss_only=["alter"])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        Protocol(" ", ["alter"], **common)
    with pytest.raises(ValueError, match=r"category_alter_templates\['toys'\]: 'a toy' must contain"):
        build_suite([], [], ["alter"], images=1, category_alter_templates={"toys": ["a toy"]})
