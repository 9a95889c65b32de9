"""Every step a chain pays, at 1/8, 1/4 and the full size of RxRx1 (BENCHMARKS.md "At full scale").

For each scale, a folder from `rcic-synth --preset rxrx1 --fraction F --size 32` (F = 1 is the
competition's file count: 51 experiments, 125,664 sites, 753,984 PNGs), then each step as a
real subprocess, timed from outside:

  synth       rcic-synth --workers W
  open        opening the folder: the old open (every PNG header read; re-implemented below
              as the baseline) and RxRx1(...) as it is now, each cold (page cache dropped
              first, needs root) and warm, in fresh processes
  cache       rcic-cache --size 32 --workers W
  stage       rcic-stage --steps 1 with a validation pass after step 1: seconds from process
              start to the first finished step (its progress bar, read live), and the
              validation pass (first step to the val_loss line)
  predict     rcic-predict --tta 8 (8 views x 2 sites) with the stage's weights
  plates      the plate structure learnt from train.csv and the per-plate assignment on the
              test wells (random probabilities), in one process
  submission  rcic-submission check on the predicted (or the sample) submission
  pixels      per-PNG decode and synth cost at 32 and 512 px, to extrapolate the pixel-bound
              steps to 512 px

Each step reports wall seconds, CPU seconds (user + system of the whole process tree),
peak memory of the process tree (sum of PSS, sampled every 0.2 s: forked workers' shared
pages counted once) and the largest single process's max RSS, and bytes written (du of its
output). Steps and scales are selectable, so a run can be repeated in parts:

    nice -n 10 python tools/bench_scale.py --work /tmp/scale --scales 1/8,1/4 \
        --steps synth,open,cache,stage,predict,plates,submission,pixels
    nice -n 10 python tools/bench_scale.py --work /tmp/scale --scales 1 --steps synth,open,stage

Results are appended to <work>/results.jsonl (one line a step and scale) and the table of all
results so far is printed as markdown. Data of a scale is kept in <work>/<scale>/ for later
steps; --clean removes a scale's folder after its steps.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from process_tree import tree_cpu, tree_pss

SCALES = {"1/8": 0.125, "1/4": 0.25, "1": 1.0}
STEPS = ["synth", "open", "cache", "stage", "predict", "plates", "submission", "pixels"]
BIN = Path(sys.executable).parent
STAGE_SETS = ["data.image_size=32", "data.batch_size=32", "data.num_workers=2",
              "train.epochs=1", "train.eval_every_steps=1", "train.checkpoint_every_steps=0"]


def run_step(cmd, on_output=None):
    """Run `cmd`; -> wall and CPU seconds, peak tree PSS, largest single max RSS, exit code.

    `on_output(t, text, pid)` sees stdout+stderr chunks as they arrive (t: seconds since
    start, pid: the process's)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []

    def read():
        while chunk := os.read(proc.stdout.fileno(), 65536):
            text = chunk.decode(errors="replace")
            chunks.append(text)
            if on_output:
                on_output(time.perf_counter() - start, text, proc.pid)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    output = "".join(chunks)
    if proc.returncode != 0:
        print(output[-3000:], file=sys.stderr)
    # wait4's usage covers the child and the descendants it reaped (loader workers, pools);
    # ru_maxrss is the largest single one of them.
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_tree_mb": round(peak / 2**20), "max_single_rss_mb": round(usage.ru_maxrss / 1024),
            "rc": proc.returncode, "output": output}


def du(path):
    if not Path(path).exists():
        return 0
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
               .stdout.split()[0])


def drop_caches():
    """Cold start: write back and drop the page cache (root only)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- the open, old and new (run in a fresh process each) ---------------------------------------
def open_old(root):
    """The open as it was before the listing check: every PNG's header read, one by one."""
    from collections import defaultdict
    from rcic.data import layout
    data = layout.RxRx1(root, check_images=False)
    problems = layout.Problems(data.root)
    by_size = defaultdict(list)
    for row in data.sites.itertuples(index=False):
        for path in data.paths(row):
            head = layout.png_header(path) if path.exists() else "missing"
            rel = path.relative_to(data.root)
            if isinstance(head, str):
                problems.add(f"{rel} is {head}")
                continue
            width, height, depth, color = head
            if depth != 8 or color != 0:
                problems.add(f"{rel} is not 8-bit grayscale")
            else:
                by_size[(height, width)].append(rel)
    problems.raise_if_any("")
    return len(data.sites)


def open_new(root):
    from rcic.data.layout import RxRx1
    return len(RxRx1(root).sites)


def open_child(kind, root):
    started = time.perf_counter()
    import rcic.data.layout  # noqa: F401  (imports counted apart from the open itself)
    imported = time.perf_counter()
    sites = (open_old if kind == "old" else open_new)(root)
    print(json.dumps({"import_s": round(imported - started, 2),
                      "open_s": round(time.perf_counter() - imported, 2), "sites": sites}))


