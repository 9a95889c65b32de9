"""Every recipe in configs/ trains a few steps on the embedded data's shape (tiny images on CPU).

The big recipes keep their backbone, head, optimizer, schedule and accumulation; only the image
size, batch size and step count shrink so that a CPU runs them in seconds. The per-cell-type
fine-tune starts from the weights its first step just wrote: the two-step training end to end.
"""
import json
import time
from pathlib import Path

import pytest
import torch

from rcic.cli.stage import main as stage_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["data.image_size=32", "data.batch_size=2", "data.num_workers=0", "train.epochs=1"]


def run_recipe(monkeypatch, config, data, out, *sets):
    # In-process: the budget would count from the start of the whole pytest session, so give
    # it this moment as its start, as `rcic-stage --gpus` does for the processes it launches.
    monkeypatch.setenv("RCIC_START_TIME", repr(time.time()))
    status = stage_main(["--config", str(config), "--data", str(data), "--out", str(out),
                         "--budget", "10m", "--steps", "2", "--quiet", "--set", *SMALL, *sets])
    assert status == 0
    return json.loads((out / "stage.json").read_text())


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                          if "finetune" not in p.name))
def test_recipe_runs_a_few_steps(config, tiny_data, tmp_path, monkeypatch):
    report = run_recipe(monkeypatch, CONFIGS / config, tiny_data, tmp_path / "out")
    assert report["global_step"] == 2 and report["done"] is False
    state = torch.load(tmp_path / "out" / "weights.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_per_cell_type_finetune_starts_from_the_first_step(tiny_data, tmp_path, monkeypatch):
    first = tmp_path / "first"
    run_recipe(monkeypatch, CONFIGS / "seed001-effb5-amsoftmax.yaml", tiny_data, first)
    second = tmp_path / "huvec"
    report = run_recipe(monkeypatch, CONFIGS / "seed001-effb5-finetune-huvec.yaml", tiny_data, second,
                        f"train.init_from={first}")
    assert report["global_step"] == 2
    log = (second / "stage.log").read_text()
    assert f"initialised from {first / 'weights.pt'}" in log
    assert "HUVEC" in open(second / "recipe.yaml").read()
