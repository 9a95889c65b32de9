"""How much of its budget does a stage use, and how long does saving take?

Runs `rcic-stage` on the embedded data with a recipe far too long to finish, for each budget,
as a real subprocess timed from outside. Prints, per budget: wall seconds of the process,
the fraction of the budget used (goal: < 1 always, >= 0.95 for budgets of 10 minutes or more),
the seconds spent saving checkpoints and their share of the stage.

    python tools/bench_budget.py --budgets 1m 3m 10m
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcic.budget import parse_duration


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["1m", "3m", "10m"])
    p.add_argument("--set", nargs="*", default=["train.epochs=100000", "train.checkpoint_every_steps=100"])
    args = p.parse_args()
    print(f"{'budget':>8} {'wall s':>8} {'used':>6} {'steps':>6} {'saving s':>9} {'saving %':>9}")
    for text in args.budgets:
        budget = parse_duration(text)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stage"
            start = time.time()
            subprocess.run([sys.executable, "-m", "rcic.cli.stage", "--budget", text, "--out", str(out),
                            "--quiet", "--set", *args.set], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            wall = time.time() - start
            report = json.loads((out / "stage.json").read_text())
        print(f"{text:>8} {wall:8.1f} {wall / budget:6.3f} {report['global_step']:6d} "
              f"{report['seconds_saving']:9.2f} {100 * report['seconds_saving'] / wall:8.2f}%",
              flush=True)


if __name__ == "__main__":
    main()