def plates_child(root):
    import numpy as np
    from rcic.data.layout import RxRx1
    from rcic.plates import PlateStructure, plate_step
    data = RxRx1(root, check_images=False)
    wells = data.test_sites().drop_duplicates("id_code").reset_index(drop=True)
    probs = np.random.default_rng(0).dirichlet(np.full(data.n_treatments, 0.05), len(wells))
    started = time.perf_counter()
    structure = PlateStructure.learn(data.wells, data.n_treatments)
    learnt = time.perf_counter()
    pred = plate_step("assign", wells, probs, structure)
    done = time.perf_counter()
    print(json.dumps({"learn_s": round(learnt - started, 2), "assign_s": round(done - learnt, 2),
                      "wells": len(pred)}))


def pixels_child():
    """Per-PNG CPU costs at 32 and 512 px: decode (cv2.imread) and synth (render + encode);
    CPU time, not wall, so that other load on the machine does not count."""
    import cv2
    import numpy as np
    from rcic.data.synthetic import SynthSpec, class_profiles, render_site, _rng
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (32, 512):
            spec = SynthSpec(image_size=size)
            profiles, radius = class_profiles(spec)
            n = 240 if size == 32 else 24
            started = time.process_time()
            paths = []
            for i in range(n // 6):
                img = render_site(spec, profiles[i], radius[i], np.ones(6), np.zeros(6),
                                  _rng(0, "bench", i))
                for c in range(6):
                    path = Path(tmp) / f"{size}_{i}_{c}.png"
                    path.write_bytes(cv2.imencode(".png", img[c])[1].tobytes())
                    paths.append(path)
            synth = (time.process_time() - started) / n
            started = time.process_time()
            for _ in range(3):
                for path in paths:
                    cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            decode = (time.process_time() - started) / (3 * n)
            out[size] = {"synth_ms_per_png": round(synth * 1e3, 3),
                         "decode_ms_per_png": round(decode * 1e3, 3),
                         "png_bytes": round(sum(p.stat().st_size for p in paths) / n)}
    print(json.dumps(out))


def child_json(output):
    return json.loads(output.strip().splitlines()[-1])


# -- the steps ---------------------------------------------------------------------------------
def step_synth(ctx):
    """rcic-synth with the given workers; with ctx.synth_baseline also with one worker first
    (the same files: the baseline of the parallel writing), into a folder deleted after."""
    rows = {}
    runs = [("1 worker", ctx.dir / "data-1-worker", 1)] if ctx.synth_baseline else []
    for label, out, workers in runs + [(f"{ctx.workers} workers", ctx.data, ctx.workers)]:
        shutil.rmtree(out, ignore_errors=True)
        r = run_step([str(BIN / "rcic-synth"), "--preset", "rxrx1", "--fraction",
                      str(ctx.fraction), "--size", "32", "--out", str(out),
                      "--workers", str(workers)])
        r["bytes"] = du(out)
        rows[label] = r
        if out != ctx.data:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def step_open(ctx):
    rows = {}
    for kind in ctx.open_kinds:
        for temp in ("cold", "warm"):
            if temp == "cold":
                drop_caches()
            r = run_step([sys.executable, __file__, "--_open", kind, str(ctx.data)])
            if r["rc"] == 0:
                r.update(child_json(r["output"]))
            rows[f"{kind} {temp}"] = r
    for temp in ("cold", "warm"):
        if f"old {temp}" in rows and f"new {temp}" in rows:
            old, new = rows[f"old {temp}"], rows[f"new {temp}"]
            new["speedup_vs_old"] = round(old["wall_s"] / new["wall_s"], 1)
    return rows


def step_cache(ctx):
    shutil.rmtree(ctx.cache, ignore_errors=True)
    r = run_step([str(BIN / "rcic-cache"), "--data", str(ctx.data), "--out", str(ctx.cache),
                  "--size", "32", "--workers", str(ctx.workers)])
    r["bytes"] = du(ctx.cache)
    return r


def step_stage(ctx, cold=False):
    shutil.rmtree(ctx.stage, ignore_errors=True)
    marks = {}

    def watch(t, text, pid):
        if "first_step_s" not in marks and re.search(r"\|\s*1/\d+", text):
            marks["first_step_s"] = round(t, 2)
            # On a shared machine the wall clock counts other jobs' time; CPU does not.
            marks["first_step_cpu_s"] = round(tree_cpu(pid), 1)
        if "val_done_s" not in marks and "val_loss" in text:
            marks["val_done_s"] = round(t, 2)

    if cold:
        drop_caches()
    r = run_step([str(BIN / "rcic-stage"), "--data", str(ctx.data), "--out", str(ctx.stage),
                  "--budget", "2h", "--steps", "1", "--set", *STAGE_SETS], on_output=watch)
    r.update(marks)
    if "first_step_s" in marks and "val_done_s" in marks:
        r["validation_s"] = round(marks["val_done_s"] - marks["first_step_s"], 2)
    r["bytes"] = du(ctx.stage)
    return r


def step_predict(ctx):
    ctx.submission.parent.mkdir(parents=True, exist_ok=True)
    r = run_step([str(BIN / "rcic-predict"), "--data", str(ctx.data), "--checkpoint",
                  str(ctx.stage), "--out", str(ctx.submission), "--tta", "8",
                  "--workers", str(ctx.workers), "--batch-size", "256"])
    r["bytes"] = du(ctx.submission.parent)
    return r


def step_plates(ctx):
    r = run_step([sys.executable, __file__, "--_plates", str(ctx.data)])
    if r["rc"] == 0:
        r.update(child_json(r["output"]))
    return r


def step_submission(ctx):
    path = ctx.submission if ctx.submission.is_file() else ctx.data / "sample_submission.csv"
    r = run_step([str(BIN / "rcic-submission"), "check", str(path), "--data", str(ctx.data)])
    r["checked"] = path.name
    return r


def step_pixels(ctx):
    r = run_step([sys.executable, __file__, "--_pixels"])
    if r["rc"] == 0:
        r["per_png"] = child_json(r["output"])
    return r


class Context:
    def __init__(self, work, scale, workers, open_kinds):
        self.scale, self.fraction, self.workers = scale, SCALES[scale], workers
        self.open_kinds = open_kinds
        self.dir = Path(work) / scale.replace("/", "_")
        self.data, self.cache = self.dir / "data", self.dir / "cache"
        self.stage, self.submission = self.dir / "stage", self.dir / "predict" / "submission.csv"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/rcic-bench-scale")
    p.add_argument("--scales", default="1/8,1/4")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--stage-cold", action="store_true",
                   help="drop the page cache before the stage too (needs root)")
    p.add_argument("--synth-baseline", action="store_true",
                   help="also time rcic-synth with one worker (the baseline of --workers)")
    p.add_argument("--open", default="old,new",
                   help="which opens to time: old (every header, the baseline), new, or both")
    p.add_argument("--clean", action="store_true", help="delete each scale's folder after it")
    p.add_argument("--_open", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_plates", help=argparse.SUPPRESS)
    p.add_argument("--_pixels", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._open:
        return open_child(*args._open)
    if args._plates:
        return plates_child(args._plates)
    if args._pixels:
        return pixels_child()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    unknown = set(steps) - set(STEPS) or set(args.scales.split(",")) - set(SCALES)
    if unknown:
        p.error(f"unknown step or scale {sorted(unknown)}: steps {STEPS}, scales {list(SCALES)}")
    load = os.getloadavg()[0]
    for scale in args.scales.split(","):
        ctx = Context(work, scale, args.workers, args.open.split(","))
        ctx.synth_baseline = args.synth_baseline
        ctx.dir.mkdir(parents=True, exist_ok=True)
        for step in STEPS:
            if step not in steps:
                continue
            print(f"bench_scale: {scale} {step} ...", file=sys.stderr, flush=True)
            fn = globals()[f"step_{step}"]
            result = fn(ctx, cold=args.stage_cold) if step == "stage" else fn(ctx)
            rows = ({f"{step} {k}": v for k, v in result.items()} if step in ("open", "synth") else
                    {"stage cold" if step == "stage" and args.stage_cold else step: result})
            with open(work / "results.jsonl", "a") as f:
                for variant, r in rows.items():
                    r.pop("output", None)
                    record = {"scale": scale, "step": variant or step,
                              "load_before": round(load, 1), "time": time.strftime("%H:%M:%S"),
                              **r}
                    f.write(json.dumps(record) + "\n")
                    print(json.dumps(record), file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
        if args.clean:
            shutil.rmtree(ctx.dir, ignore_errors=True)
    print(table(work / "results.jsonl"))


def table(path):
    """Markdown: one row a step, one column group a scale (the newest result of each)."""
    latest = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        latest[(r["step"], r["scale"])] = r
    scales = [s for s in SCALES if any(k[1] == s for k in latest)]
    steps = list(dict.fromkeys(k[0] for k in latest))
    head = "| step | " + " | ".join(f"{s}: wall s / CPU s / peak MB" for s in scales) + " |"
    lines = [head, "|---|" + "---|" * len(scales)]
    for step in steps:
        cells = []
        for s in scales:
            r = latest.get((step, s))
            cells.append("" if r is None else
                         f"{r['wall_s']} / {r['cpu_s']} / {r['peak_tree_mb']}"
                         + ("" if r["rc"] == 0 else f" (exit {r['rc']})"))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
