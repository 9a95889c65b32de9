"""Optimizers, per-step schedules (exact resume through state_dict), EMA, head-only freezing."""
import io
import math

import pytest
import torch

from rcic.config import ModelConfig, OptimConfig
from rcic.errors import UserError
from rcic.models import create_loss, create_model, set_backbone_trainable
from rcic.optim import create_ema, create_optimizer, create_scheduler

MODEL = ModelConfig(neck=True, neck_dim=16)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model(MODEL, num_classes=4, num_cell_types=1)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 6, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)


def train_steps(model, optimizer, scheduler, ema, steps):
    lrs, loss_fn = [], create_loss(MODEL)
    model.train()
    for step in steps:
        x, y = batch(step)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema:
            ema.update_parameters(model)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def roundtrip(obj):
    """Through bytes and back, loaded the safe way a checkpoint is."""
    buffer = io.BytesIO()
    torch.save(obj.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["adam", "adamw", "radam", "sgd"])
def test_every_optimizer_steps_and_biases_are_not_decayed(name):
    model = tiny_model()
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1)
    optimizer = create_optimizer(cfg, model)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    before = model.head.linear.weight.detach().clone()
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=2, total_steps=4)
    train_steps(model, optimizer, scheduler, None, [0])
    assert not torch.equal(before, model.head.linear.weight)


@pytest.mark.parametrize("scheduler", ["none", "cosine", "exponential", "onecycle"])
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(scheduler):
    cfg = OptimConfig(optimizer="radam" if scheduler == "exponential" else "adam",
                      scheduler=scheduler, warmup_steps=2, gamma=0.5, ema_decay=0.9)

    def build():
        model = tiny_model()
        optimizer = create_optimizer(cfg, model)
        return (model, optimizer, create_scheduler(cfg, optimizer, steps_per_epoch=3, total_steps=8),
                create_ema(model, cfg.ema_decay))

    whole = build()
    lrs_whole = train_steps(*whole, range(8))

    first = build()
    lrs_first = train_steps(*first, range(5))
    saved = [roundtrip(part) for part in first]
    second = build()                       # a new process: rebuilt from the recipe, then loaded
    for part, state in zip(second, saved):
        part.load_state_dict(state)
    lrs_second = train_steps(*second, range(5, 8))

    assert lrs_first + lrs_second == lrs_whole
    for a, b in zip(whole[0].state_dict().values(), second[0].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole[3].state_dict().values(), second[3].state_dict().values()):
        assert torch.equal(a, b)


def lr_curve(cfg, steps_per_epoch, total_steps):
    optimizer = create_optimizer(cfg, tiny_model())
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_shapes():
    cosine = lr_curve(OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=4), 5, 20)
    assert cosine[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine[4] == pytest.approx(1.0)
    assert cosine[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:])) and cosine[-1] < 0.01
    # the seeds' ExponentialLR: gamma once per epoch, stepped per optimizer step
    exponential = lr_curve(OptimConfig(lr=1.0, scheduler="exponential", gamma=0.9), 3, 9)
    assert exponential == pytest.approx([1, 1, 1, 0.9, 0.9, 0.9, 0.81, 0.81, 0.81])
    assert lr_curve(OptimConfig(lr=0.1, scheduler="none"), 3, 4) == pytest.approx([0.1] * 4)
    onecycle = lr_curve(OptimConfig(lr=1.0, scheduler="onecycle", warmup_steps=5), 5, 20)
    # the peak comes on the 5th step, where the cosine warm-up also reaches it
    assert max(onecycle) == pytest.approx(1.0) and onecycle.index(max(onecycle)) == 4
    assert onecycle[0] < 0.1 and onecycle[-1] < 1e-3


def test_ema_is_the_exponential_average_of_the_weights():
    model = tiny_model()
    assert create_ema(model, 0.0) is None
    ema = create_ema(model, 0.75)
    optimizer = create_optimizer(OptimConfig(lr=0.1), model)
    scheduler = create_scheduler(OptimConfig(scheduler="none"), optimizer, 1, 3)
    train_steps(model, optimizer, scheduler, ema, [0])
    w1 = model.head.linear.weight.detach().clone()
    torch.testing.assert_close(ema.module.head.linear.weight, w1)     # first update copies
    train_steps(model, optimizer, scheduler, ema, [1])
    w2 = model.head.linear.weight.detach()
    assert not torch.equal(w1, w2)
    torch.testing.assert_close(ema.module.head.linear.weight, 0.75 * w1 + 0.25 * w2)
    # BatchNorm statistics are averaged too, so the EMA model can be evaluated as it is
    bn = [n for n, _ in model.named_buffers() if n.endswith("running_mean")][0]
    assert not torch.equal(dict(ema.module.named_buffers())[bn], torch.zeros(()))
    with pytest.raises(UserError, match="ema_decay"):
        create_ema(model, 1.5)


def test_head_only_epochs_leave_the_backbone_unchanged():
    model = tiny_model()
    cfg = OptimConfig(optimizer="adamw", lr=0.05, weight_decay=0.1)
    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer, 1, 4)
    backbone = [p.detach().clone() for p in model.backbone.parameters()]
    head = model.head.linear.weight.detach().clone()
    set_backbone_trainable(model, False)
    train_steps(model, optimizer, scheduler, None, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(backbone, model.backbone.parameters()))
    assert not torch.equal(head, model.head.linear.weight)
    set_backbone_trainable(model, True)
    train_steps(model, optimizer, scheduler, None, [2])
    assert not all(torch.equal(a, b) for a, b in zip(backbone, model.backbone.parameters()))


def test_unknown_optimizer_and_scheduler_are_user_errors():
    model = tiny_model()
    with pytest.raises(UserError, match="optim.optimizer 'lamb'"):
        create_optimizer(OptimConfig(optimizer="lamb"), model)
    optimizer = create_optimizer(OptimConfig(), model)
    with pytest.raises(UserError, match="optim.scheduler 'step'"):
        create_scheduler(OptimConfig(scheduler="step"), optimizer, 1, 2)
