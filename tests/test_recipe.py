import json

import pytest

from angel_compile.errors import RecipeError
from angel_compile.recipe import PassSpec, Recipe, builtin_recipes, load_recipe


def test_builtin_recipes_load_and_validate():
    recipes = builtin_recipes()
    assert {"none", "int8-weight-only"} <= set(recipes)
    assert [p.name for p in recipes["int8-weight-only"].passes] == ["int8_weight_only"]
    assert recipes["none"].passes == ()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    recipe = Recipe(
        name="mine",
        description="int8 except the head",
        passes=(PassSpec("int8_weight_only", {"exclude": ("lm_head", "layers.0.*")}),),
    )
    path = tmp_path / f"recipe{suffix}"
    recipe.save(path)
    loaded = load_recipe(path)
    assert loaded.to_dict() == recipe.to_dict()
    assert load_recipe(str(path)).to_dict() == recipe.to_dict()
    assert loaded.build_passes()[0].exclude == ("lm_head", "layers.0.*")


def test_round_trip_through_strings():
    recipe = load_recipe("int8-weight-only")
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    import yaml

    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_load_accepts_recipe_objects_mappings_and_none():
    recipe = load_recipe("int8-weight-only")
    assert load_recipe(recipe) is recipe
    assert load_recipe({"name": "m", "passes": ["int8_weight_only"]}).passes[0].name == "int8_weight_only"
    assert load_recipe(None).passes == ()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "r", "pases": []}, "unknown key(s) ['pases']; accepted keys"),
        ({"name": "r", "passes": [{"name": "int8_wo"}]}, "unknown pass 'int8_wo'; registered passes: ["),
        (
            {"name": "r", "passes": [{"name": "int8_weight_only", "options": {"group": 32}}]},
            "pass 'int8_weight_only' has no option(s) ['group']; accepted options: ['exclude']",
        ),
        (
            {"name": "r", "passes": ["int8_weight_only", "int8_weight_only"]},
            "pass 'int8_weight_only' is named twice",
        ),
        ({"name": "r", "passes": [{"name": "int8_weight_only", "opts": {}}]}, "unknown key(s) ['opts']"),
        ({"name": "r", "version": 7}, "version 7 is not supported (supported: 1)"),
        ({"name": "r", "passes": {"int8_weight_only": {}}}, "'passes' must be a list"),
    ],
)
def test_bad_recipes_name_the_culprit(data, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert message in str(info.value)


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'int9'.*int8-weight-only"):
        load_recipe("int9")
    with pytest.raises(RecipeError, match="cannot be read"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unsupported suffix"):
        Recipe().save(tmp_path / "recipe.toml")
