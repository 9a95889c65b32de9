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

from rcic.budget import Budget, default_margin, parse_duration, process_start_time
from rcic.cli.common import ArgumentParser
from rcic.config import load_recipe
from rcic.deadline import EVENTS_ENV, KILL_RESERVE, SUMMARY_KEYS, Reporter, supervise
from rcic.errors import UserError, cli_main

KAGGLE_INPUT = Path("/kaggle/input")


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


def check_writable(out):
    """Fail before any work if the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rcic-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {out} is not writable ({err.strerror}): pass a writable --out")


def stage_command(gpus, argv):
    """The child: this command again (under torchrun, one process per GPU, without --gpus)."""
    argv, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--gpus":
            rest.pop(0)
        elif not token.startswith("--gpus="):
            argv.append(token)
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={gpus}", "-m", "rcic.cli.stage", *argv]
    return [sys.executable, "-m", "rcic.cli.stage", *argv]


def run(argv):
    # The budget counts from process start, imports included: the supervisor's start, which
    # its stage (and every rank under torchrun) is given.
    start = float(os.environ.get("RCIC_START_TIME") or process_start_time())
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parser().parse_args(argv)
    seconds = parse_duration(args.budget)
    recipe = load_recipe(args.config, args.set)   # bad input: one line here, not one per process
    out = Path(args.out)
    if EVENTS_ENV not in os.environ:
        check_writable(out)
        env = dict(os.environ, RCIC_START_TIME=repr(start))
        return supervise(stage_command(args.gpus, argv), Budget(seconds, start=start), out,
                         recipe.name, env=env)
    return run_stage(args, recipe, Budget(seconds, start=start,
                                          margin=default_margin(seconds) + KILL_RESERVE))


def run_stage(args, recipe, budget):
    """The stage itself, in the supervised child (one per rank under torchrun)."""
    from rcic.cli.common import open_data, setup_logging
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    roots = list(args.resume_from) if args.resume_from is not None else (
        [KAGGLE_INPUT] if KAGGLE_INPUT.is_dir() else [])
    roots.append(out)
    data = open_data(args.data)
    from rcic.stage import Stage   # torch loads only after the input is checked
    setup_logging(out / "stage.log" if rank == 0 else None, args.quiet or rank > 0)
    report = Stage(recipe, data, out, budget, roots, args.steps).run()
    if rank == 0:
        print(json.dumps({k: report[k] for k in SUMMARY_KEYS}), file=sys.stdout)


def exit_now(status):
    """End the stage process with `status` once everything is written (and the loader workers
    joined). A torch interpreter's own exit, freeing every module, takes seconds on a busy
    machine and the budget counts it: skip it, and tell the supervisor the stage has ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    Reporter().tell("exit", {"returncode": status})
    os._exit(status)


def main(argv=None):
    status = cli_main("rcic-stage", run, argv)
    if EVENTS_ENV in os.environ:
        exit_now(status)      # the stage, under its supervisor
    return status


if __name__ == "__main__":
    raise SystemExit(main())
