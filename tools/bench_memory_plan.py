"""The memory plan of every recipe in configs/ on Kaggle's NvidiaTeslaT4 machine (two T4s of
15 GiB, one process each, sharing each micro-batch), as a Markdown table for BENCHMARKS.md.

    OMP_NUM_THREADS=1 python tools/bench_memory_plan.py

Per recipe: the per-GPU peak of a training step and what the GPU needs with the allowance, the
activations kept for backward without and with activation checkpointing, and the largest
micro-batch that fits either way with the accumulation that keeps the recipe's global batch.
The planning seconds are wall time in this process (the load average is printed beside them).
"""
import os
import sys
import time
from pathlib import Path

from rcic.config import load_recipe
from rcic.memory import GIB, MACHINE_SHAPES, micro_batch_per_gpu, plan_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = "NvidiaTeslaT4"


def largest(plan, checkpointing):
    pair = plan.suggestion(checkpointing)
    keep = f" ({pair[0]} x {pair[1]})" if pair else ""
    return f"{plan.fits[checkpointing].largest}{keep}"


def row(path):
    recipe = load_recipe(path)
    gpus, gpu_bytes = MACHINE_SHAPES[SHAPE]
    start = time.perf_counter()
    plan = plan_memory(recipe, micro_batch_per_gpu(recipe, gpus), gpu_bytes, gpus)
    seconds = time.perf_counter() - start
    kept = {c: plan.items(c)["activations kept for backward"] / GIB for c in (False, True)}
    return (f"| {recipe.name} | {recipe.model.backbone} @ {recipe.data.image_size} px | "
            f"{recipe.data.batch_size} x {plan.accumulation} ({plan.micro_batch}) | "
            f"{plan.peak() / GIB:.2f} | "
            f"{plan.need() / GIB:.2f} | {'yes' if plan.fits_gpu() else 'NO'} | "
            f"{kept[False]:.2f} / {kept[True]:.2f} | {largest(plan, False)} | "
            f"{largest(plan, True)} | {seconds:.0f} |")


def main():
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| recipe | backbone | data.batch_size x accumulation (micro-batch per GPU) | peak of "
          "a step per GPU, GiB | needed with allowance, GiB | fits a T4 (15 GiB) | activations "
          "kept, GiB: without / with checkpointing | largest micro-batch per GPU without "
          "checkpointing (the same global batch: data.batch_size x accumulation_steps) | with "
          "checkpointing | planning s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(CONFIGS.glob("*.yaml")):
        print(row(path), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
