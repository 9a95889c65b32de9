"""The budget is a hard deadline, whatever one unit of work costs (issue 13).

In process, real torch: a step given up between micro-batches and an interrupted validation or
pseudo-label pass leave no trace in the training state. As a user runs it, real processes:
a step longer than the whole budget, a DataLoader worker that hangs forever, a save that
stalls, a validation longer than what is left, and the same with the other core kept busy.
Every run must end inside its budget, timed from outside, with the newest committed checkpoint
intact; where the run trained, the next stage resumes from it bit-exactly.
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from faults.harness import error_lines
from helpers import assert_same_weights, patched_env, stage_argv, tiny
from rcic.budget import Interrupted, format_duration
from rcic.checkpoint import find_checkpoints
from rcic.cli.common import open_data
from rcic.config import load_recipe
from rcic.data.synthetic import SynthSpec, generate
from rcic.train import Trainer

# 8 steps an epoch, 24 in all; a checkpoint every 2 steps; two loader workers.
TINY = tiny(epochs=3)


# ------------------------------------------------------------------ in process

def trainer(data, *sets):
    recipe = load_recipe(None, ["data.image_size=16", "data.batch_size=4", "data.num_workers=0",
                                "model.dropout=0.5", *sets])
    return Trainer(recipe, open_data(data), torch.device("cpu"), with_pretrained=False)


def whole_step(t):
    batches = t.micro_batches()
    t.begin_step()
    for _ in range(t.micro_batches_per_step):
        t.accumulate(next(batches))
    t.finish_step()


def same(a, b):
    """Deep equality of two training states (tensors bit for bit, RNG states included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "equals"):                  # pandas
        return a.equals(b)
    return a == b


def test_a_step_given_up_between_micro_batches_leaves_no_trace(tiny_data):
    t = trainer(tiny_data, "optim.accumulation_steps=3")
    whole_step(t)
    before = copy.deepcopy(t.state_dict())      # the RNG state included
    # A second step, given up after two of its three micro-batches: dropout drew from the RNG,
    # BatchNorm statistics moved, gradients and the running loss grew.
    batches = t.micro_batches()
    t.begin_step()
    t.accumulate(next(batches))
    t.accumulate(next(batches))
    assert any(p.grad is not None for p in t.raw_model.parameters())
    assert not same(t.state_dict(), before)
    t.abandon_step()
    assert all(p.grad is None for p in t.raw_model.parameters())
    assert same(t.state_dict(), before)
    # And the run goes on exactly as one resumed from the state before the step.
    whole_step(t)
    after = copy.deepcopy(t.state_dict())
    resumed = trainer(tiny_data, "optim.accumulation_steps=3")
    resumed.load_state_dict(copy.deepcopy(before))      # the global RNG too
    whole_step(resumed)
    assert same(resumed.state_dict(), after)


def test_an_interrupted_validation_changes_nothing_and_stays_pending(tiny_data):
    t = trainer(tiny_data, "data.plate_batches=true")   # AdaBN: BatchNorm statistics per plate
    whole_step(t)
    t.pending_eval = True
    # A copy: state_dict() holds live references (weights, BatchNorm buffers, optimizer state),
    # which would compare equal to themselves whatever the pass changed.
    before = copy.deepcopy(t.state_dict())
    asked = []
    with pytest.raises(Interrupted):
        t.evaluate(stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3 and t.pending_eval
    assert same(t.state_dict(), before)
    row = t.evaluate(stop=lambda: False)   # a whole pass afterwards
    assert not t.pending_eval and t.history[-1] == row


def test_an_interrupted_pseudo_label_pass_changes_nothing(tiny_data):
    t = trainer(tiny_data, "pseudo.enabled=true", "pseudo.start_epoch=0")
    before = copy.deepcopy(t.state_dict())
    with pytest.raises(Interrupted):
        t.refresh_pseudo(stop=lambda: True)
    assert t.pseudo_labels is None and t.pseudo_epoch == -1
    assert same(t.state_dict(), before)


# ------------------------------------------------------------------ as a user runs it

def stage_cmd(data, out, budget, *sets, extra=()):
    return ["rcic-stage", *stage_argv(data, out, *extra, budget=budget, recipe=TINY, sets=sets)]


class Run:
    """rcic-stage started now, timed from outside: Popen to exit."""

    def __init__(self, cmd, env=None):
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)

    def finish(self, timeout=300):
        self.out, self.err = self.proc.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.launched
        return self

    def stage_pid(self):
        """The supervised stage: the child of rcic-stage."""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                                return int(entry.name)
                    except (OSError, ValueError, IndexError):
                        pass
            time.sleep(0.05)
        raise AssertionError("rcic-stage started no stage")


