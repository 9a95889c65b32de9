"""model.activation_checkpointing changes memory, not numbers.

For each backbone family (the tiny CNN, torchvision's DenseNets and ResNets, efficientnet-pytorch,
timm), one training step with checkpointing gives exactly (torch.equal) the gradients,
BatchNorm running statistics, loss and RNG state of the same step without it, and the memory
plan's activation figure drops. A stage with it trains to the same weights.
"""
import copy
import dataclasses
import importlib.util

import pytest
import torch

from rcic.config import ModelConfig, Recipe, training_fields
from rcic.memory import measure_steps
from rcic.models import create_loss, create_model

from helpers import assert_same_weights, stage, stage_here

HAS_TIMM = importlib.util.find_spec("timm") is not None
FAMILIES = ["tiny", "densenet121", "resnet50", "efficientnet-b0",
            pytest.param("timm:resnet18", marks=pytest.mark.skipif(not HAS_TIMM,
                                                                   reason="needs timm"))]


def one_step(backbone, checkpointing):
    """Gradients, buffers, loss and RNG state after one training forward and backward on a
    batch of 2 at 32 px (dropout in the head draws from the RNG, and so does EfficientNet's
    drop-connect inside the checkpointed blocks)."""
    cfg = ModelConfig(backbone=backbone, head="ce+arcface", neck=True, neck_dim=16,
                      dropout=0.3, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = create_model(cfg, num_classes=5, num_cell_types=2, with_pretrained=False).train()
    torch.manual_seed(1)
    x, labels = torch.randn(2, 6, 32, 32), torch.tensor([1, 3])
    loss = create_loss(cfg)(model(x), labels)
    loss.backward()
    return {"grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": dict(model.named_buffers()), "loss": loss.detach(),
            "rng": torch.get_rng_state()}


@pytest.mark.parametrize("backbone", FAMILIES)
def test_a_step_with_checkpointing_equals_one_without(backbone):
    plain, checkpointed = one_step(backbone, False), one_step(backbone, True)
    assert torch.equal(plain["loss"], checkpointed["loss"])
    assert torch.equal(plain["rng"], checkpointed["rng"])
    for kind in ("grads", "buffers"):
        assert plain[kind].keys() == checkpointed[kind].keys()   # same state_dict layout
        for name, value in plain[kind].items():
            assert torch.equal(value, checkpointed[kind][name]), f"{kind} {name} differs"
    # BatchNorm statistics moved (the comparison above is not of untouched buffers)
    start = create_model(ModelConfig(backbone=backbone), 5, 2, with_pretrained=False)
    assert any(not torch.equal(b, plain["buffers"][n]) for n, b in start.named_buffers()
               if b.is_floating_point())


@pytest.mark.parametrize("backbone", FAMILIES)
def test_checkpointing_lowers_the_activations_the_plan_counts(backbone):
    recipe = Recipe()
    recipe.model.backbone = backbone
    recipe.data.image_size = 64
    (plain,), (checkpointed,) = (measure_steps(recipe, [4], on) for on in (False, True))
    assert checkpointed.kept < 0.8 * plain.kept
    # the backward recomputes: on top of what is kept, it needs more than without
    assert checkpointed.peak - checkpointed.kept > plain.peak - plain.kept


def test_the_setting_is_not_a_training_field():
    on = Recipe()
    on.model = dataclasses.replace(on.model, activation_checkpointing=True)
    assert "model.activation_checkpointing" not in training_fields(on)
    assert on.training_hash() == Recipe().training_hash()


def test_a_densenet_stage_with_checkpointing_trains_to_the_same_weights(tiny_data, tmp_path):
    sets = ["model.backbone=densenet121", "data.image_size=32", "data.num_workers=0"]
    plain = stage_here(tiny_data, tmp_path / "plain", "--steps", "3", sets=sets)
    checkpointed = stage_here(tiny_data, tmp_path / "checkpointed", "--steps", "3",
                              sets=[*sets, "model.activation_checkpointing=true"])
    assert plain["global_step"] == checkpointed["global_step"] == 3
    assert_same_weights(tmp_path / "plain", tmp_path / "checkpointed")


@pytest.mark.parametrize("backbone", ["tiny", "resnet50", "efficientnet-b0"])
def test_a_copy_of_the_model_recomputes_its_own_blocks(backbone):
    # The EMA is a deepcopy; the blocks' wrapped forwards must follow the copy, or the copy's
    # backward would run (and train) the original's weights.
    cfg = ModelConfig(backbone=backbone, activation_checkpointing=True)
    model = create_model(cfg, num_classes=5, num_cell_types=2, with_pretrained=False).train()
    twin = copy.deepcopy(model)
    create_loss(cfg)(twin(torch.randn(2, 6, 32, 32)), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.backbone.parameters())


def test_two_processes_with_checkpointing_train_to_the_same_weights(tiny_data, tmp_path):
    # DDP's gradient hooks fire in the recomputing backward too: the all-reduce is unchanged.
    def ddp_stage(out, *sets):
        stage(tiny_data, out, "--gpus", 2, "--steps", 3, sets=["data.num_workers=0", *sets])
    ddp_stage(tmp_path / "plain")
    ddp_stage(tmp_path / "checkpointed", "model.activation_checkpointing=true")
    assert_same_weights(tmp_path / "plain", tmp_path / "checkpointed")
