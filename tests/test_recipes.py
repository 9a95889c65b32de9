"""Every recipe in configs/ loads, says what it is, and trains a few steps on the embedded data's
shape (tiny images on CPU).

The big recipes keep their backbone, head, optimizer, schedule and accumulation; only the image
size, batch size and step count shrink so that a CPU runs them in seconds. The per-cell-type
fine-tune starts from the weights its first step just wrote: the two-step training end to end.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rcic.config import load_recipe

from helpers import run_main, stage_main_here

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SMALL = ["data.image_size=32", "data.batch_size=2", "data.num_workers=0", "train.epochs=1"]
FIRST, FINETUNE = "seed001-effb5-amsoftmax", "seed001-effb5-finetune-huvec"


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"tiny-cpu", "seed000-densenet121", FIRST, FINETUNE, "seed004-resnet50",
            "winners-densenet201-arcface"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_says_where_it_comes_from_and_is_named_by_its_file(path):
    assert path.read_text().startswith("#"), "each recipe says where it comes from"
    assert load_recipe(path).name == path.stem


def test_the_fine_tune_starts_from_the_first_step_with_the_same_model():
    first = load_recipe(CONFIGS / f"{FIRST}.yaml")
    tune = load_recipe(CONFIGS / f"{FINETUNE}.yaml")
    assert tune.data.cell_types == ["HUVEC"] and first.data.cell_types == []
    assert first.name in tune.train.init_from
    same = {f.name for f in dataclasses.fields(first.model)} - {"pretrained"}
    assert {k: getattr(tune.model, k) for k in same} == {k: getattr(first.model, k) for k in same}


def test_the_seed_recipes_say_what_the_seeds_did():
    seed000 = load_recipe(CONFIGS / "seed000-densenet121.yaml")
    assert (seed000.model.backbone, seed000.data.batch_size,
            seed000.data.batch_size * seed000.optim.accumulation_steps) == ("densenet121", 6, 30)
    seed001 = load_recipe(CONFIGS / f"{FIRST}.yaml")
    assert (seed001.model.backbone, seed001.model.head, seed001.optim.optimizer,
            seed001.optim.scheduler, seed001.optim.freeze_backbone_epochs) == (
        "efficientnet-b5", "amsoftmax", "radam", "exponential", 1)
    seed004 = load_recipe(CONFIGS / "seed004-resnet50.yaml")
    assert (seed004.model.backbone, seed004.optim.optimizer, seed004.optim.scheduler) == (
        "resnet50", "adam", "exponential")
    winners = load_recipe(CONFIGS / "winners-densenet201-arcface.yaml")
    assert (winners.model.head, winners.optim.scheduler, winners.data.use_controls,
            winners.model.cell_type_onehot) == ("ce+arcface", "cosine", True, True)
    # shipped recipes never point at weights a fresh machine lacks: nothing downloads
    for path in RECIPES:
        assert load_recipe(path).model.pretrained == ""


def run_recipe(config, data, out, *sets):
    """Two steps of a recipe, in this process (its budget counting from now); they must write
    finite weights."""
    status = run_main(stage_main_here, ["--config", config, "--data", data, "--out", out,
                                        "--budget", "10m", "--steps", "2", "--quiet",
                                        "--set", *SMALL, *sets])
    assert status == 0
    report = json.loads((out / "stage.json").read_text())
    assert report["global_step"] == 2 and report["done"] is False
    state = torch.load(out / "weights.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    return report


# The fine-tune's first step runs in the test below, which trains both of its steps.
@pytest.mark.parametrize("config", [p.name for p in RECIPES if p.stem not in (FIRST, FINETUNE)])
def test_recipe_runs_a_few_steps(config, tiny_data, tmp_path):
    run_recipe(CONFIGS / config, tiny_data, tmp_path / "out")


def test_per_cell_type_finetune_starts_from_the_first_step(tiny_data, tmp_path):
    first = tmp_path / "first"
    run_recipe(CONFIGS / f"{FIRST}.yaml", tiny_data, first)
    second = tmp_path / "huvec"
    # HUVEC alone is half the sites: one epoch would be only these two steps
    run_recipe(CONFIGS / f"{FINETUNE}.yaml", tiny_data, second,
               f"train.init_from={first}", "train.epochs=2")
    log = (second / "stage.log").read_text()
    assert f"initialised from {first / 'weights.pt'}" in log
    assert "HUVEC" in open(second / "recipe.yaml").read()
