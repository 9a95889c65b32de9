"""rcic-stage as a user runs it: real subprocesses for stages in a row, signals and budgets,
real files. The reference run and the plate-batch runs only need the files a stage writes: they
run their stage in this process (helpers.stage_here)."""
import json
import os
import signal
import subprocess
import time

import pytest

from faults.harness import error_lines
from helpers import assert_same_weights, stage, stage_argv, stage_here
from rcic.deadline import children


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One uninterrupted run of the whole tiny recipe."""
    out = tmp_path_factory.mktemp("ref") / "run"
    stage_here(tiny_data, out)
    return out


def test_reference_run_writes_every_report(reference):
    report = json.loads((reference / "stage.json").read_text())
    assert report["done"] is True and report["global_step"] == report["total_steps"] > 0
    for key in ("epoch", "seconds_used", "budget_seconds", "samples_per_second",
                "stages_left_estimate"):
        assert key in report
    assert report["seconds_used"] < report["budget_seconds"]
    assert (reference / "curves.png").stat().st_size > 1000
    assert "val_acc" in (reference / "metrics.csv").read_text().splitlines()[0]
    assert len([p for p in reference.iterdir() if p.name.startswith("ckpt-")]) == 1


def test_three_stages_are_bit_identical_to_one_run(tiny_data, tmp_path, reference):
    out = tmp_path / "split"
    for _ in range(2):
        summary = json.loads(stage(tiny_data, out, "--steps", "3").stdout.splitlines()[-1])
        assert summary["done"] is False and summary["stopped_by"] == "steps"
    assert json.loads(stage(tiny_data, out).stdout.splitlines()[-1])["stopped_by"] == "done"
    assert_same_weights(out, reference)
    assert (out / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()


def test_plate_batches_resume_exactly_and_validate_per_plate(tiny_data, tmp_path):
    plates = ["data.plate_batches=true"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    stage_here(tiny_data, whole, sets=plates)
    stage_here(tiny_data, split, "--steps", "5", sets=plates)
    stage_here(tiny_data, split, sets=plates)
    assert_same_weights(split, whole)
    assert (split / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()


def test_finished_recipe_trains_nothing_and_carries_the_checkpoint(tiny_data, tmp_path, reference):
    out = tmp_path / "after"
    report = stage_here(tiny_data, out, "--resume-from", str(reference))
    assert report["done"] is True and report["steps_this_stage"] == 0
    assert_same_weights(out, reference)
    assert any(p.name.startswith("ckpt-") for p in out.iterdir())


def test_recipe_with_other_training_fields_is_refused(tiny_data, tmp_path, reference):
    result = stage(tiny_data, tmp_path / "x", "--resume-from", str(reference),
                   sets=["optim.lr=0.01"], check=False)
    assert result.returncode == 2
    assert "optim.lr" in result.stderr and result.stderr.strip().count("\n") == 0


def test_budget_is_never_exceeded(tiny_data, tmp_path):
    # Slow steps (bigger images) and a budget that ends mid-epoch. Short but not absurd:
    # start-up (imports, data checks) alone takes seconds; on a very busy machine more than the
    # budget: then the one line. (tests/test_faults.py holds budgets with slow saves; its long
    # trials draw many more budgets.)
    out, budget = tmp_path / "b", 20
    start = time.time()
    result = stage(tiny_data, out, budget=f"{budget}s", sets=["data.image_size=48", "train.epochs=50"],
                   check=False)
    elapsed = time.time() - start
    assert elapsed < budget, f"{elapsed:.1f}s for a {budget}s budget"
    # Either way the stage stopped itself: not the supervisor's kill at the deadline (which
    # alone would also end the process in time).
    if result.returncode == 0:
        report = json.loads((out / "stage.json").read_text())
        assert report["global_step"] > 0 and report["stopped_by"] == "budget", report
    else:
        assert result.returncode == 2 and "is too short for recipe" in result.stderr
        assert "nothing was committed" not in result.stderr       # the kill's line
        assert len(error_lines(result.stderr)) == 1, result.stderr


def interrupted_stage(tmp_path, tiny_data, send):
    """rcic-stage started as a shell starts a job (a process group of its own), interrupted by
    `send(proc)` once it has committed a checkpoint; returns its stage.json."""
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(["rcic-stage", *stage_argv(tiny_data, out, sets=["train.epochs=100"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    deadline = time.time() + 120
    while not any(out.glob("ckpt-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    send(proc)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads((out / "stage.json").read_text())
    # Stopped by the one signal: it finished the step, saved, and wrote its own report.
    assert report["stopped_by"] == "signal" and report["done"] is False, report
    assert report["global_step"] > 0 and report["checkpoint_step"] == report["global_step"]
    return report


def test_sigterm_finishes_the_step_saves_and_exits_0(tiny_data, tmp_path):
    interrupted_stage(tmp_path, tiny_data, lambda proc: proc.send_signal(signal.SIGTERM))


def process_group(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[2])


def test_ctrl_c_in_a_terminal_stops_the_stage_once(tiny_data, tmp_path):
    # A terminal's Ctrl-C is SIGINT to the whole foreground process group. The worker has a
    # group of its own, so only the supervisor gets it and passes it on once: a second SIGINT
    # would abort the worker (KeyboardInterrupt, a non-zero exit and no report). Two SIGINTs
    # at the same instant are often merged into one by the OS, so the groups are checked too.
    def ctrl_c(proc):
        [worker] = children(proc.pid)
        assert process_group(worker) != process_group(proc.pid) == proc.pid
        os.killpg(proc.pid, signal.SIGINT)
    interrupted_stage(tmp_path, tiny_data, ctrl_c)


@pytest.mark.parametrize("args, needle", [
    (["--budget", "8x"], "budget '8x' is not a duration"),
    (["--budget", "1m", "--set", "optim.nope=1"], "optim.nope"),
    (["--budget", "1m", "--config", "missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, args, needle):
    result = subprocess.run(["rcic-stage", "--data", str(tiny_data), "--out", str(tmp_path / "o"),
                             *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert needle in result.stderr and result.stderr.strip().count("\n") == 0
