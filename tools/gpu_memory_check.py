"""The memory plan against a measurement: for each recipe in configs/, at its image size and
micro-batch, two optimizer steps as the trainer takes them (its accumulation, AMP, channels
last, optimizer, EMA) on one GPU, torch.cuda.max_memory_allocated beside the plan's peak of a
training step (rcic/memory.py, one GPU: no DDP buckets). The plan passes within 15% of the
measurement; outside that, its allowance (ALLOCATOR_SHARE, CONTEXT_BYTES) needs correcting.

    python tools/gpu_memory_check.py                 # on a machine with a CUDA GPU
    python tools/gpu_memory_check.py --dry           # CPU: configs/tiny-cpu.yaml through the
                                                     # same code, measured by counting storages
Exit status 0 when every recipe is within 15%, 1 otherwise. From another script:
    from gpu_memory_check import check;  ok = check(torch.device("cuda"), print)
"""
import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

from rcic.config import load_recipe
from rcic.data.dataset import Normalizer
from rcic.memory import (CELL_TYPES, GIB, LiveBytes, micro_batch_per_gpu, planned_classes,
                         planned_peak)
from rcic.models import create_loss, create_model
from rcic.optim import create_ema, create_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOLERANCE = 0.15
STEPS = 2               # the second step runs with the optimizer state the first created


def train_steps(recipe, device, micro_batch):
    """STEPS optimizer steps of `micro_batch` random samples as rcic.train.Trainer takes them."""
    on_gpu = device.type == "cuda"
    amp = on_gpu and recipe.optim.amp
    channels_last = on_gpu and recipe.optim.channels_last
    model = create_model(recipe.model, planned_classes(recipe), CELL_TYPES,
                         with_pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(recipe.optim, model)
    ema = create_ema(model, recipe.optim.ema_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    criterion = create_loss(recipe.model)
    normalize = Normalizer(torch.full((1, 6), 10.0), torch.full((1, 6), 5.0)).to(device)
    size, accumulation = recipe.data.image_size, max(1, recipe.optim.accumulation_steps)
    model.train()
    for _ in range(STEPS):
        for _ in range(accumulation):
            images = torch.randint(0, 255, (micro_batch, 6, size, size), dtype=torch.uint8,
                                   device=device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, planned_classes(recipe), (micro_batch,), device=device)
            cell_type = torch.randint(0, CELL_TYPES, (micro_batch,), device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                x = normalize(images, torch.zeros(micro_batch, dtype=torch.long, device=device))
                loss = criterion(model(x, cell_type), labels) / accumulation
            scaler.scale(loss).backward()
            del images, x, loss
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update_parameters(model)


def measured_peak(recipe, device, micro_batch):
    """The most bytes allocated at once while train_steps runs: the CUDA allocator's own
    count on a GPU; on the CPU (--dry), every storage the steps create, counted as they are
    created and freed."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_steps(recipe, device, micro_batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as live:
        train_steps(recipe, device, micro_batch)
    return live.peak


def check(device, echo=print, paths=None):
    """Plan and measurement for each recipe; True when every one is within TOLERANCE."""
    ok = True
    echo(f"{'recipe':<34} {'micro-batch':>11} {'planned':>10} {'measured':>10} {'plan/meas':>9}")
    for path in paths or sorted(CONFIGS.glob("*.yaml")):
        recipe = load_recipe(path)
        if device.type != "cuda":       # the trainer uses AMP on a GPU only
            recipe.optim = dataclasses.replace(recipe.optim, amp=False)
        micro_batch = micro_batch_per_gpu(recipe, 1)   # one GPU: the whole micro-batch
        planned, _ = planned_peak(recipe, micro_batch, gpus=1)
        measured = measured_peak(recipe, device, micro_batch)
        ratio = planned / measured
        within = abs(ratio - 1) <= TOLERANCE
        ok &= within
        echo(f"{recipe.name:<34} {micro_batch:>11} {planned / GIB:>8.3f} G "
             f"{measured / GIB:>8.3f} G {ratio:>9.2f}{'' if within else '  OUTSIDE 15%'}")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true",
                        help="on the CPU: configs/tiny-cpu.yaml only, measured by counting")
    parser.add_argument("configs", nargs="*", help="recipe files (default: every one in configs/)")
    args = parser.parse_args(argv)
    if args.dry:
        device, paths = torch.device("cpu"), args.configs or [CONFIGS / "tiny-cpu.yaml"]
    elif not torch.cuda.is_available():
        print("gpu_memory_check: no CUDA GPU here; --dry runs the CPU check", file=sys.stderr)
        return 2
    else:
        device, paths = torch.device("cuda"), args.configs or None
    with contextlib.suppress(KeyboardInterrupt):
        return 0 if check(device, paths=paths) else 1
    return 130


if __name__ == "__main__":
    sys.exit(main())
