"""The memory plan (rcic/memory.py): what it counts, the micro-batch it says fits, and the
refusals of `rcic-chain init` and `push`.

The counting is checked against an independent count: the tensors autograd saves for the
backward pass of a real CPU forward (saved_tensors_hooks, one count per storage).
"""
import contextlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rcic.cli.chain import main
from rcic.config import Recipe, load_recipe
from rcic.memory import (CELL_TYPES, CONTEXT_BYTES, GIB, LiveBytes, StepModel, fixed_items,
                         input_bytes, measure_steps, micro_batch_per_gpu, needed, passes,
                         plan_memory, planned_classes)
from rcic.models import create_loss, create_model


def tiny_recipe(size=32, amp=False, **model):
    recipe = Recipe()
    recipe.data.image_size = size
    recipe.optim.amp = amp
    for key, value in model.items():
        setattr(recipe.model, key, value)
    return recipe


def saved_for_backward(recipe, n):
    """Bytes autograd saves for the backward of a real forward of the recipe's model on n
    samples, one count per storage, the model's own tensors and the inputs left out."""
    model = create_model(recipe.model, planned_classes(recipe), CELL_TYPES,
                         with_pretrained=False).train()
    x = torch.randn(n, 6, recipe.data.image_size, recipe.data.image_size)
    labels = cell_type = torch.zeros(n, dtype=torch.long)
    outside = {t.untyped_storage().data_ptr()
               for t in [*model.parameters(), *model.buffers(), x, labels]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in outside:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        create_loss(recipe.model)(model(x, cell_type), labels)
    return sum(saved.values())


@pytest.mark.parametrize("model", [{}, {"head": "ce+arcface", "neck": True,
                                        "cell_type_onehot": True, "dropout": 0.2}])
def test_the_activations_counted_are_what_autograd_saves(model):
    recipe = tiny_recipe(**model)
    (step,) = measure_steps(recipe, [4], checkpointing=False)
    saved = saved_for_backward(recipe, 4)
    # kept = saved + what is alive without being saved (the loss: a few bytes)
    assert saved <= step.kept <= saved + 64
    assert step.peak >= step.kept


def test_mixed_precision_halves_the_activations():
    fp32, amp = (measure_steps(tiny_recipe(size=128, amp=a), [8], False)[0] for a in (False, True))
    assert 0.45 < amp.kept / fp32.kept < 0.6


def test_live_bytes_follow_the_storages_created_and_freed():
    known = torch.zeros(10)
    with LiveBytes([known]) as live:
        a = torch.ones(1000)                # 4000 bytes
        b = a * 2                           # 4000 more
        view = known[:5]                    # a view of a known storage: nothing new
        assert live.alive == 8000
        del a
        c = b.t()                           # a view of b: nothing new
        assert live.alive == 4000
    assert live.peak == 8000 and view.numel() == 5 and c.numel() == 1000


def test_the_step_model_is_exact_for_what_is_kept_and_close_for_the_peak():
    recipe = tiny_recipe(size=96, amp=True)
    steps = {m.micro_batch: m for m in measure_steps(recipe, [2, 3, 4, 8, 20, 21], False)}
    for small, large in ((2, 4), (2, 20), (3, 8)):
        model = StepModel(steps[small], steps[large])
        for n, step in steps.items():
            assert model.kept(n) == pytest.approx(step.kept, abs=1)
            # cautious, but for at most 2%
            assert 0.98 * step.peak <= model.peak(n) <= 1.1 * step.peak


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    recipe = tiny_recipe(size=96, amp=True)
    recipe.data.batch_size = 4
    fixed = sum(fixed_items(recipe, 1).values())

    def measured_need(n):   # measured directly, not from the plan's two points
        (step,) = measure_steps(recipe, [n], False)
        return needed(fixed + input_bytes(n, 96) + step.peak)

    gpu = (measured_need(20) + measured_need(21)) // 2     # so 20 fits and 21 does not
    plan = plan_memory(recipe, 4, gpu_bytes=gpu, gpus=1, modes=(False,))
    largest = plan.fits[False].largest
    assert 18 <= largest <= 20 and measured_need(largest) <= gpu     # cautious, not by much
    assert plan.need() == measured_need(4) and plan.fits_gpu()
    assert plan.need() > CONTEXT_BYTES
    # the items add up to the peak, and the fixed ones are the model's tensors
    params = sum(p.numel() for p in create_model(recipe.model, planned_classes(recipe),
                                                  CELL_TYPES).parameters()) * 4
    assert plan.items()["gradients (float32)"] == params
    assert plan.items()["optimizer state (adam)"] == 2 * params
    assert sum(plan.items().values()) == plan.peak()


def test_the_plan_suggests_a_micro_batch_that_keeps_the_global_batch():
    recipe = tiny_recipe(size=256, amp=True)
    recipe.data.batch_size, recipe.optim.accumulation_steps = 24, 2
    plan = plan_memory(recipe, 24, gpu_bytes=int(1.2 * GIB), gpus=1, modes=(False,))
    largest = plan.fits[False].largest
    assert 0 < largest < 24 and not plan.fits_gpu()
    m, k = plan.suggestion(False)
    assert m * k == 48 and m <= largest and not any(48 % d == 0 for d in range(m + 1, largest + 1))
    assert f"data.batch_size={m} and optim.accumulation_steps={k}" in plan.refusal()
    # on two GPUs each takes half of a micro-batch: data.batch_size is twice what one holds
    two = plan_memory(recipe, micro_batch_per_gpu(recipe, 2), gpu_bytes=int(1.2 * GIB), gpus=2,
                      modes=(False,))
    assert two.micro_batch == 12 and two.global_batch == 48
    b, k = two.suggestion(False)
    assert b % 2 == 0 and b // 2 <= two.fits[False].largest and b * k == 48


def test_plan_without_throughput_prints_the_memory_plan_alone(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "peak of a training step" in out and "stage(s)" not in out
    assert "largest micro-batch per GPU without activation checkpointing:" in out
    assert "largest micro-batch per GPU with activation checkpointing:" in out
    assert "fits 15.00 GiB" in out
    assert main(["plan", "--gpu-memory", "1"]) == 0          # 1 GiB: not even the context
    assert "does NOT fit 1.00 GiB" in capsys.readouterr().out
    assert main(["plan", "--samples-per-second", "1", "--from-stage-json", "x.json"]) == 2
    assert "not both" in capsys.readouterr().err


BIG = "name: big\ndata:\n  image_size: 512\n  batch_size: 512\noptim:\n  accumulation_steps: 2\n"


def init(tmp_path, recipe_text, *extra):
    tmp_path.mkdir(exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "chain"
    return main(["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "1",
                 "--config", str(recipe), "--out", str(out), *extra]), out


def test_init_refuses_a_micro_batch_the_t4_cannot_hold_in_one_line(tmp_path, capsys):
    status, out = init(tmp_path, BIG)
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and not out.exists()
    # two T4s share each micro-batch of 512: 256 on each
    assert "recipe big needs" in err and "micro-batch 256 (512 px)" in err
    suggested = err.split("set data.batch_size=")[1]
    m = int(suggested.split()[0])
    k = int(suggested.split("optim.accumulation_steps=")[1].split()[0])
    assert m * k == 1024
    # what it suggests renders
    fixed = BIG.replace("batch_size: 512", f"batch_size: {m}").replace(
        "accumulation_steps: 2", f"accumulation_steps: {k}")
    status, out = init(tmp_path / "again", fixed)
    assert status == 0 and (out / "stage-01").is_dir()


def test_push_refuses_a_chain_whose_machine_cannot_hold_its_micro_batch(tmp_path, capsys):
    # rendered for a machine shape rcic knows no memory of (not checked), then moved to T4s
    status, out = init(tmp_path, BIG, "--machine-shape", "SomeBigGpu")
    assert status == 0
    assert "memory not checked: rcic knows no GPU memory of machine shape SomeBigGpu" in (
        capsys.readouterr().err)
    for meta in out.glob("*/kernel-metadata.json"):
        text = json.loads(meta.read_text())
        if "machine_shape" in text:
            text["machine_shape"] = "NvidiaTeslaT4"
            meta.write_text(json.dumps(text))
    copy = shutil.copytree(out, tmp_path / "copy")
    assert main(["push", str(out)]) == 2         # before any credentials are asked for
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "recipe big needs" in err and "data.batch_size=" in err
    # nothing in the folder was written
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in copy.rglob("*"))


def test_the_shipped_big_recipes_fit_a_t4_and_say_how_much_memory():
    recipe = load_recipe("configs/seed004-resnet50.yaml")
    plan = plan_memory(recipe, recipe.data.batch_size, gpus=2, modes=(False,))
    assert plan.fits_gpu() and "DDP gradient buckets" in plan.items()
    assert plan.fits[False].largest >= recipe.data.batch_size


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")
def test_a_model_fake_tensors_cannot_build_is_counted_for_real_and_scaled():
    # timm's ViTs read a value (.item()) while they initialise: no fake tensors for them
    recipe = tiny_recipe(size=224, backbone="timm:vit_tiny_patch16_224")
    (scaled,) = measure_steps(recipe, [8], checkpointing=False)
    (real,) = passes(recipe, [8], False, contextlib.nullcontext())
    assert scaled.scaled and not real.scaled
    assert scaled.kept == pytest.approx(real.kept, rel=0.01)
    assert real.peak <= scaled.peak <= 1.1 * real.peak


def test_the_whole_plan_equals_real_training_steps_counted_on_the_cpu(tmp_path):
    """tools/gpu_memory_check.py --dry: two real optimizer steps as the trainer takes them
    (accumulation, optimizer state, EMA), every storage counted, against the plan's peak."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import gpu_memory_check

    recipe = tmp_path / "dense.yaml"
    recipe.write_text("name: dense\ndata:\n  image_size: 32\n  batch_size: 4\nmodel:\n"
                      "  backbone: densenet121\n  neck: true\noptim:\n  optimizer: radam\n"
                      "  accumulation_steps: 2\n  ema_decay: 0.99\n")
    lines = []
    assert gpu_memory_check.check(torch.device("cpu"), lines.append,
                                  [recipe, gpu_memory_check.CONFIGS / "tiny-cpu.yaml"])
    ratios = [float(line.split()[-1]) for line in lines[1:]]
    assert len(ratios) == 2 and all(0.95 <= r <= 1.05 for r in ratios), lines
