"""How much of its budget does a stage use, and does it ever exit late?

Runs `rcic-stage` on the embedded data as a real subprocess, timed from outside (launch to exit:
interpreter start, loader workers joined, plot written, interpreter gone), for each budget,
recipe and machine load:

  recipes  tiny       the tiny CPU recipe made far too long to finish (a step ~0.1-0.3 s)
           long-step  the same at 192 px with 8 micro-batches a step (a step ~10-40 s here),
                      so the last step does not fit long before the budget ends
  load     idle       nothing else of ours running
           busy       one CPU burner process beside the stage for its whole run

Prints, per run: the exit time, the fraction of the budget used, the overrun (exit after the
budget; must be 0), the steps, what stopped the stage, and where the budget went.

    nice -n 10 python tools/bench_budget.py --budgets 1m 3m 10m --loads idle busy
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcic.budget import parse_duration

RECIPES = {
    "tiny": ["train.epochs=100000", "train.checkpoint_every_steps=100"],
    "long-step": ["train.epochs=100000", "data.image_size=192", "data.batch_size=16",
                  "optim.accumulation_steps=8", "train.checkpoint_every_steps=4"],
}
BURNER = [sys.executable, "-c", "while True: pass"]


def run_stage(budget_text, sets, out):
    """(seconds from launch to exit, return code, stage.json or None, last stderr line)."""
    cmd = [sys.executable, "-m", "rcic.cli.stage", "--budget", budget_text, "--out", str(out),
           "--quiet", "--set", *sets]
    launched = time.monotonic()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - launched
    report_path = out / "stage.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    lines = result.stderr.strip().splitlines()
    return seconds, result.returncode, report, lines[-1] if lines else ""


def stopped_by(report, code):
    """What stopped the stage; for a kill at the deadline, also the unit it interrupted."""
    if "stopped_by" not in report:
        return f"exit {code}"
    interrupted = report.get("interrupted")
    return report["stopped_by"] + (f"/{interrupted}" if interrupted else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["1m", "3m", "10m"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    args = p.parse_args()
    print(f"{'budget':>6} {'load':>5} {'recipe':>9} {'exit s':>7} {'used':>6} {'overrun':>7} "
          f"{'steps':>5} {'stopped by':>10} {'start-up':>8} {'1st step':>8} {'saving':>7} "
          f"{'eval':>6} {'teardown':>8}", flush=True)
    for text in args.budgets:
        budget = parse_duration(text)
        for load in args.loads:
            for name in args.recipes:
                burner = subprocess.Popen(BURNER) if load == "busy" else None
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        seconds, code, report, last = run_stage(text, RECIPES[name], Path(tmp) / "stage")
                finally:
                    if burner:
                        burner.kill()
                        burner.wait()
                report = report or {}
                costs = report.get("costs", {})
                def cell(key):
                    value = costs.get(key)
                    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"
                print(f"{text:>6} {load:>5} {name:>9} {seconds:7.1f} {seconds / budget:6.3f} "
                      f"{max(0.0, seconds - budget):7.2f} {report.get('steps_this_stage', '-'):>5} "
                      f"{stopped_by(report, code):>10} "
                      f"{cell('startup_seconds'):>8} {cell('first_step_seconds'):>8} "
                      f"{cell('save_seconds'):>7} {cell('eval_seconds'):>6} "
                      f"{cell('teardown_seconds'):>8}", flush=True)
                if code != 0:
                    print(f"       exit {code}: {last}", flush=True)


if __name__ == "__main__":
    main()
