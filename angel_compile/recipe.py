"""The recipe: which passes run, in which order, with which options.

A recipe is a frozen, versioned value that round-trips through YAML and JSON:

    version: 1
    name: int8-weight-only
    description: Per-channel symmetric int8 weights, activations unchanged.
    passes:
      - name: int8_weight_only
        options: {exclude: ["lm_head"]}

`load_recipe` accepts a built-in name (`angel_compile/recipes/*.yaml`), a path to a `.yaml`,
`.yml` or `.json` file, a mapping of that form, a `Recipe`, or None (no passes).
Validation happens on load: unknown keys, unknown pass names, options a pass does not have
and a pass named twice raise `RecipeError` naming the culprit and what is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from angel_compile.errors import RecipeError

if TYPE_CHECKING:
    from angel_compile.passes.base import Pass

RECIPE_VERSION = 1
_RECIPE_KEYS = ("version", "name", "description", "passes")
_PASS_KEYS = ("name", "options")
_RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: a registered pass name and its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": _plain(self.options)}


@dataclass(frozen=True)
class Recipe:
    """An ordered list of passes with options; see the module docstring for the format."""

    name: str = "custom"
    passes: tuple[PassSpec, ...] = ()
    description: str = ""
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe '{self.name}': version {self.version} is not supported (supported: {RECIPE_VERSION})"
            )
        seen: set[str] = set()
        for spec in self.passes:
            if spec.name in seen:
                raise RecipeError(f"recipe '{self.name}': pass '{spec.name}' is named twice; a pass may appear once")
            seen.add(spec.name)
        # Building the passes validates names and options now rather than at compile time.
        self.build_passes()

    def build_passes(self) -> list[Pass]:
        """Instantiate the recipe's passes (raises RecipeError on unknown names or options)."""
        from angel_compile.passes.base import build_pass

        return [build_pass(spec.name, spec.options, recipe_name=self.name) for spec in self.passes]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping with keys {list(_RECIPE_KEYS)}, got {type(data).__name__}")
        name = str(data.get("name", "custom"))
        unknown = sorted(set(data) - set(_RECIPE_KEYS))
        if unknown:
            raise RecipeError(f"recipe '{name}': unknown key(s) {unknown}; accepted keys: {list(_RECIPE_KEYS)}")
        raw_passes = data.get("passes") or []
        if not isinstance(raw_passes, list):
            raise RecipeError(f"recipe '{name}': 'passes' must be a list of {{name, options}} entries")
        specs = []
        for index, entry in enumerate(raw_passes):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise RecipeError(f"recipe '{name}': passes[{index}] must be a mapping with a 'name' key")
            bad = sorted(set(entry) - set(_PASS_KEYS))
            if bad:
                raise RecipeError(
                    f"recipe '{name}': passes[{index}] ('{entry['name']}') has unknown key(s) {bad}; "
                    f"accepted keys: {list(_PASS_KEYS)}"
                )
            options = entry.get("options") or {}
            if not isinstance(options, Mapping):
                raise RecipeError(f"recipe '{name}': options of pass '{entry['name']}' must be a mapping")
            specs.append(PassSpec(name=str(entry["name"]), options=dict(options)))
        return cls(
            name=name,
            passes=tuple(specs),
            description=str(data.get("description", "")),
            version=int(data.get("version", RECIPE_VERSION)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "passes": [spec.to_dict() for spec in self.passes],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if path.suffix not in _RECIPE_SUFFIXES:
            raise RecipeError(f"recipe file '{path}': unsupported suffix; accepted: {list(_RECIPE_SUFFIXES)}")
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"recipe file '{path}' cannot be read: {exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise RecipeError(f"recipe file '{path}' is not valid {path.suffix[1:].upper()}: {exc}") from exc
        return cls.from_dict(data or {})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix not in _RECIPE_SUFFIXES:
            raise RecipeError(f"recipe file '{path}': unsupported suffix; accepted: {list(_RECIPE_SUFFIXES)}")
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())


def builtin_recipes() -> dict[str, Recipe]:
    """Every built-in recipe, by name (files in `angel_compile/recipes/`)."""
    folder = resources.files("angel_compile") / "recipes"
    recipes = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            recipe = Recipe.from_dict(yaml.safe_load(entry.read_text()))
            recipes[recipe.name] = recipe
    return recipes


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe | None) -> Recipe:
    """Resolve any accepted recipe form to a validated `Recipe` (see module docstring)."""
    if recipe is None:
        return Recipe(name="none")
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, Path) or str(recipe).endswith(_RECIPE_SUFFIXES):
        return Recipe.from_file(recipe)
    if isinstance(recipe, str):
        builtins = builtin_recipes()
        if recipe in builtins:
            return builtins[recipe]
        raise RecipeError(
            f"unknown recipe '{recipe}': not a built-in recipe ({', '.join(sorted(builtins))}) "
            f"nor a path ending in {', '.join(_RECIPE_SUFFIXES)}"
        )
    raise RecipeError(f"a recipe must be a built-in name, a path, a mapping or a Recipe; got {type(recipe).__name__}")


def _plain(value: Any) -> Any:
    """Options as plain lists/dicts so that YAML and JSON write them the same way."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
