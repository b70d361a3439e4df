"""Evaluation prompt suites: types, cycling, seeds, evaluation texts (on the quickstart's generated data set)."""

from collections import Counter

import pytest

from lycoflow.data import scan
from lycoflow.evaluation.prompts import ALTER_TEMPLATES, STYLE_TEMPLATES, build_suite, image_seed


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
    assert [p.prompt for p in by_type["style"]][:5] == [t.format("mox azure creature") for t in STYLE_TEMPLATES]
    assert by_type["style"][2].text == "a painting of round blue crowned creature in the style of Vincent Van Gogh"


def test_bad_templates_and_types_are_named(concepts_and_captions):
    concepts, captions = concepts_and_captions
    with pytest.raises(ValueError, match="unknown prompt type 'styles'"):
        build_suite(concepts, captions, ["styles"], images=1)
    with pytest.raises(ValueError, match=r"style_templates: 'a sketch' must contain '\{\}' exactly once"):
        build_suite(concepts, captions, ["style"], images=1, style_templates=["a sketch"])
