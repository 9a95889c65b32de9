"""One recipe on any number of processes (gloo on the CPU): the same steps, schedule, epochs and
samples in the same order on 1, 2 or more, a checkpoint resumed on another count, and more than
one machine through torchrun's rendezvous (two on 127.0.0.1).

Stages on one process run in this process (helpers.stage_here); stages on more are real
rcic-stage commands, whose ranks torchrun starts."""
import json
import socket
import subprocess

import pytest
import torch

from helpers import stage, stage_argv, stage_here, weights

ONE_WORKER = ["data.num_workers=0"]
SYNC = [*ONE_WORKER, "model.sync_batchnorm=true"]


def report(out):
    return json.loads((out / "stage.json").read_text())


def position(r):
    return {k: r[k] for k in ("global_step", "total_steps", "epoch", "samples_digest", "done")}


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    """The whole tiny recipe (16 steps, 2 epochs) on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("one") / "run"
    stage_here(tiny_data, out, sets=SYNC)
    return out


def test_one_two_one_processes_run_the_recipe_of_one(tiny_data, tmp_path, one_process):
    out = tmp_path / "run"
    first = stage_here(tiny_data, out, "--steps", "5", sets=SYNC)
    second = json.loads(stage(tiny_data, out, "--gpus", "2", "--steps", "5",
                              sets=SYNC).stdout.splitlines()[-1])
    assert second["global_step"] == 10 and second["total_steps"] == first["total_steps"]
    last = stage_here(tiny_data, out, sets=SYNC)
    whole = report(one_process)
    # The same steps, schedule length, epochs and samples, in the same order ...
    assert position(last) == position(whole)
    assert last["processes"] == [1, 2, 1] and whole["processes"] == [1]
    # ... and the same weights, up to the order of sums: two ranks average two half-batch
    # gradients where one process takes the mean of the whole micro-batch, and synchronised
    # BatchNorm sums its statistics across them. Stated tolerance: 1e-5 absolute + 1e-4
    # relative on every tensor after 16 Adam steps (measured: 1.2e-07 at most; without
    # model.sync_batchnorm, per-rank statistics of 2 samples instead of 4: 0.11).
    ours, theirs = weights(out), weights(one_process)
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name].float(), tensor.float(), atol=1e-5, rtol=1e-4,
                                   msg=f"{name} (largest difference of all: {worst:.2e})")


def test_two_processes_then_one_reach_what_one_reaches(tiny_data, tmp_path):
    split, one = tmp_path / "split", tmp_path / "one"
    stage(tiny_data, split, "--gpus", "2", "--steps", "3", sets=ONE_WORKER)
    assert report(split)["processes"] == [2]
    after = stage_here(tiny_data, split, "--steps", "3", sets=ONE_WORKER)
    alone = stage_here(tiny_data, one, "--steps", "6", sets=ONE_WORKER)
    assert position(after) == position(alone) and after["global_step"] == 6
    assert after["processes"] == [2, 1]


def test_a_count_that_cannot_share_the_micro_batch_is_one_line(tiny_data, tmp_path):
    result = stage(tiny_data, tmp_path / "x", "--gpus", "3", sets=ONE_WORKER, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "3 processes cannot share recipe tiny-cpu's micro-batches of 4 samples" in lines[0]
    assert "run it on 1, 2, 4 processes" in lines[0]
    assert not (tmp_path / "x").exists()            # refused before anything was made


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_together_and_one_machine_resumes(tiny_data, tmp_path):
    """Two "machines" on 127.0.0.1, one process each, meet through torchrun's rendezvous; the
    first commits; the next stage resumes on one machine with two processes."""
    endpoint = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / "machine0", tmp_path / "machine1"]
    procs = [subprocess.Popen(["rcic-stage", *stage_argv(tiny_data, outs[r], sets=ONE_WORKER),
                               "--steps", "4", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", endpoint],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    together = report(outs[0])
    assert together["stopped_by"] == "steps" and together["global_step"] == 4
    assert together["runtime"]["world_size"] == 2 and together["processes"] == [2]
    assert not list(outs[1].glob("ckpt-*"))          # rank 0, on machine 0, commits
    resumed = json.loads(stage(tiny_data, outs[0], "--gpus", "2", "--steps", "2",
                               sets=ONE_WORKER).stdout.splitlines()[-1])
    assert resumed["global_step"] == 6 and resumed["stopped_by"] == "steps"
    alone = stage_here(tiny_data, tmp_path / "alone", "--steps", "6", sets=ONE_WORKER)
    assert report(outs[0])["samples_digest"] == alone["samples_digest"]


def test_a_checkpoint_of_several_processes_before_0_2_is_refused(tiny_data):
    """Before 0.2 the data position counted each process's own micro-batches: it would resume
    at other samples, so such a checkpoint is refused in one line."""
    from rcic.cli.common import open_data
    from rcic.config import load_recipe
    from rcic.errors import UserError
    from rcic.train import Trainer

    recipe = load_recipe(None, ["data.image_size=16", "data.batch_size=4"])
    trainer = Trainer(recipe, open_data(tiny_data), torch.device("cpu"), with_pretrained=False)
    old = trainer.state_dict()
    old["rng"] = old["rng"] * 2                       # written by two processes ...
    del old["counters"]["processes"], old["counters"]["samples_digest"]     # ... before 0.2
    with pytest.raises(UserError, match="written by rcic before 0.2 on 2 processes"):
        trainer.load_state_dict(old)
    del old["rng"][1]                                 # one process: the same meaning then
    trainer.load_state_dict(old)
    assert trainer.processes == [1]
