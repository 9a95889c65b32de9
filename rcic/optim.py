"""Optimizer, learning-rate schedule and EMA of weights, as a recipe's `optim` section names them.

Everything returned here is a plain torch object whose state_dict round-trips, so a stage
that saves them and the next stage that rebuilds them from the same recipe and loads the
state continues exactly where the first stopped.
"""
import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rcic.errors import UserError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "radam": torch.optim.RAdam, "sgd": torch.optim.SGD}
SCHEDULERS = ("none", "cosine", "exponential", "onecycle")


def parameter_groups(model, weight_decay):
    """Decay weight matrices and kernels; never biases or norm scales (as nanoGPT does).

    Every parameter is listed, frozen or not: a frozen one gets no gradient and is skipped,
    and the optimizer's state_dict keeps one layout before and after the backbone unfreezes.
    """
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(optim_cfg, model):
    """The optimizer for a model already on its device (the device picks the implementation)."""
    name = optim_cfg.optimizer
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optim.optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    kwargs = {"lr": optim_cfg.lr}
    if name == "sgd":
        kwargs["momentum"] = optim_cfg.momentum
    if next(model.parameters()).is_cuda:
        # One kernel for all parameters instead of a Python loop over them; RAdam has no
        # fused version, only the multi-tensor (foreach) one.
        kwargs["fused" if cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
               else "foreach"] = True
    return cls(parameter_groups(model, optim_cfg.weight_decay), **kwargs)


def create_scheduler(optim_cfg, optimizer, steps_per_epoch, total_steps):
    """A scheduler to step once per *optimizer* step (not per batch when accumulating).

    steps_per_epoch and total_steps count optimizer steps. warmup_steps ramps the learning
    rate up linearly for "none", "cosine" and "exponential"; for "onecycle" it is the rising
    phase (torch's default of 30% of the run when 0).
    """
    name, warmup = optim_cfg.scheduler, optim_cfg.warmup_steps
    if name not in SCHEDULERS:
        raise UserError(f"unknown optim.scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if name == "onecycle":
        pct_start = min(warmup / total_steps, 1.0) if warmup else 0.3
        return OneCycleLR(optimizer, max_lr=optim_cfg.lr, total_steps=total_steps,
                          pct_start=pct_start)

    def ramp(step):
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def cosine(step):
        progress = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
        return ramp(step) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def exponential(step):
        # ExponentialLR as the seeds used it: gamma once per epoch, a staircase.
        return ramp(step) * optim_cfg.gamma ** (step // max(1, steps_per_epoch))

    shapes = {"none": ramp, "cosine": cosine, "exponential": exponential}
    return LambdaLR(optimizer, shapes[name])


def create_ema(model, decay):
    """An exponential moving average of the weights, or None when decay is 0.

    Call `ema.update_parameters(model)` after each optimizer step; evaluate `ema.module`.
    BatchNorm buffers are averaged too, so the average model needs no extra pass over data.
    """
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise UserError(f"optim.ema_decay {decay} must be 0 (off) or between 0 and 1, e.g. 0.999")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
