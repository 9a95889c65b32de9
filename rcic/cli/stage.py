"""rcic-stage: train one time-budgeted stage that resumes exactly where the last one stopped."""
import json
import os
import sys

from rcic.budget import Budget, parse_duration, process_start_time
from rcic.cli.common import ArgumentParser, open_data
from rcic.config import load_recipe
from rcic.errors import cli_main
from rcic.search import KAGGLE_INPUT


def without_gpus(argv):
    """The command line less its --gpus option: what each torchrun process runs."""
    out, rest = [], list(argv if argv is not None else sys.argv[1:])
    while rest:
        token = rest.pop(0)
        if token == "--gpus":
            rest.pop(0)
        elif not token.startswith("--gpus="):
            out.append(token)
    return out


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
    recipe = load_recipe(args.config, args.set)   # bad input: one line here, not one per process
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        from rcic.stage import launch_distributed
        return launch_distributed(args.gpus, without_gpus(argv), start)
    roots = list(args.resume_from) if args.resume_from is not None else (
        [KAGGLE_INPUT] if KAGGLE_INPUT.is_dir() else [])
    data = open_data(args.data)
    from rcic.stage import SUMMARY_KEYS, run_stage   # torch loads only after the input is checked
    report = run_stage(recipe, data, args.out, budget, roots, args.steps, args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: report[k] for k in SUMMARY_KEYS}), file=sys.stdout)


def main(argv=None):
    return cli_main("rcic-stage", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
