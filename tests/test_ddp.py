"""More than one process: DistributedDataParallel over gloo on the CPU, as CI can run it.

rcic-stage --gpus 2 runs here through its main: the launcher only starts torchrun, and the two
ranks torchrun starts are the processes under test."""
import json

import torch

from rcic.cli.stage import main as stage_main
from rcic.data.layout import RxRx1

from helpers import TINY, assert_same_weights, run_main


def ddp_stage(data, out, *extra, budget="5m"):
    argv = ["--gpus", "2", "--data", data, "--out", out, "--budget", budget, "--quiet",
            "--set", *TINY, "data.num_workers=0", *extra]
    assert run_main(stage_main, argv) == 0       # torchrun's status: every rank exited 0
    return json.loads((out / "stage.json").read_text())


def test_two_processes_train_stop_and_resume_exactly(tiny_data, tmp_path):
    whole = ddp_stage(tiny_data, tmp_path / "whole")
    assert whole["done"] is True
    # Each rank takes every other batch: half the optimizer steps of one process.
    train_sites = len(RxRx1(tiny_data).split_sites()[0])
    assert whole["total_steps"] == 2 * ((train_sites // 4) // 2)      # 2 epochs of batch 4
    split = tmp_path / "split"
    first = ddp_stage(tiny_data, split, "--steps", "2")
    assert first["done"] is False and first["global_step"] == 2
    second = ddp_stage(tiny_data, split)
    assert second["done"] is True
    assert_same_weights(split, tmp_path / "whole")
    state = torch.load(next(split.glob("ckpt-*")) / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2          # every rank's RNG is in the checkpoint


def test_a_budget_stop_ends_every_rank_together(tiny_data, tmp_path):
    # A recipe far too long for its budget: both ranks must agree to stop on the same step.
    # 20 s: the ranks start in ~5 s on a quiet 2-core machine and train the rest.
    report = ddp_stage(tiny_data, tmp_path / "b", "train.epochs=500", "data.image_size=32",
                       budget="20s")
    assert report["done"] is False and report["global_step"] > 0
    assert report["seconds_used"] < 20
