"""Peak memory and fixed costs of rcic's commands, this checkout against a baseline revision,
in one run.

    python tools/bench_fixed_costs.py --data FOLDER --work DIR [--baseline REV] [--tta 8] [--workers 2]

FOLDER: an RxRx1-layout folder, e.g. written by
    rcic-synth --out FOLDER --classes 1108 --controls 30 --size 32 --experiments 2 --test-experiments 2
Steps, each a fresh process, run once with the package of --baseline (exported with
`git archive` into DIR and put first on PYTHONPATH) and once with this checkout:
  stage    rcic-stage --steps 1 (tiny model, data.image_size 32, --workers loader processes)
  pseudo   the same with pseudo-labels from epoch 0: one refresh predicts every test site
  predict  rcic-predict --tta N --plates assign with the weights the first stage wrote
  import-stage, import-predict   `import rcic.stage` / `import rcic.predict` alone: the
           imports every stage / prediction pays before it reads anything (--repeat times,
           the variants interleaved; the median is reported)
  sampler  building one epoch's plate batches (data.plate_batches) for 80,000 training sites
           on 204 plates, the full size, as every epoch start does (seconds inside the process;
           --repeat times, median)
Memory is the peak, sampled every 0.1 s, of the summed PSS of the command and every process it
started (forked loader workers' shared pages counted once), minus nothing: the whole command.
Prints a JSON line per step and variant, then a table with the ratios baseline / now.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from io import BytesIO
from pathlib import Path

from process_tree import tree_pss

REPO = Path(__file__).resolve().parent.parent
MAINS = {"stage": "rcic.cli.stage", "predict": "rcic.cli.predict"}


def measure(cmd, env, cwd):
    """Run `cmd`; -> wall seconds, peak tree PSS (MB), exit code, output tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.1)
    reader.join()
    seconds = time.perf_counter() - start
    inner = [line for line in output if line.startswith("seconds:")]   # timed inside instead
    if inner:
        seconds = float(inner[-1].split()[1])
    return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20),
            "rc": proc.returncode, "tail": "".join(output)[-600:]}


def export(revision, target):
    """The rcic package as it was at `revision`, under target/rcic."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "rcic"],
                             check=True, capture_output=True).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


SAMPLER = """
import time
import numpy as np
from rcic.data.dataset import EpochBatchSampler
plates = np.array([f"HUVEC-{e:02d}_{p}" for e in range(51) for p in range(1, 5)], dtype=object)
groups = plates[np.random.default_rng(0).integers(0, len(plates), 80000)]
start = time.perf_counter()
EpochBatchSampler(len(groups), 64, seed=0, epoch=0, groups=groups)
print("seconds:", time.perf_counter() - start)
"""
REPEATED = ("import-stage", "import-predict", "sampler")


def command(step, args, out):
    if step == "sampler":
        return [sys.executable, "-c", SAMPLER]
    if step.startswith("import-"):
        return [sys.executable, "-c", f"import rcic.{step.split('-', 1)[1]}"]
    main = MAINS["predict" if step == "predict" else "stage"]
    call = [sys.executable, "-c", f"import sys; from {main} import main; sys.exit(main())"]
    sets = ["data.image_size=32", f"data.num_workers={args.workers}", "data.batch_size=64"]
    if step == "predict":
        return call + ["--data", args.data, "--checkpoint", str(args.work / "weights"),
                       "--out", str(out / "submission.csv"), "--tta", str(args.tta),
                       "--device", "cpu", "--workers", str(args.workers)]
    if step == "pseudo":
        sets += ["pseudo.enabled=true", "pseudo.start_epoch=0", "pseudo.fraction_per_epoch=0.5"]
    return call + ["--data", args.data, "--out", str(out), "--budget", "1h", "--quiet",
                   "--resume-from", "--steps", "1", "--set", *sets]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="RxRx1 folder (stage, pseudo, predict)")
    p.add_argument("--work", required=True, type=Path, help="scratch folder (outputs, baseline)")
    p.add_argument("--baseline", help="git revision to compare with (default: none)")
    p.add_argument("--steps", default="stage,pseudo,predict")
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5, help="runs of each import-* and sampler step")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    variants = {"now": REPO}
    if args.baseline:
        variants = {"baseline": export(args.baseline, args.work / "baseline"), **variants}
    if "predict" in args.steps.split(",") and not (args.work / "weights" / "weights.pt").is_file():
        made = measure(command("stage", args, args.work / "weights"), env, args.work)
        if made["rc"]:
            raise SystemExit(f"stage for the weights failed: {made['tail']}")
    results = {}
    for step in args.steps.split(","):
        runs = {name: [] for name in variants}
        for _ in range(args.repeat if step in REPEATED else 1):
            for name, root in variants.items():
                out = args.work / f"{step}-{name}"
                result = measure(command(step, args, out), dict(env, PYTHONPATH=str(root)),
                                 args.work)
                runs[name].append(result)
                print(json.dumps({"step": step, "variant": name, **{
                    k: v for k, v in result.items() if k != "tail" or result["rc"]}}), flush=True)
        for name, done in runs.items():
            done.sort(key=lambda r: r["seconds"])
            results[(step, name)] = done[len(done) // 2]          # the median run
    print("\n| step | " + " | ".join(f"{v} peak MB | {v} s" for v in variants) +
          (" | baseline / now, peak | baseline / now, s |" if args.baseline else " |"))
    for step in args.steps.split(","):
        now = results[(step, "now")]
        row = " | ".join(f"{results[(step, v)]['peak_mb']} | {results[(step, v)]['seconds']}"
                         for v in variants)
        if args.baseline:
            base = results[(step, "baseline")]
            row += (f" | {base['peak_mb'] / max(now['peak_mb'], 1):.2f}x"
                    f" | {base['seconds'] / max(now['seconds'], 0.1):.2f}x")
        print(f"| {step} | {row} |")


if __name__ == "__main__":
    main()
