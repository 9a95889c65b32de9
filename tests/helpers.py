"""What several test files share: running rcic-stage as a user does, and comparing weights.

A console script can run as a real process (`stage`) or as its `main(argv)` in the test process
(`run_main`; for rcic-stage `stage_main_here` and `stage_here`, which run here the worker that
its supervisor would launch as a child). A tiny stage is mostly the start of a Python
process: importing torch, albumentations, torch._dynamo (the first optimizer) and matplotlib
(the curves) costs several times its 16 training steps. Tests about processes (kills, signals,
deadlines, exit codes seen by a shell, limits, DDP) start real ones; reference runs and reruns
that only need the files a stage writes run here, through the very same `main`.
"""
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch

def tiny(epochs=2, workers=2, checkpoint_every=2):
    """The overrides of the tiny recipe the stage tests train: 16 px, micro-batches of 4 (8
    optimizer steps an epoch on the tiny_data fixture), `epochs` epochs, a checkpoint every
    `checkpoint_every` steps, `workers` DataLoader processes (0 for stages run in this process
    or where a process count matters)."""
    return ["data.image_size=16", "data.batch_size=4", f"train.epochs={epochs}",
            "train.log_every_steps=3", f"train.checkpoint_every_steps={checkpoint_every}",
            f"data.num_workers={workers}"]


TINY = tiny()       # 16 optimizer steps in all


def stage_argv(data, out, *extra, budget="5m", sets=(), recipe=TINY):
    """The one way the tests spell rcic-stage's arguments: `recipe` (overrides of the tiny
    recipe by default), then `sets` over it, then `extra` options."""
    return ["--data", str(data), "--out", str(out), "--budget", budget, "--quiet",
            "--set", *recipe, *sets, *map(str, extra)]


def stage(data, out, *extra, budget="5m", sets=(), check=True):
    """Run `rcic-stage` on `data` into `out` as a real process; it must exit 0 unless `check`
    is False. Returns the CompletedProcess."""
    cmd = ["rcic-stage", *stage_argv(data, out, *extra, budget=budget, sets=sets)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@contextmanager
def as_a_command():
    """What a fresh process would have: a budget clock that starts now (as `rcic-stage --gpus`
    gives the processes it launches) and no log handler left from an earlier command; the
    handlers a command installed (its stage.log) are closed after it."""
    before = os.environ.get("RCIC_START_TIME")
    os.environ["RCIC_START_TIME"] = repr(time.time())
    logger = logging.getLogger("rcic")
    logger.handlers.clear()
    try:
        yield
    finally:
        for handler in logger.handlers:
            handler.close()
        logger.handlers.clear()
        if before is None:
            del os.environ["RCIC_START_TIME"]
        else:
            os.environ["RCIC_START_TIME"] = before


def run_main(main, argv):
    """A console script's `main(argv)` run in this process as if freshly started; its exit
    status."""
    with as_a_command():
        return main([str(a) for a in argv])


def stage_main_here(argv):
    """rcic-stage's main(argv) with its worker run in this process; its exit status.

    Everything the command does before its first process runs here too (arguments, recipe,
    budget, --out writable); then, instead of launching the worker as a supervised child (a
    new interpreter importing torch, albumentations and torch._dynamo: ~5 s of CPU a stage),
    the worker's own function runs here. A test of what a stage writes or refuses needs no
    more; tests of the supervisor itself (deadlines, kills, signals, exit codes seen by a
    shell) run the real command."""
    from rcic.budget import stage_budget
    from rcic.cli.stage import StageArgs
    from rcic.cli.stage_worker import work
    from rcic.errors import cli_main
    from rcic.launch import check_writable

    def run(argv):
        a = StageArgs(argv, start=time.time())
        check_writable(a.out)
        return work(a.recipe, a.data, a.out, stage_budget(a.budget.seconds, a.budget.start),
                    a.roots, a.steps, a.quiet)
    return cli_main("rcic-stage", run, [str(x) for x in argv])


def stage_here(data, out, *extra, budget="5m", sets=()):
    """`stage`, run in this process (`stage_main_here`); it must exit 0. Returns the stage.json
    report."""
    assert run_main(stage_main_here, stage_argv(data, out, *extra, budget=budget, sets=sets)) == 0
    return json.loads((Path(out) / "stage.json").read_text())


def weights(out):
    """The model tensors of the weights.pt in stage folder `out`."""
    return torch.load(Path(out) / "weights.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    """The weights.pt of stage folders `a` and `b` hold bit-identical tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


PATCHED = Path(__file__).parent / "programs" / "patched"


def patched_env(**patches):
    """The environment of a command whose every Python process applies the test patches of
    tests/programs/patched/sitecustomize.py, e.g. patched_env(slow_micro_batches=5)."""
    named = ",".join(f"{k.replace('_', '-')}={v}" if v is not True else k.replace("_", "-")
                     for k, v in patches.items())
    path = os.pathsep.join(filter(None, [str(PATCHED), os.environ.get("PYTHONPATH")]))
    # Added to those already asked for (tools/mutation_check.py runs the tests under one).
    named = ",".join(filter(None, [os.environ.get("RCIC_TEST_PATCHES"), named]))
    return dict(os.environ, PYTHONPATH=path, RCIC_TEST_PATCHES=named)
