"""GPU truth in one command: what only a GPU shows, measured in at most 8 minutes.

Runs, each part as its own subprocess under its own time cap (a part that hangs is killed and
recorded as "timed out"; the parts after it still run):

  env     the machine: GPU name(s), driver, CUDA, cuDNN, torch, cores
  tests   the `cuda` tests (tests/test_cuda.py) through pytest
  memory  the memory plan of every recipe in configs/ against torch.cuda.max_memory_allocated
          (tools/gpu_memory_check.py): within 15%, or the plan's allowance needs correcting
  data    a synthetic RxRx1 folder and its raw caches at every benchmarked size
  step    tools/bench_train.py for each backbone and size: the baseline step (fp32, NCHW) against
          rcic's (AMP, channels_last, fused Adam): images/s, share of time waiting for data,
          peak GPU memory, the largest batch that fits (bounded search)
  loader  tools/bench_loader.py with one worker per core
  stage   rcic-stage on the GPU under a budget, then its resume: budget used, checkpoints,
          start-up time (timed from outside)

and then the arithmetic: from the measured images/s, the hours a winners-level recipe needs on
this GPU and, scaled by peak fp16 tensor FLOP rates, on Kaggle's T4 x2 (an estimate).

It writes OUT/gpu_check.json, OUT/gpu_check.md (tables ready for BENCHMARKS.md) and one log
per part under OUT/logs/.

    python tools/gpu_check.py --out gpu_check/          # on a GPU machine
    python tools/gpu_check.py --dry --out /tmp/dry      # the same code at tiny sizes on the CPU
    python tools/gpu_check.py --parts env step --cap step=60 --out gpu_check/   # one part again
"""
import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcic.kaggle.session import GPU_CPU_LIMIT_SECONDS, default_budget_seconds

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["env", "tests", "memory", "data", "step", "loader", "stage"]
TOTAL_CAP = 480          # seconds: the sum of the GPU plan's caps must stay inside 8 minutes

