"""More than one process: DistributedDataParallel over gloo on the CPU, as CI can run it.

rcic-stage --gpus 2 as a user runs it: its supervisor launches torchrun, and the two ranks
torchrun starts are the processes under test."""
import json

import torch

from rcic.data.layout import RxRx1

from helpers import assert_same_weights, stage


def ddp_stage(data, out, *extra, budget="5m"):
    # Exit 0 is torchrun's status: every rank exited 0.
    stage(data, out, "--gpus", "2", budget=budget, sets=["data.num_workers=0", *extra])
    return json.loads((out / "stage.json").read_text())


def ran_to_its_own_stop(report, how):
    """The stage stopped itself (`how`), every rank with it: no kill by the supervisor."""
    assert report["stopped_by"] == how, report
    assert "processes_killed" not in report and "killed_at_exit" not in report, report
    assert report["runtime"]["world_size"] == 2 and report["runtime"]["backend"] == "gloo"


def test_two_processes_train_stop_and_resume_exactly(tiny_data, tmp_path):
    whole = ddp_stage(tiny_data, tmp_path / "whole")
    assert whole["done"] is True
    ran_to_its_own_stop(whole, "done")
    # Each rank takes half of every micro-batch: the optimizer steps of one process.
    train_sites = len(RxRx1(tiny_data).split_sites()[0])
    assert whole["total_steps"] == 2 * (train_sites // 4)      # 2 epochs of micro-batches of 4
    split = tmp_path / "split"
    first = ddp_stage(tiny_data, split, "--steps", "2")
    assert first["done"] is False and first["global_step"] == 2
    ran_to_its_own_stop(first, "steps")
    second = ddp_stage(tiny_data, split)
    assert second["done"] is True
    ran_to_its_own_stop(second, "done")
    assert_same_weights(split, tmp_path / "whole")
    state = torch.load(next(split.glob("ckpt-*")) / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2          # every rank's RNG is in the checkpoint


def test_a_budget_stop_ends_every_rank_together(tiny_data, tmp_path):
    # A recipe far too long for its budget: both ranks must agree to stop on the same step, by
    # the stage's own budget check. The budget is sized from this machine's start-up of two
    # ranks (measured first, so a loaded machine gets more), with room for steps after it.
    probe = ddp_stage(tiny_data, tmp_path / "probe", "--steps", "1")
    budget = round(2 * probe["costs"]["startup_seconds"] + 15)
    report = ddp_stage(tiny_data, tmp_path / "b", "train.epochs=500", "data.image_size=32",
                       budget=f"{budget}s")
    assert report["done"] is False and report["global_step"] > 0
    ran_to_its_own_stop(report, "budget")
    assert report["seconds_used"] < budget and report["exit_seconds"] < budget
