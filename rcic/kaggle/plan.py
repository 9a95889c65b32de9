"""`rcic-chain plan`: how many stages a recipe needs, from a measured training throughput, and
whether its micro-batch fits the GPUs of the chain's machine (the memory plan, rcic/memory.py).

The throughput is samples (sites) per second, as a stage measures it (stage.json's
`samples_per_second`). A stage trains for about USABLE_FRACTION of its budget: the rest goes to
start-up, validation and the final save (the stage runner uses the same fraction for its own
`stages_left_estimate`).
"""
import ast
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from rcic.budget import USABLE_FRACTION
from rcic.errors import UserError


@dataclass
class Plan:
    total_samples: int
    samples_per_second: float
    budget_seconds: float
    stages: int

    def describe(self):
        training = self.total_samples / self.samples_per_second
        per_stage = self.samples_per_second * self.budget_seconds * USABLE_FRACTION
        return (f"{self.total_samples} training samples at {self.samples_per_second:g} samples/s "
                f"= {hours(training)} of training; a {hours(self.budget_seconds)} stage trains "
                f"about {per_stage:.0f} of them ({USABLE_FRACTION:.0%} of its budget), so the "
                f"recipe needs {self.stages} stage(s). Render them with "
                f"rcic-chain init --stages {self.stages} (a longer chain is harmless: stages "
                f"after the last carry the final checkpoint forward)")


def hours(seconds):
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def samples_per_second_from(stage_json):
    path = Path(stage_json)
    try:
        value = json.loads(path.read_text()).get("samples_per_second")
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}): pass a stage.json written by rcic-stage")
    if not value:
        raise UserError(f"{path} has no samples_per_second (the stage trained no steps): pass "
                        f"--samples-per-second, or a stage.json of a stage that trained")
    return float(value)


def training_samples(recipe, train_samples=None, data=None):
    """Samples the whole recipe trains on: max_steps worth, or epochs x the training sites."""
    if recipe.train.max_steps:
        return (recipe.train.max_steps * recipe.data.batch_size
                * max(1, recipe.optim.accumulation_steps))
    if train_samples is None:
        from rcic.data.layout import RxRx1
        from rcic.data.synthetic import default_data_dir

        d = recipe.data
        layout = RxRx1(data or default_data_dir(), check_images=False)
        train_samples = len(layout.split_sites(d.val_experiments, d.cell_types, d.use_controls,
                                               d.use_test_controls)[0])
    if train_samples < 1:
        raise UserError(f"--train-samples {train_samples}: must be at least 1")
    return recipe.train.epochs * train_samples


def plan(recipe, samples_per_second, budget_seconds, train_samples=None, data=None):
    if not samples_per_second > 0:
        raise UserError(f"--samples-per-second {samples_per_second}: must be above 0")
    total = training_samples(recipe, train_samples, data)
    per_stage = samples_per_second * budget_seconds * USABLE_FRACTION
    return Plan(total, samples_per_second, budget_seconds, max(1, math.ceil(total / per_stage)))


def memory_plan_lines(recipe, gpu_gib=None, machine_shape=None):
    """The memory plan of the recipe on one GPU of `machine_shape` (default: the chain's),
    or of a GPU with `gpu_gib` GiB."""
    from rcic.kaggle.chain import DEFAULT_MACHINE_SHAPE
    from rcic.memory import GIB, MACHINE_SHAPES, micro_batch_per_gpu, plan_memory

    shape = machine_shape or DEFAULT_MACHINE_SHAPE
    if shape not in MACHINE_SHAPES and gpu_gib is None:
        return [f"memory plan: rcic knows no GPU memory of machine shape {shape} (it knows "
                f"{', '.join(MACHINE_SHAPES)}); give it with --gpu-memory GIB for a plan"]
    gpus, gpu_bytes = MACHINE_SHAPES.get(shape, (1, None))
    if gpu_gib is not None:
        gpu_bytes = int(gpu_gib * GIB)
    return plan_memory(recipe, micro_batch_per_gpu(recipe, gpus), gpu_bytes, gpus).describe()


def refuse_unfitting(recipe, machine_shape):
    """Refuse, in one line, a recipe whose micro-batch cannot fit a GPU of the machine shape.
    A machine shape rcic knows no GPU memory of is not checked, and a note says so."""
    from rcic.memory import MACHINE_SHAPES, machine_refusal

    if machine_shape not in MACHINE_SHAPES:
        print(f"rcic-chain: memory not checked: rcic knows no GPU memory of machine shape "
              f"{machine_shape} (it knows {', '.join(MACHINE_SHAPES)})", file=sys.stderr)
        return
    line = machine_refusal(recipe, machine_shape)
    if line:
        raise UserError(line)


def refuse_unfitting_chain(chain_dir):
    """refuse_unfitting for a rendered chain: the recipe and machine shape of its stages."""
    from rcic.config import Recipe, from_dict
    from rcic.kaggle import chain, metadata

    stages = [f for f in chain.kernel_folders(chain_dir) if chain.is_stage(f)]
    if not stages:
        return
    script = stages[0] / chain.STAGE_SCRIPT
    line = chain.SETTINGS_LINE.search(script.read_text())
    if line is None:
        raise UserError(f"{script} has no 'SETTINGS = ...' line: render the chain again with "
                        f"rcic-chain init")
    settings = ast.literal_eval(line.group(0).split("=", 1)[1].strip())
    recipe = (from_dict(yaml.safe_load(settings["recipe_yaml"]), str(script))
              if settings["recipe_yaml"] else Recipe())
    meta = metadata.read_json(stages[0] / metadata.KERNEL_METADATA)
    refuse_unfitting(recipe, meta.get("machine_shape"))
