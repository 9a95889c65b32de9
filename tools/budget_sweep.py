"""Does every recipe end inside its budget, whatever one unit of its work costs?

Runs `rcic-stage --config R --budget B` for every recipe in configs/ on the embedded data at the
recipe's own image size (512 px for the real recipes: one step of a big model takes minutes on
a CPU), with each budget, as a real subprocess timed from outside. A run passes when it exits
inside its budget, either having trained (exit 0, stage.json) or with one line on stderr
(exit 2) and never a traceback. Prints one row per run and exits 1 if any run failed.

    nice -n 10 python tools/budget_sweep.py --budgets 40s 90s
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcic.budget import parse_duration

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run(config, budget_text, out):
    cmd = [sys.executable, "-m", "rcic.cli.stage", "--config", str(config), "--budget", budget_text,
           "--out", str(out), "--quiet"]
    launched = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - launched
    report_path = out / "stage.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    # tqdm redraws with carriage returns: a line is what remains after the last one.
    lines = [line.rsplit("\r", 1)[-1].strip() for line in result.stderr.splitlines()]
    return seconds, result.returncode, report, [line for line in lines if line]


def verdict(seconds, budget, code, report, lines):
    """ok when in time and either trained, or one error line on a line of its own (log lines,
    "rcic: ...", may come before it)."""
    errors = [line for line in lines if "rcic-stage: error:" in line]
    if seconds >= budget:
        return f"LATE by {seconds - budget:.1f} s"
    if any("Traceback" in line for line in lines):
        return "TRACEBACK"
    if code == 0 and report:
        return "ok: trained"
    if code == 2 and len(errors) == 1 and errors[0].startswith("rcic-stage: error:"):
        return "ok: one line"
    return f"FAILED (exit {code}, {len(errors)} error lines)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["40s", "90s"])
    p.add_argument("--configs", nargs="+", type=Path, default=sorted(CONFIGS.glob("*.yaml")))
    args = p.parse_args()
    failed = 0
    print(f"{'recipe':<36} {'budget':>6} {'exit s':>7} {'used':>6} {'code':>4} {'steps':>5} "
          f"{'stopped by':>10}  verdict", flush=True)
    for config in args.configs:
        for text in args.budgets:
            budget = parse_duration(text)
            with tempfile.TemporaryDirectory() as tmp:
                seconds, code, report, lines = run(config, text, Path(tmp) / "out")
            result = verdict(seconds, budget, code, report, lines)
            failed += not result.startswith("ok")
            print(f"{config.stem:<36} {text:>6} {seconds:7.1f} {seconds / budget:6.3f} {code:>4} "
                  f"{report.get('steps_this_stage', '-'):>5} {str(report.get('stopped_by', '-')):>10}"
                  f"  {result}", flush=True)
            if code != 0 or not result.startswith("ok"):
                for line in lines[-3:]:
                    print(f"    {line[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