def processes_writing_to(out):
    """Processes whose command line names `out` (the stage and its loader workers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                with open(f"/proc/{entry.name}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if str(out).encode() in cmdline and not zombie:
                found.append(int(entry.name))
    return found


def wait_for(predicate, seconds=120, poll=0.05):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def newest_commit(out):
    """The newest checkpoint in `out` that verifies (sizes and sha256 of every file), or None."""
    found = find_checkpoints([out])
    return found[0] if found else None


def committed(out):
    return any(p.name.startswith("ckpt-") and (p / "MANIFEST.json").exists()
               for p in out.glob("ckpt-*"))


def assert_killed_at_the_deadline(run, out, budget, interrupted):
    """In time, exit 0, stage.json from the supervisor, the newest commit intact, nobody left."""
    assert run.seconds < budget, f"{run.seconds:.1f} s for a {budget} s budget"
    assert run.proc.returncode == 0, run.err[-2000:]
    report = json.loads((out / "stage.json").read_text())
    assert report["stopped_by"] == "deadline" and report["interrupted"] == interrupted, report
    newest = newest_commit(out)
    assert newest is not None and newest.step == report["checkpoint_step"] == report["global_step"]
    assert wait_for(lambda: not processes_writing_to(out), seconds=10)
    return report


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The whole recipe, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = Run(stage_cmd(tiny_data, out, "10m")).finish()
    assert run.proc.returncode == 0, run.err[-2000:]
    return out


@pytest.fixture(scope="module")
def budget(reference):
    """Seconds for the runs that meet a fault: room for start-up (which a machine shared with
    other jobs can stretch tenfold) and a few steps, measured on the reference run."""
    startup = json.loads((reference / "stage.json").read_text())["costs"]["startup_seconds"]
    return max(20, round(2 * startup + 12))


def resume_to_the_end(data, out, reference):
    run = Run(stage_cmd(data, out, "10m")).finish()
    assert run.proc.returncode == 0, run.err[-2000:]
    assert json.loads((out / "stage.json").read_text())["done"] is True
    assert_same_weights(out, reference)


def fifos_for_the_training_images(data):
    """A FIFO for every image of the training (not validation) experiments, in data/fifos."""
    validation = set(open_data(data).default_val_experiments())
    for experiment in (data / "train").iterdir():
        if experiment.name not in validation:
            for png in experiment.rglob("*.png"):
                fifo = data / "fifos" / experiment.name / png.relative_to(experiment)
                fifo.parent.mkdir(parents=True, exist_ok=True)
                os.mkfifo(fifo)


def hang_the_training_images(data):
    """Put the FIFOs in the images' place: nobody writes to them, so the next read of a loader
    worker never returns. Returns where the images went."""
    real = data / "real"
    for experiment in (data / "fifos").iterdir():
        # Two renames, microseconds apart: a reader finds the image or the FIFO.
        os.renames(data / "train" / experiment.name, real / experiment.name)
        os.rename(experiment, data / "train" / experiment.name)
    return real


def mend(data, real):
    for experiment in real.iterdir():
        shutil.rmtree(data / "train" / experiment.name)
        os.rename(experiment, data / "train" / experiment.name)


def test_a_loader_worker_that_hangs_forever(own_data, tmp_path, reference, budget):
    """A stage resumes from step 2; as it starts to train, its loader workers hang forever."""
    out = tmp_path / "out"
    earlier = Run(stage_cmd(own_data, out, "5m", extra=["--steps", "2"])).finish()
    assert earlier.proc.returncode == 0, earlier.err[-2000:]
    fifos_for_the_training_images(own_data)
    run = Run(stage_cmd(own_data, out, f"{budget}s"))
    assert wait_for(lambda: "resumed from" in (out / "stage.log").read_text()
                    or run.proc.poll() is not None, budget)
    real = hang_the_training_images(own_data)
    run.finish()
    report = assert_killed_at_the_deadline(run, out, budget, "step")
    # Step 2, or a later one when the loader had fetched a few images before they turned into
    # FIFOs (how many depends on how fast it ran): the kill keeps whatever was committed.
    assert report["checkpoint_step"] >= 2
    mend(own_data, real)
    resume_to_the_end(own_data, out, reference)


def test_a_save_that_stalls(tiny_data, tmp_path, reference, budget):
    """The stage is frozen (SIGSTOP) while it writes a checkpoint, as a write blocked in the
    kernel on a slow disk freezes it: its own budget checks cannot run any more. Every save
    lasts a second more (a stand-in that sleeps inside it), so the poll below catches one in
    the act however loaded the machine."""
    out = tmp_path / "out"
    run = Run(stage_cmd(tiny_data, out, f"{budget}s", "train.checkpoint_every_steps=1"),
              env=patched_env(slow_checkpoint_writes=1.0))
    stage = run.stage_pid()
    assert wait_for(lambda: committed(out) or run.proc.poll() is not None, budget)
    assert run.proc.poll() is None, run.finish().err[-2000:]

    def caught_in_a_save():
        if not any(p.name.startswith(".tmp-ckpt-") for p in out.iterdir()):
            return False
        os.kill(stage, signal.SIGSTOP)
        if any(p.name.startswith(".tmp-ckpt-") for p in out.iterdir()):
            return True
        os.kill(stage, signal.SIGCONT)          # it had just finished: catch the next one
        return False

    assert wait_for(caught_in_a_save, budget, poll=0.01), "no save caught in the act"
    run.finish()
    report = assert_killed_at_the_deadline(run, out, budget, "save")
    assert any(p.name.startswith(".tmp-ckpt-") for p in out.iterdir())   # left, and ignored
    assert report["interrupted_after_seconds"] > 1
    resume_to_the_end(tiny_data, out, reference)


def test_a_step_longer_than_the_whole_budget(tiny_data, tmp_path, budget):
    """One optimizer step of 8 micro-batches, each a quarter of the budget (a stand-in that
    sleeps, so on any machine): the first micro-batch is measured, and the stage says in one
    line that the budget cannot hold a step, before its deadline and leaving the folder as it
    was but for the line's record in stage.log."""
    out = tmp_path / "out"
    # What the folder holds already: two steps of another recipe.
    (tmp_path / "earlier.yaml").write_text("name: earlier\n")
    earlier = Run(stage_cmd(tiny_data, out, "5m", extra=["--steps", "2", "--config",
                                                         str(tmp_path / "earlier.yaml")])).finish()
    assert earlier.proc.returncode == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = Run(stage_cmd(tiny_data, out, f"{budget}s", "optim.accumulation_steps=8",
                        "data.num_workers=0"),
              env=patched_env(slow_micro_batches=budget / 4)).finish()
    assert run.seconds < budget, f"{run.seconds:.1f} s for a {budget} s budget"
    lines = error_lines(run.err)         # what a person reads: progress bars are not lines
    assert run.proc.returncode == 2 and len(lines) == 1, run.err[-2000:]
    assert lines[0].startswith(f"rcic-stage: error: budget {format_duration(budget)} is too short "
                               f"for recipe tiny-cpu here: after ")
    assert " of start-up, one optimizer step takes about " in lines[0]
    assert "(8 micro-batches of ~" in lines[0] and "give it at least" in lines[0]
    assert "nothing was committed" not in lines[0]        # the stage's own line, not the kill's
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    log_before, log_after = before.pop("stage.log"), after.pop("stage.log")
    assert after == before
    assert log_after.startswith(log_before)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """Like the tiny data, with 40 classes: 192 validation sites instead of 32."""
    spec = SynthSpec(n_classes=40, n_positive_controls=1, image_size=16, train_experiments=2,
                     test_experiments=1, cell_types=["HUVEC", "RPE"])
    return generate(tmp_path_factory.mktemp("wide") / "data", spec)