# Peak dense fp16 tensor-core rates (TFLOPS, no sparsity) from NVIDIA's data sheets, matched
# against the device name in this order (the first match wins).
PEAK_FP16_TFLOPS = [
    (r"H200", 989.0), (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100", 989.0),
    (r"A100", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
    (r"V100", 125.0), (r"\bT4\b", 65.0),
]
KAGGLE_T4_TFLOPS, KAGGLE_GPUS = 65.0, 2        # Kaggle's NvidiaTeslaT4 machine: two T4s
KAGGLE_WEEKLY_HOURS = 30.0
# The stage budget rcic-chain init derives for a 12-hour T4 x2 session, for a model of about
# DenseNet201's size with its heads (20 million parameters: what Kaggle saves after a stage).
KAGGLE_STAGE_HOURS = default_budget_seconds(GPU_CPU_LIMIT_SECONDS, 20_000_000) / 3600

# RxRx1 as shipped: 36,515 train.csv wells, about 4,092 train and 2,232 test control wells,
# two sites each. A recipe with use_controls and use_test_controls trains on all of them.
RXRX1_TRAIN_SITES = 2 * 36_515
RXRX1_CONTROL_SITES = 2 * 4_092 + 2 * 2_232
WINNERS_RECIPE = ROOT / "configs" / "winners-densenet201-arcface.yaml"


@dataclass
class Plan:
    """Every size and time cap of one run: the GPU plan, or the dry run's tiny one."""
    backbones: list
    sizes: list
    batch: dict               # px -> batch of the step benchmark
    max_batch: dict           # px -> bound of the largest-batch search
    step_workers: int         # DataLoader processes of the step benchmark
    warmup: int
    steps: int
    rounds: int
    synth: dict               # rcic-synth arguments (images are upsampled by the caches)
    loader: dict              # bench_loader arguments
    stage_sets: list          # recipe overrides of the stage
    stage_size: int
    stage_budget: int         # seconds
    resume_budget: int
    resume_steps: int         # 0: the resume runs until its budget ends
    estimate_model: tuple     # (backbone, px) the estimate is computed from
    peak_tflops: float = None  # stand-in peak when the device has none in the table (dry run)
    caps: dict = field(default_factory=dict)
    stage_steps: int = 0       # 0: the first stage runs until its budget ends

    def step_cap(self, size):
        return self.caps[f"step {size}"]


def gpu_plan(cores, stage_budget):
    return Plan(
        backbones=["resnet50", "densenet121", "efficientnet-b0", "efficientnet-b5"],
        sizes=[256, 512], batch={256: 64, 512: 32}, max_batch={256: 1024, 512: 512},
        step_workers=cores, warmup=3, steps=8, rounds=2,
        synth={"classes": 80, "experiments": 5, "size": 64},
        loader={"size": 256, "classes": 16, "seconds": 1.0, "workers": cores},
        stage_sets=["model.backbone=resnet50", "data.batch_size=64", f"data.num_workers={cores}",
                    "train.epochs=1000", "train.checkpoint_every_steps=200"],
        stage_size=256, stage_budget=stage_budget, resume_budget=20, resume_steps=0,
        estimate_model=("efficientnet-b5", 512),
        caps={"env": 15, "tests": 140, "memory": 90, "data": 35, "step 256": 18, "step 512": 26,
              "loader": 20,
              "stage": stage_budget + 10, "resume": 28})


def dry_plan(cores):
    return Plan(
        backbones=["tiny"], sizes=[32], batch={32: 8}, max_batch={32: 16},
        step_workers=0, warmup=1, steps=3, rounds=1,
        synth={"classes": 16, "experiments": 2, "size": 32},
        loader={"size": 32, "classes": 4, "seconds": 0.2, "workers": cores},
        # Deterministic kernels, as the cuda tests ask for them: stage.json's `runtime` shows
        # that the worker (not only the command that launched it) runs with them.
        stage_sets=["data.batch_size=8", "data.num_workers=0", "train.epochs=1000",
                    "train.checkpoint_every_steps=5", "train.deterministic=true"],
        # A stage refuses a budget its start-up would eat (about 5 s of CPU here): 30 s
        # budgets, with step limits so the dry run's CPU stays small.
        stage_size=32, stage_budget=30, resume_budget=30, resume_steps=2, stage_steps=6,
        estimate_model=("tiny", 32), peak_tflops=1.0,
        # Generous: each part takes a few seconds of CPU, mostly imports, but a shared CPU
        # can make that several times longer; a part past a minute is broken.
        caps={part: 60 for part in ("env", "tests", "memory", "data", "step 32", "loader", "stage",
                                    "resume")})


def plan_seconds(plan):
    """The most the plan can take: every part at its cap."""
    caps = plan.caps
    return (caps["env"] + caps["tests"] + caps["data"] + caps["loader"] + caps["stage"]
            + caps["resume"] + len(plan.backbones) * sum(plan.step_cap(s) for s in plan.sizes))


# -- running parts ---------------------------------------------------------------------------
def run_commands(commands, cap, log, env, on_poll=None):
    """Run commands one after another inside one time cap; on timeout kill the whole process
    group (torchrun, DataLoader workers and all). Returns (status, seconds)."""
    started = time.monotonic()
    deadline = started + cap
    status = "ok"
    with open(log, "a") as out:
        for cmd in commands:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                if on_poll:
                    on_poll()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.write(f"\n[gpu_check: killed after its {cap:.0f} s cap]\n")
                status = "timed out"
                break
            if proc.returncode != 0:
                status = f"failed (exit {proc.returncode})"
                break
    return status, round(time.monotonic() - started, 2)


class Check:
    """Every part writes under `out` (absolute: the parts run from the repository root); a new
    check starts from an empty work folder, so a second run in the same place works."""

    def __init__(self, out, plan, dry, caps_override):
        self.out, self.plan, self.dry = out, plan, dry
        plan.caps.update(caps_override)
        self.work = out / "work"
        self.logs = out / "logs"
        shutil.rmtree(self.work, ignore_errors=True)
        for folder in (self.work, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RCIC_HOME"] = str(self.work / "rcic_home")
        if dry:
            # The dry run is the CPU's, even on a machine that has a GPU; one torch thread a
            # process, as on a shared CPU it is often several times faster.
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.parts = {}       # part name -> {"status", "seconds", "cap_seconds", "log"}

    def run(self, name, commands, cap, on_poll=None):
        log = self.logs / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".log")
        log.write_text("")
        status, seconds = run_commands(commands, cap, log, self.env, on_poll)
        self.parts[name] = {"status": status, "seconds": seconds, "cap_seconds": cap,
                            "log": str(log.relative_to(self.out))}
        print(f"gpu_check: {name:<26} {status:<16} {seconds:7.1f} s (cap {cap} s)", flush=True)
        return status

    # -- env ------------------------------------------------------------------------------------
    def probe_env(self):
        probe = self.work / "env.json"
        code = ("import json, os, platform, sys, torch\n"
                "gpus = [torch.cuda.get_device_properties(i)\n"
                "        for i in range(torch.cuda.device_count())]\n"
                "json.dump({'torch': torch.__version__, 'python': platform.python_version(),\n"
                " 'cpu_cores': os.cpu_count(), 'cuda': torch.version.cuda,\n"
                " 'cudnn': torch.backends.cudnn.version(),\n"
                " 'gpus': [{'name': g.name, 'memory_gib': round(g.total_memory / 2 ** 30, 1),\n"
                "           'capability': f'{g.major}.{g.minor}'} for g in gpus]},\n"
                " open(sys.argv[1], 'w'))\n")
        self.run("env", [[sys.executable, "-c", code, str(probe)]], self.plan.caps["env"])
        env = json.loads(probe.read_text()) if probe.exists() else {}
        env["driver"] = nvidia_driver()
        gpus = env.get("gpus") or []
        if self.dry:
            env["device"] = "cpu (dry run)"
        elif gpus:
            env["device"] = f"{len(gpus)} x {gpus[0]['name']}" if len(gpus) > 1 else gpus[0]["name"]
        else:
            env["device"] = "cpu (no GPU found)"
        return env

    # -- tests ----------------------------------------------------------------------------------
    def cuda_tests(self):
        report = self.work / "cuda_tests.xml"
        report.unlink(missing_ok=True)
        self.run("tests", [[sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                            "-m", "cuda", "tests/test_cuda.py", f"--junitxml={report}"]],
                 self.plan.caps["tests"])
        return read_junit(report) if report.exists() else []

    # -- memory -------------------------------------------------------------------------------
    def memory_plan(self):
        """rcic's memory plan (rcic/memory.py) against torch.cuda.max_memory_allocated for every
        recipe in configs/ at its size (tools/gpu_memory_check.py; its log has the table): ok
        when each is within 15%. The dry run takes the tiny recipe through the same code."""
        return self.run("memory", [[sys.executable, "tools/gpu_memory_check.py",
                                    *(["--dry"] if self.dry else [])]], self.plan.caps["memory"])

    # -- data -----------------------------------------------------------------------------------
    def prepare_data(self):
        synth = self.plan.synth
        data = self.work / "data"
        commands = [] if (data / "train.csv").exists() else [
            ["rcic-synth", "--out", str(data), "--classes", str(synth["classes"]), "--controls",
             "1", "--size", str(synth["size"]), "--experiments", str(synth["experiments"]),
             "--test-experiments", "1", "--cell-types", "HUVEC"]]
        for size in sorted({*self.plan.sizes, self.plan.stage_size}):
            commands.append(["rcic-cache", "--data", str(data), "--out", str(self.cache(size)),
                             "--size", str(size), "--split", "train"])
        return self.run("data", commands, self.plan.caps["data"]) == "ok"

    def cache(self, size):
        return self.work / f"cache-{size}"

    # -- step -----------------------------------------------------------------------------------
    def training_steps(self):
        plan, rows = self.plan, []
        for size in plan.sizes:
            for backbone in plan.backbones:
                result = self.work / f"step-{backbone}-{size}.json"
                result.unlink(missing_ok=True)
                status = self.run(f"step {backbone} {size}", [[
                    sys.executable, "tools/bench_train.py", "--data", str(self.work / "data"),
                    "--cache", str(self.cache(size)), "--backbone", backbone, "--size", str(size),
                    "--batch", str(plan.batch[size]), "--workers", str(plan.step_workers),
                    "--warmup", str(plan.warmup), "--steps", str(plan.steps),
                    "--rounds", str(plan.rounds), "--max-batch", str(plan.max_batch[size]),
                    "--json", str(result)]], plan.step_cap(size))
                row = {"backbone": backbone, "size": size, "status": status}
                if result.exists():   # written before the batch search: kept if that timed out
                    row.update(json.loads(result.read_text()))
                rows.append(row)
        return rows

    # -- loader ---------------------------------------------------------------------------------
    def input_pipeline(self):
        loader, result = self.plan.loader, self.work / "loader.json"
        result.unlink(missing_ok=True)
        self.run("loader", [[sys.executable, "tools/bench_loader.py", "--size", str(loader["size"]),
                             "--classes", str(loader["classes"]), "--seconds",
                             str(loader["seconds"]), "--workers", str(loader["workers"]),
                             "--paths", "seeds", "cache-raw", "--json", str(result)]],
                 self.plan.caps["loader"])
        return json.loads(result.read_text()) if result.exists() else None

    # -- stage ----------------------------------------------------------------------------------
    def real_stage(self):
        plan = self.plan
        out = self.work / "stage"
        shutil.rmtree(out, ignore_errors=True)   # a fresh start, not a resume of an older check
        sets = [f"data.image_size={plan.stage_size}", f"data.cache={self.cache(plan.stage_size)}",
                *plan.stage_sets]
        runs = []
        for name, budget, steps in (("stage", plan.stage_budget, plan.stage_steps),
                                    ("resume", plan.resume_budget, plan.resume_steps)):
            cmd = ["rcic-stage", "--data", str(self.work / "data"), "--out", str(out),
                   "--budget", f"{budget}s", "--quiet", "--set", *sets]
            if steps:
                cmd[1:1] = ["--steps", str(steps)]
            (out / "stage.json").unlink(missing_ok=True)
            seen = set()

            def watch():   # checkpoints committed, seen from outside (older ones are pruned)
                if out.is_dir():
                    seen.update(p.name for p in out.glob("ckpt-*"))

            watch()
            before = set(seen)

            launched = time.time()
            status = self.run(name, [cmd], plan.caps[name], on_poll=watch)
            wall = self.parts[name]["seconds"]
            watch()
            run = {"run": name, "status": status, "budget_seconds": budget, "wall_seconds": wall,
                   "checkpoints_seen": len(seen - before),
                   "startup_seconds": startup_seconds(out / "stage.log", launched)}
            if (out / "stage.json").exists():
                report = json.loads((out / "stage.json").read_text())
                run.update({k: report.get(k) for k in (
                    "seconds_used", "steps_this_stage", "global_step", "samples_per_second",
                    "resumed_from", "done", "stopped_by", "runtime")})
                costs = report.get("costs") or {}
                run["first_step_seconds"] = costs.get("first_step_seconds")
                run["save_seconds"] = costs.get("save_seconds")
                run["used"] = round(report["seconds_used"] / budget, 4)
            runs.append(run)
        return runs


def nvidia_driver():
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.split("\n")[0].strip() or None


def read_junit(path):
    """[{"test", "outcome", "message"}] from pytest's JUnit XML."""
    rows = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
                message = ((found.get("message") or "").splitlines() or [""])[0][:160]
                break
        rows.append({"test": case.get("name"), "outcome": outcome, "message": message,
                     "seconds": float(case.get("time") or 0)})
    return rows


STARTED_LINE = re.compile(r"^(\S+ \S+) INFO (resumed from|no checkpoint of recipe)")


def startup_seconds(log, launched):
    """From launch to the line the stage logs just before training starts (stage.log)."""
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        match = STARTED_LINE.match(line)
        if match:
            when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when >= launched - 1:
                return round(when - launched, 2)
    return None


# -- the arithmetic --------------------------------------------------------------------------
def peak_tflops(device_name):
    for pattern, tflops in PEAK_FP16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def estimate(rows, plan, env, peak_override):
    """Hours of the winners' recipe here and, scaled by peak fp16 FLOP rates, on Kaggle T4 x2."""
    from rcic.config import load_recipe   # the parts need rcic installed; so does this
    recipe = load_recipe(str(WINNERS_RECIPE))
    backbone, size = plan.estimate_model
    row = next((r for r in rows if (r["backbone"], r["size"]) == (backbone, size)
                and "variants" in r), None)
    gpus = env.get("gpus") or []
    if peak_override:
        peak, peak_source = peak_override, "--peak-tflops"
    elif plan.peak_tflops:
        peak, peak_source = plan.peak_tflops, "nominal stand-in (dry run: a CPU has no entry)"
    else:
        peak = peak_tflops(gpus[0]["name"]) if gpus else None
        peak_source = "the table in tools/gpu_check.py" if peak else \
            "unknown device: pass --peak-tflops"
    sites = RXRX1_TRAIN_SITES + RXRX1_CONTROL_SITES
    result = {"label": "estimate", "model": backbone, "size": size, "recipe": recipe.name,
              "epochs": recipe.train.epochs, "sites_per_epoch": sites,
              "peak_tflops_here": peak, "peak_source": peak_source,
              "kaggle_tflops": KAGGLE_T4_TFLOPS * KAGGLE_GPUS,
              "stage_hours": KAGGLE_STAGE_HOURS, "weekly_quota_hours": KAGGLE_WEEKLY_HOURS}
    if row is None:
        result["missing"] = f"no step measurement of {backbone} at {size} px"
        return result
    rate = row["variants"]["rcic"]["images_per_s"]
    hours = recipe.train.epochs * sites / rate / 3600
    result.update({"images_per_s_here": rate, "hours_here": round(hours, 2)})
    if peak:
        # The step benchmark runs on one GPU, whatever the machine has.
        scale = result["kaggle_tflops"] / peak
        kaggle_hours = hours / scale
        result.update({"scale": round(scale, 4), "images_per_s_kaggle": round(rate * scale, 2),
                       "hours_kaggle": round(kaggle_hours, 2),
                       "stages_kaggle": math.ceil(kaggle_hours / KAGGLE_STAGE_HOURS),
                       "weeks_of_quota_kaggle": round(kaggle_hours / KAGGLE_WEEKLY_HOURS, 2)})
    return result


# -- the markdown table ----------------------------------------------------------------------
def describe_runtime(runtime):
    """How the stage's worker says it ran (stage.json `runtime`), in a table cell."""
    if not runtime:
        return "-"
    kernels = "deterministic" if runtime["deterministic"] else (
        "cuDNN autotuned" if runtime["cudnn_benchmark"] else "default kernels")
    ranks = f", {runtime['world_size']} ranks over {runtime['backend']}" if runtime["world_size"] > 1 else ""
    return f"{runtime['device']}, {kernels}{ranks}"


def fmt(value, spec="", none="-"):
    if value is None:
        return none
    return format(value, spec) if spec else str(value)


def markdown(result):
    env, lines = result["env"], []
    add = lines.append
    dry = result["dry"]
    add(f"### GPU check: {env['device']}" + (" (a CPU dry run, not a measurement)" if dry else ""))
    add("")
    add(f"`{result['command']}`, {result['date']}, {result['seconds']:.0f} s "
        f"(every part at its cap: {result['cap_seconds']} s)")
    add("")
    gpus = env.get("gpus") or []
    add("| device | driver | CUDA | cuDNN | torch | Python | CPU cores |")
    add("|---|---|---|---|---|---|---|")
    memory = f" ({gpus[0]['memory_gib']} GiB)" if gpus and not dry else ""
    add(f"| {env['device']}{memory} | {fmt(env.get('driver'))} | {fmt(env.get('cuda'))} | "
        f"{fmt(env.get('cudnn'))} | {fmt(env.get('torch'))} | {fmt(env.get('python'))} | "
        f"{fmt(env.get('cpu_cores'))} |")
    add("")
    add("| part | status | seconds | cap |")
    add("|---|---|---|---|")
    for name, part in result["parts"].items():
        add(f"| {name} | {part['status']} | {part['seconds']:.1f} | {part['cap_seconds']} |")
    add("")
    add("CUDA tests (`pytest -m cuda tests/test_cuda.py`):")
    add("")
    add("| test | outcome | note |")
    add("|---|---|---|")
    for test in result["tests"]:
        add(f"| {test['test']} | {test['outcome']} | {test['message'].replace('|', '/')} |")
    add("")
    add("Training step (`tools/bench_train.py`; images/s: best round; waits: share of the time "
        "the step waited for data; peak: GPU memory while measured; largest batch: doubling "
        "search, \">=\" where it reached its bound):")
    add("")
    add("| backbone | px | batch | baseline img/s | rcic img/s | x baseline | waits base / rcic "
        "| peak GiB base / rcic | largest batch base / rcic | status |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for row in result["training"]:
        v = row.get("variants") or {}
        base, own = v.get("baseline", {}), v.get("rcic", {})

        def largest(x):
            batch = x.get("largest_batch")
            if batch is None:
                return "-"
            return (">=" if x.get("largest_batch_at_bound") else "") + str(batch)
        add(f"| {row['backbone']} | {row['size']} | {fmt(row.get('batch'))} | "
            f"{fmt(base.get('images_per_s'), '.1f')} | {fmt(own.get('images_per_s'), '.1f')} | "
            f"{fmt(own.get('x_baseline'), '.2f')} | {fmt(base.get('waits'), '.1%')} / "
            f"{fmt(own.get('waits'), '.1%')} | {fmt(base.get('peak_memory_gib'), '.2f')} / "
            f"{fmt(own.get('peak_memory_gib'), '.2f')} | {largest(base)} / {largest(own)} | "
            f"{row['status']} |")
    add("")
    loader = result["loader"]
    if loader:
        add(f"Input pipeline (`tools/bench_loader.py`, {loader['size']} px, "
            f"{loader['workers']} workers = cores):")
        add("")
        add(f"| path | per core /s | {loader['workers']} workers /s | x seeds (workers) |")
        add("|---|---|---|---|")
        for path in loader["paths"]:
            add(f"| {path['path']} | {path['per_core_per_s']:.0f} | {path['workers_per_s']:.0f} | "
                f"{path['x_baseline_workers']:.1f} |")
        add("")
    add("A real stage (`rcic-stage`, timed from outside; checkpoints seen: new checkpoint "
        "folders seen while it ran; start-up: launch to the last line before training, from "
        "stage.log; first step: the first optimizer step's latency, from stage.json's costs):")
    add("")
    add("| run | status | budget s | wall s | used | steps | samples/s | saving s "
        "| checkpoints seen | start-up s | first step s | resumed | stopped by | worker ran |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in result["stage"]:
        add(f"| {run['run']} | {run['status']} | {run['budget_seconds']} | "
            f"{run['wall_seconds']:.1f} | {fmt(run.get('used'), '.3f')} | "
            f"{fmt(run.get('steps_this_stage'))} | {fmt(run.get('samples_per_second'))} | "
            f"{fmt(run.get('save_seconds'))} | {run['checkpoints_seen']} | "
            f"{fmt(run.get('startup_seconds'))} | {fmt(run.get('first_step_seconds'))} | "
            f"{'yes' if run.get('resumed_from') else 'no'} | {fmt(run.get('stopped_by'))} | "
            f"{describe_runtime(run.get('runtime'))} |")
    add("")
    est = result["estimate"]
    add(f"**Estimate** (not a measurement): the `{est['recipe']}` recipe's {est['epochs']} epochs "
        f"of {est['sites_per_epoch']:,} sites (RxRx1's train sites with train and test controls),"
        f" at the rcic step's measured images/s for {est['model']} at {est['size']} px. Kaggle's "
        f"T4 x2 is scaled by peak fp16 tensor FLOP rates alone: images/s on one GPU here x "
        f"({KAGGLE_GPUS} x {KAGGLE_T4_TFLOPS:g}) / {fmt(est['peak_tflops_here'])} TFLOPS (peak "
        f"from {est['peak_source']}); the T4's memory bandwidth and the two-GPU overhead make "
        f"the real figure slower.")
    add("")
    if "missing" in est:
        add(f"Not computed: {est['missing']}.")
    else:
        add("| | this machine | Kaggle T4 x2 (estimate) |")
        add("|---|---|---|")
        add(f"| peak fp16 tensor TFLOPS | {fmt(est['peak_tflops_here'])} (one GPU) | "
            f"{KAGGLE_GPUS} x {KAGGLE_T4_TFLOPS:g} |")
        add(f"| images/s | {est['images_per_s_here']:.1f} (measured) | "
            f"{fmt(est.get('images_per_s_kaggle'), '.1f')} (x {fmt(est.get('scale'), '.4f')}) |")
        add(f"| hours for the recipe | {est['hours_here']:.1f} | "
            f"{fmt(est.get('hours_kaggle'), '.1f')} |")
        stages_here = math.ceil(est["hours_here"] / KAGGLE_STAGE_HOURS)
        add(f"| {KAGGLE_STAGE_HOURS:g}-hour stages | {stages_here} | "
            f"{fmt(est.get('stages_kaggle'))} |")
        add(f"| weeks of the {KAGGLE_WEEKLY_HOURS:g}-hour GPU quota | - | "
            f"{fmt(est.get('weeks_of_quota_kaggle'), '.1f')} |")
    add("")
    return "\n".join(lines)


def parse_caps(items):
    caps = {}
    for item in items:
        name, _, seconds = item.rpartition("=")
        try:
            caps[name] = float(seconds)
        except ValueError:
            sys.exit(f"gpu_check: --cap {item!r}: expected NAME=SECONDS, e.g. --cap tests=200")
    return caps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="output folder")
    p.add_argument("--dry", action="store_true",
                   help="the same code at tiny sizes on the CPU, in under a minute")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="parts to run")
    p.add_argument("--cap", nargs="*", default=[], metavar="NAME=SECONDS",
                   help="change a part's time cap: env, tests, data, loader, stage, resume, "
                        "'step 256', 'step 512'")
    p.add_argument("--stage-budget", type=int, default=45,
                   help="seconds of the real stage (its resume gets 20 more); above 45 the "
                        "whole run may pass 8 minutes")
    p.add_argument("--peak-tflops", type=float,
                   help="this GPU's peak dense fp16 tensor TFLOPS, when its name is not in the "
                        "table")
    args = p.parse_args()
    # The parts run from the repository root; the output goes where the user asked, from here.
    args.out = args.out.resolve()
    cores = os.cpu_count() or 1
    plan = dry_plan(cores) if args.dry else gpu_plan(cores, args.stage_budget)
    check = Check(args.out, plan, args.dry, parse_caps(args.cap))
    started = time.monotonic()
    command = "python tools/gpu_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    most = plan_seconds(plan)
    print(f"gpu_check: {'dry run, ' if args.dry else ''}at most {most:.0f} s"
          f"{'' if args.dry or most <= TOTAL_CAP else f' (over the {TOTAL_CAP} s goal)'}; "
          f"logs in {check.logs}", flush=True)

    env = check.probe_env() if "env" in args.parts else {"device": "not probed"}
    tests = check.cuda_tests() if "tests" in args.parts else []
    if "memory" in args.parts:
        check.memory_plan()
    # The step and stage parts read the data part's folder and caches.
    have_data = check.prepare_data() if {"data", "step", "stage"} & set(args.parts) else False
    training = check.training_steps() if "step" in args.parts and have_data else []
    loader = check.input_pipeline() if "loader" in args.parts else None
    stage = check.real_stage() if "stage" in args.parts and have_data else []

    result = {"dry": args.dry, "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": round(time.monotonic() - started, 1), "cap_seconds": plan_seconds(plan),
              "env": env, "plan": asdict(plan), "parts": check.parts, "tests": tests,
              "training": training, "loader": loader, "stage": stage,
              "estimate": estimate(training, plan, env, args.peak_tflops)}
    result["plan"]["caps"] = {k: v for k, v in plan.caps.items()}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    bad = [name for name, part in check.parts.items() if part["status"] != "ok"]
    failed = [t["test"] for t in tests if t["outcome"] in ("failed", "error")]
    if bad or failed:
        print(f"gpu_check: not ok: {', '.join(bad + failed)} (see {check.logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
