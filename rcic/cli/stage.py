"""rcic-stage: train one time-budgeted stage that resumes exactly where the last one stopped.

The command is a small supervisor that checks its input and launches the stage's worker as its
child (under torchrun with --gpus N), ending it at the deadline whatever it is doing
(rcic/launch.py, rcic/deadline.py); the worker (rcic/stage.py) stops on its own before then
whenever it can. Exit status: 0 when the stage trained or stopped in time with a committed
checkpoint (also after a kill at the deadline: stage.json says `stopped_by: "deadline"`), 2 with
one line for bad input or a budget too short for even one step, 130 when interrupted.
"""
from pathlib import Path

from rcic.budget import Budget, parse_duration, process_start_time
from rcic.cli.common import ArgumentParser
from rcic.config import load_recipe
from rcic.errors import cli_main
from rcic.launch import Processes, launch_stage
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
                        "machine: that many gloo processes); on each machine with --nnodes")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines training this stage together (each runs rcic-stage with its "
                        "own --node-rank and the same --rdzv-endpoint)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="machine 0's address and a free port, where the machines meet")
    p.add_argument("--quiet", action="store_true", help="only warnings on the console")
    return p


class StageArgs:
    """rcic-stage's arguments, checked: what the supervisor knows before any process starts."""

    def __init__(self, argv, start=None):
        # The budget counts from process start, imports included.
        start = process_start_time() if start is None else start
        args = parser().parse_args(argv)
        self.budget = Budget(parse_duration(args.budget), start=start)
        self.recipe = load_recipe(args.config, args.set)   # bad input: one line, here
        self.data, self.out = args.data, Path(args.out)
        self.roots = list(args.resume_from) if args.resume_from is not None else (
            [KAGGLE_INPUT] if KAGGLE_INPUT.is_dir() else [])
        self.steps, self.quiet = args.steps, args.quiet
        self.processes = Processes(gpus=args.gpus, nnodes=args.nnodes, node_rank=args.node_rank,
                                   rdzv_endpoint=args.rdzv_endpoint)


def run(argv):
    a = StageArgs(argv)
    return launch_stage(a.recipe, a.data, a.out, a.budget, a.roots, a.steps, a.quiet, a.processes)


def main(argv=None):
    return cli_main("rcic-stage", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
