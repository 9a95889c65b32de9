"""rcic-stage: train one time-budgeted stage that resumes exactly where the last one stopped."""
import json
import os
import subprocess
import sys
from pathlib import Path

from rcic.budget import Budget, parse_duration, process_start_time
from rcic.cli.common import ArgumentParser, open_data, setup_logging
from rcic.config import load_recipe
from rcic.errors import cli_main
from rcic.search import KAGGLE_INPUT


def launch_distributed(gpus, argv, start):
    """Re-run this command under torchrun, one process per GPU; they share this clock."""
    argv, rest = [], list(argv if argv is not None else sys.argv[1:])
    while rest:
        token = rest.pop(0)
        if token == "--gpus":
            rest.pop(0)
        elif not token.startswith("--gpus="):
            argv.append(token)
    env = dict(os.environ, RCIC_START_TIME=repr(start))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "rcic.cli.stage", *argv]
    return subprocess.run(cmd, env=env).returncode


def run(argv):
    # The budget counts from process start, imports included; under --gpus, from the launcher's.
    start = float(os.environ.get("RCIC_START_TIME") or process_start_time())
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
    args = p.parse_args(argv)

    budget = Budget(parse_duration(args.budget), start=start)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        load_recipe(args.config, args.set)   # bad input: one line here, not one per process
        return launch_distributed(args.gpus, argv, start)
    rank = int(os.environ.get("RANK", "0"))
    recipe = load_recipe(args.config, args.set)
    out = Path(args.out)
    roots = list(args.resume_from) if args.resume_from is not None else (
        [KAGGLE_INPUT] if KAGGLE_INPUT.is_dir() else [])
    roots.append(out)
    data = open_data(args.data)
    from rcic.stage import Stage, check_writable   # torch loads only after the input is checked
    if rank == 0:
        check_writable(out)
    setup_logging(out / "stage.log" if rank == 0 else None, args.quiet or rank > 0)
    report = Stage(recipe, data, out, budget, roots, args.steps).run()
    summary = {k: report[k] for k in ("done", "global_step", "total_steps", "epoch",
                                      "seconds_used", "samples_per_second", "stages_left_estimate")}
    if rank == 0:
        print(json.dumps(summary), file=sys.stdout)


def main(argv=None):
    return cli_main("rcic-stage", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
