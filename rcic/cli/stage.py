"""rcic-stage: train one time-budgeted stage that resumes exactly where the last one stopped.

The command is two processes: a small supervisor, which checks the input, starts the stage as
its child (under torchrun with --gpus N) and ends it at the deadline whatever it is doing
(rcic/deadline.py), and the stage itself (rcic/stage.py), which stops on its own before then
whenever it can. Exit status: 0 when the stage trained or stopped in time with a committed
checkpoint (also after a kill at the deadline: stage.json says `stopped_by: "deadline"`), 2 with
one line for bad input or a budget too short for even one step, 130 when interrupted.
"""
import json
import logging
import os
import sys
from pathlib import Path

from rcic import deadline
from rcic.budget import Budget, parse_duration, process_start_time
from rcic.cli.common import ArgumentParser, open_data
from rcic.config import load_recipe
from rcic.errors import cli_main
from rcic.search import KAGGLE_INPUT


def parser():
    p = ArgumentParser(prog="rcic-stage", description=__doc__)
    p.add_argument("--config", help="recipe YAML (default: the built-in tiny CPU recipe)")
    p.add_argument("--data", help="RxRx1 folder (default: the embedded synthetic data)")
    p.add_argument("--out", default="runs/stage", help="output folder (default: runs/stage)")
    p.add_argument("--budget", required=True,
                   help="wall time for the whole process, e.g. 8h, 7h30m, 45m, 90s, 1:30:00")
    p.add_argument("--resume-from", nargs="*", default=None, metavar="DIR",
                   help="folders searched recursively for checkpoints "
                        "(default: /kaggle/input when it exists, plus --out)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override recipe fields, e.g. --set optim.lr=3e-4 train.epochs=10")
    p.add_argument("--steps", type=int, default=0,
                   help="stop this stage after N optimizer steps even if budget is left")
    p.add_argument("--gpus", type=int, default=1,
                   help="train with DistributedDataParallel, one process per GPU (on a CPU-only "
                        "machine: that many gloo processes)")
    p.add_argument("--quiet", action="store_true", help="only warnings on the console")
    return p


def run(argv):
    # The budget counts from process start, imports included: the supervisor's start, which
    # its stage (and every rank under torchrun) is given.
    start = float(os.environ.get("RCIC_START_TIME") or process_start_time())
    args = parser().parse_args(argv)
    seconds = parse_duration(args.budget)
    recipe = load_recipe(args.config, args.set)   # bad input: one line here, not one per process
    roots = list(args.resume_from) if args.resume_from is not None else (
        [KAGGLE_INPUT] if KAGGLE_INPUT.is_dir() else [])
    if not deadline.supervised():
        return deadline.supervise_stage(recipe, args.data, Path(args.out), Budget(seconds, start=start),
                                        roots, args.steps, args.quiet, args.gpus)
    data = open_data(args.data)
    from rcic.stage import run_stage   # torch loads only after the input is checked
    report = run_stage(recipe, data, args.out, deadline.stage_budget(seconds, start), roots,
                       args.steps, args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: report[k] for k in deadline.SUMMARY_KEYS}), file=sys.stdout)


def exit_now(status):
    """End the stage process with `status` once everything is written (and the loader workers
    joined). A torch interpreter's own exit, freeing every module, takes seconds on a busy
    machine and the budget counts it: skip it, and tell the supervisor the stage has ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    deadline.Reporter().tell("exit", {"returncode": status})
    os._exit(status)


def main(argv=None):
    status = cli_main("rcic-stage", run, argv)
    if deadline.supervised():
        exit_now(status)      # the stage, under its supervisor
    return status


if __name__ == "__main__":
    raise SystemExit(main())
