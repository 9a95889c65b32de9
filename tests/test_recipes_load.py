"""Every shipped recipe loads and builds its model, optimizer and schedule (at 32 px on CPU)."""
import dataclasses
from pathlib import Path

import pytest
import torch

from rcic.config import load_recipe
from rcic.data.layout import N_CONTROL_CLASSES
from rcic.models import create_loss, create_model
from rcic.optim import create_ema, create_optimizer, create_scheduler

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"tiny-cpu", "seed000-densenet121", "seed001-effb5-amsoftmax",
            "seed001-effb5-finetune-huvec", "seed004-resnet50",
            "winners-densenet201-arcface"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_builds_at_tiny_size(path):
    assert path.read_text().startswith("#"), "each recipe says where it comes from"
    recipe = load_recipe(path, ["data.image_size=32", "data.batch_size=2"])
    assert recipe.name == path.stem
    torch.manual_seed(0)
    controls = recipe.data.use_controls or recipe.data.use_test_controls
    num_classes = 8 + (N_CONTROL_CLASSES if controls else 0)
    model = create_model(recipe.model, num_classes, num_cell_types=4)
    optimizer = create_optimizer(recipe.optim, model)
    scheduler = create_scheduler(recipe.optim, optimizer, steps_per_epoch=2,
                                 total_steps=2 * recipe.train.epochs)
    ema = create_ema(model, recipe.optim.ema_decay)
    outputs = model(torch.randn(2, 6, 32, 32), torch.tensor([0, 3]))
    assert model.logits(outputs).shape == (2, num_classes)
    create_loss(recipe.model)(outputs, torch.tensor([1, num_classes - 1])).backward()
    optimizer.step()
    scheduler.step()
    if ema:
        ema.update_parameters(model)


def test_the_fine_tune_starts_from_the_first_step_with_the_same_model():
    first = load_recipe(CONFIGS / "seed001-effb5-amsoftmax.yaml")
    tune = load_recipe(CONFIGS / "seed001-effb5-finetune-huvec.yaml")
    assert tune.data.cell_types == ["HUVEC"] and first.data.cell_types == []
    assert first.name in tune.train.init_from
    same = {f.name for f in dataclasses.fields(first.model)} - {"pretrained"}
    assert {k: getattr(tune.model, k) for k in same} == {k: getattr(first.model, k) for k in same}


def test_the_seed_recipes_say_what_the_seeds_did():
    seed000 = load_recipe(CONFIGS / "seed000-densenet121.yaml")
    assert (seed000.model.backbone, seed000.data.batch_size,
            seed000.data.batch_size * seed000.optim.accumulation_steps) == ("densenet121", 6, 30)
    seed001 = load_recipe(CONFIGS / "seed001-effb5-amsoftmax.yaml")
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
