"""``dataset.yaml``: what the concepts of a data set are called, how they are captioned and evaluated.

The optional manifest at a data set's root describes its concept folders::

    classes:
      shapes/star:                     # a folder, relative to the root
        trigger: zqx                   # the concept descriptor that starts every caption ...
        class_word: star               # ... followed by the class word: "zqx star, tag1, ..., tagk"
        eval_text: yellow              # replaces the trigger in the text given to CLIP for evaluation
        eval_descriptor: yellow star   # or: what the whole descriptor becomes there ("" deletes it)
        drop_tags: [star, yellow]      # tags tied to the concept, removed from its captions
        prompts: ["{} on a beach"]     # extra evaluation prompts; {} stands for "trigger class_word"
        alter_prompts: ["{} at dawn"]  # the class's alteration prompts, instead of the protocol's templates
        repeats: 3                     # fixed repeats per epoch, instead of balancing
        subclasses:
          red: {trigger: zqx ruby, drop_tags: [red]}   # shapes/star/red; unset fields inherit

Without a manifest each image folder is a class whose name is its trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MANIFEST = "dataset.yaml"
# Manifest fields of one class/subclass entry and the Python type each must have.
ENTRY_FIELDS: dict[str, type] = {
    "trigger": str, "class_word": str, "eval_text": str, "eval_descriptor": str, "drop_tags": list, "prompts": list,
    "alter_prompts": list, "repeats": int,
}


@dataclass(frozen=True)
class Concept:
    """One leaf class: the images of one folder and how to caption and evaluate them.

    ``eval_text`` defaults to the trigger (no replacement); ``prompts`` hold ``{}`` for :attr:`descriptor`.
    ``eval_descriptor``, when set, is what the whole descriptor becomes in the texts given to CLIP (the paper
    replaces object triggers by their noun and deletes character and style descriptors: "" deletes). Its
    ``alter_prompts``, when set, replace the evaluation protocol's alteration templates for this concept (the
    paper's scenes each have their own); ``prompts`` are added to them either way.
    ``repeats`` is None when the concept is balanced, else its fixed repeats per epoch.
    """

    category: str
    class_name: str
    subclass: str
    folder: Path
    trigger: str
    class_word: str = ""
    eval_text: str = ""
    eval_descriptor: str | None = None
    drop_tags: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    alter_prompts: tuple[str, ...] | None = None
    repeats: int | None = None
    images: tuple[Path, ...] = ()

    @property
    def key(self) -> str:
        """``category/class/subclass`` without the empty levels, e.g. ``shapes/star``."""
        return "/".join(p for p in (self.category, self.class_name, self.subclass) if p)

    @property
    def descriptor(self) -> str:
        """What every caption starts with: ``"{trigger} {class word}"``."""
        return f"{self.trigger} {self.class_word}".strip()

    @property
    def evaluated_descriptor(self) -> str:
        """What the descriptor becomes in the texts given to CLIP: ``eval_descriptor``, else the evaluation text
        and the class word."""
        if self.eval_descriptor is not None:
            return self.eval_descriptor
        return f"{self.eval_text} {self.class_word}".strip()


def load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and strictly validate a ``dataset.yaml``.

    Returns ``{folder key: fields}``; subclass entries are flattened to ``"class key/subclass"``. A key may
    also name a category folder, whose fields then apply to every class below it.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable YAML file ({err}); fix its syntax") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with the key 'classes', got {type(data).__name__}")
    for key in data:
        if key != "classes":
            raise ValueError(f"{path}: unknown top-level key {key!r}; the only key is 'classes'")
    classes = data.get("classes") or {}
    if not isinstance(classes, dict):
        raise ValueError(f"{path}: 'classes' must map folder paths to class entries")
    entries: dict[str, dict[str, Any]] = {}
    for key, value in classes.items():
        folder = _clean_key(key, path, "classes")
        fields, subclasses = _parse_entry(value, path, f"classes.{key}", nested=True)
        _add_entry(entries, folder, fields, path)
        for sub, sub_value in subclasses.items():
            where = f"classes.{key}.subclasses.{sub}"
            sub_fields, _ = _parse_entry(sub_value, path, where, nested=False)
            _add_entry(entries, f"{folder}/{_clean_key(sub, path, where)}", sub_fields, path)
    return entries


def _clean_key(key: Any, path: Path, where: str) -> str:
    if not isinstance(key, str) or not key.strip("/ "):
        raise ValueError(f"{path}: {where}: key {key!r} must be a folder path such as 'shapes/star'")
    return key.strip("/ ")


def _add_entry(entries: dict[str, dict[str, Any]], key: str, fields: dict[str, Any], path: Path) -> None:
    if key in entries:
        raise ValueError(f"{path}: folder {key!r} is described twice; merge the two entries")
    entries[key] = fields


def _parse_entry(value: Any, path: Path, where: str, nested: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate one class entry; returns (fields, subclass entries)."""
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {where}: expected a mapping of fields, got {type(value).__name__}")
    allowed = sorted(ENTRY_FIELDS) + (["subclasses"] if nested else [])
    fields: dict[str, Any] = {}
    subclasses: dict[str, Any] = {}
    for key, item in value.items():
        if key == "subclasses" and nested:
            if not isinstance(item, dict):
                raise ValueError(f"{path}: {where}.subclasses: expected a mapping of subfolder names to entries")
            subclasses = item
        elif key not in ENTRY_FIELDS:
            raise ValueError(f"{path}: {where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        else:
            fields[key] = _check_field(key, item, path, where)
    return fields, subclasses


def _check_field(key: str, item: Any, path: Path, where: str) -> Any:
    kind = ENTRY_FIELDS[key]
    if kind is list:
        if isinstance(item, str):
            item = [item]
        if not isinstance(item, list) or not all(isinstance(x, str) for x in item):
            raise ValueError(f"{path}: {where}.{key}: expected a list of strings, got {item!r}")
        return tuple(item)
    if kind is int:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"{path}: {where}.{key}: expected a whole number >= 1, got {item!r}")
        return item
    if not isinstance(item, str) or (key == "trigger" and not item.strip()):
        raise ValueError(f"{path}: {where}.{key}: expected a non-empty string, got {item!r}")
    return item.strip()