def test_a_validation_longer_than_what_is_left(wide_data, tmp_path, budget):
    """A validation (96 batches of 2 sites) after the first step, each batch made to take a
    second (a stand-in that sleeps): far longer than the rest of any budget here, on an idle
    machine or a busy one. That validation, not yet measured, starts and must stop at a batch
    boundary, and the stage end on time with its step saved."""
    out = tmp_path / "out"
    sets = ["train.eval_every_steps=1", "data.batch_size=1", "data.num_workers=0",
            "train.checkpoint_every_steps=1"]
    run = Run(stage_cmd(wide_data, out, f"{budget}s", *sets),
              env=patched_env(slow_validation_batches=1.0)).finish()
    assert run.seconds < budget, f"{run.seconds:.1f} s for a {budget} s budget"
    assert run.proc.returncode == 0, run.err[-2000:]
    report = json.loads((out / "stage.json").read_text())
    assert report["stopped_by"] == "budget" and report["costs"]["evals"] == 0, report
    assert report["costs"]["eval_seconds"] > 1.0     # it ran batches, then stopped
    assert "validation at step 1 stopped" in (out / "stage.log").read_text()
    newest = newest_commit(out)
    assert newest is not None and newest.step == report["global_step"] == 1


def test_the_deadline_holds_with_the_other_core_busy(own_data, tmp_path, reference, budget):
    """The hung loader worker again, with a CPU burner beside it the whole time (which slows
    start-up too: half as much budget again)."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        test_a_loader_worker_that_hangs_forever(own_data, tmp_path, reference, round(1.5 * budget))
    finally:
        burner.kill()
        burner.wait()
