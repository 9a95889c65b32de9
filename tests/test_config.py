"""Recipes: YAML round trip, overrides, the training hash and clear refusals."""
from pathlib import Path

import pytest

from rcic.config import (Recipe, apply_overrides, differing_training_fields, load_recipe,
                         save_recipe)
from rcic.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_default_recipe_is_configs_tiny_cpu():
    assert load_recipe(CONFIGS / "tiny-cpu.yaml").to_dict() == Recipe().to_dict()


def test_yaml_round_trip_and_overrides(tmp_path):
    recipe = apply_overrides(Recipe(), ["optim.lr=3e-4", "data.cell_types=[HUVEC]",
                                        "train.epochs=7"])
    assert recipe.optim.lr == 3e-4 and recipe.data.cell_types == ["HUVEC"]
    save_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml").to_dict() == recipe.to_dict()


def test_training_hash_ignores_run_only_fields():
    base = Recipe()
    run_only = apply_overrides(base, ["data.num_workers=4", "train.checkpoint_every_steps=5"])
    assert run_only.training_hash() == base.training_hash()
    other = apply_overrides(base, ["optim.lr=0.1", "model.head=arcface"])
    assert other.training_hash() != base.training_hash()
    assert differing_training_fields(base, other) == ["model.head", "optim.lr"]


@pytest.mark.parametrize("text, needle", [
    ("optim: {lr: fast}\n", "optim.lr"),
    ("optim: {nope: 1}\n", "optim.nope"),
    ("nonsense: {}\n", "unknown recipe section"),
    ("optim: [1, 2]\n", "must be a mapping"),
    ("optim: {lr: 1\n", "not valid YAML"),
    ("- a\n", "must hold a mapping"),
    ("train: {epochs: 2.5}\n", "train.epochs"),
])
def test_bad_recipes_are_one_clear_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_names_the_fix():
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(Recipe(), ["optim.lr"])
    with pytest.raises(UserError, match="section.field"):
        apply_overrides(Recipe(), ["lr=3"])
