"""What a chain left on disk, read into one shape the report draws from.

Three places hold a chain's outputs:

    a local dry run (rcic-chain local --out OUT)   OUT/kernels/chain.json, OUT/runs/<kernel>/working
    a pushed chain (rcic-chain init --out DIR)     DIR/chain.json, DIR/<kernel>/output (rcic-chain
                                                   output), DIR/<kernel>/output/version-N (status,
                                                   submit), DIR/pushes.json (run times, scores)
    a kernel of a chain, on Kaggle                 its working folder and the previous stage's
                                                   output; the earlier stages' reports travel
                                                   from stage to stage in `HISTORY` (a kernel
                                                   sees only the output of the one before it)

Torch-free and matplotlib-free: a stage kernel carries the history without paying for either.
"""
import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rcic import stage_report
from rcic.errors import UserError
from rcic.kaggle import chain as chain_files, metadata
from rcic.kaggle.cost import WEEKLY_GPU_HOURS, observed_seconds, read_json

# Where a stage kernel keeps the stage.json of every stage before it, as stage-NN.json: not
# named stage.json, so no kernel searching its input for stage.json takes them for a stage.
HISTORY = "chain-history"
METRICS = "metrics.csv"


@dataclass
class Stage:
    name: str                 # stage-01, ...
    report: dict = None       # its stage.json; None when no output of it is here
    seconds: float = None     # the kernel's run time: as the driver saw it, else its stage.json's

    def get(self, key, default=None):
        return (self.report or {}).get(key, default)

    def cost(self, key):
        return ((self.report or {}).get("costs") or {}).get(key) or 0.0


@dataclass
class Chain:
    label: str
    where: str                            # the folder, as given
    stages: list                          # Stage, in the order they ran
    metrics: list = field(default_factory=list)   # the run's validation and training rows
    planned_stages: int = None            # stage kernels rendered
    submission: dict = None               # predict_report.json of the submission kernel
    scores: dict = None                   # {"public_score", "private_score"} after `submit`
    other_gpu_seconds: float = 0.0        # GPU time outside the stages' own runs (submission,
                                          # failed and repeated runs)

    @property
    def newest(self):
        """The newest stage that left a report, or None."""
        return next((s for s in reversed(self.stages) if s.report is not None), None)

    def gpu_seconds(self):
        return sum(s.seconds or 0.0 for s in self.stages) + self.other_gpu_seconds

    def stages_needed(self):
        """Stages the recipe still needs (0 when it is finished; None when not measured)."""
        newest = self.newest
        if newest is None:
            return None
        return 0 if newest.get("done") else newest.get("stages_left_estimate")

    def seconds_per_stage(self):
        """What a stage that trained took, on average (None before one did)."""
        trained = [s.seconds for s in self.stages if s.seconds and s.get("steps_this_stage")]
        return sum(trained) / len(trained) if trained else None

    def quota_hours(self):
        """(used, still needed, left after both) of a week's GPU quota, in hours."""
        used = self.gpu_seconds() / 3600
        needed = (self.stages_needed() or 0) * (self.seconds_per_stage() or 0.0) / 3600
        return used, needed, WEEKLY_GPU_HOURS - used - needed


def read_metrics(path):
    """metrics.csv as rows of numbers (empty cells left out), [] when there is none."""
    try:
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(f)]
    except (OSError, ValueError, csv.Error):
        return []


def stage_seconds(report):
    """A stage kernel's run time from its own report: until its process ended."""
    if report is None:
        return None
    return report.get("exit_seconds") or report.get("seconds_used")


def newest_metrics(folders):
    """The rows of the newest metrics.csv among `folders` (oldest first): a checkpoint carries
    the run's history, so the newest stage's file holds every stage's rows."""
    for folder in reversed(folders):
        rows = read_metrics(Path(folder) / METRICS) if folder is not None else []
        if rows:
            return rows
    return []


def read_chain(folder):
    """The chain whose outputs are under `folder`: a local dry run's --out, or a pushed chain's
    folder (rcic-chain init --out); a UserError for anything else."""
    folder = Path(folder)
    if (folder / "kernels" / chain_files.CHAIN_FILE).is_file() and (folder / "runs").is_dir():
        return read_local(folder)
    if (folder / chain_files.CHAIN_FILE).is_file():
        return read_pushed(folder)
    raise UserError(f"{folder} is not a chain folder (no {chain_files.CHAIN_FILE} in it or in "
                    f"its kernels/): give the --out folder of rcic-chain local, or the folder "
                    f"of rcic-chain init after rcic-chain output")


def chain_plan(chain_dir):
    """(kernel names in order, stage kernels planned) of a rendered chain."""
    try:
        plan = json.loads((chain_dir / chain_files.CHAIN_FILE).read_text())
        return list(plan["kernels"]), int(plan["stages"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {chain_dir / chain_files.CHAIN_FILE} ({err}): it is "
                        f"written by rcic-chain init / local; render the chain again") from None


def read_local(out):
    """A local dry run: every kernel's working folder under OUT/runs."""
    from rcic.predict import REPORT_NAME

    names, planned = chain_plan(out / "kernels")
    workings = {name: out / "runs" / name / "working" for name in names}
    stage_names = [n for n in names if chain_files.is_stage(n)]
    stages = []
    for name in stage_names:
        report = stage_report.read(workings[name])
        stages.append(Stage(name, report, stage_seconds(report)))
    return Chain(label=out.name, where=str(out), stages=stages, planned_stages=planned,
                 metrics=newest_metrics([workings[n] for n in stage_names]),
                 submission=read_json(workings[names[-1]] / REPORT_NAME))


def pushed_output(folder, attempt):
    """Where a pushed kernel's files are: the folder `rcic-chain status`/`submit` read its
    recorded version into first, then the one `rcic-chain output` downloads into."""
    places = [folder / "output"]
    if attempt and attempt.get("version") is not None:
        places.insert(0, folder / "output" / f"version-{attempt['version']}")
    return places


def first_file(places, name):
    return next((p / name for p in places if (p / name).is_file()), None)


def read_pushed(chain_dir):
    """A pushed chain: outputs downloaded under DIR/<kernel>/output, run times and scores from
    DIR/pushes.json (rcic.kaggle.record)."""
    from rcic.predict import REPORT_NAME
    from rcic.kaggle.record import Record

    names, planned = chain_plan(chain_dir)
    record = Record(chain_dir)
    stages, metric_folders, other = [], [], 0.0
    for name in names:
        folder, current = chain_dir / name, record.current(name)
        places = pushed_output(folder, current)
        meta = read_json(folder / metadata.KERNEL_METADATA) or {}
        gpu = meta.get("enable_gpu", True)
        # Runs before the current one cost GPU time too (failed, cancelled, --from).
        for past in record.attempts(name) if gpu else ():
            if past is not current:
                other += observed_seconds(past, 0, False) or 0.0
        seen = observed_seconds(current, 0, False) if current else None
        if chain_files.is_stage(name):
            found = first_file(places, stage_report.REPORT_NAME)
            report = read_json(found) if found else None
            stages.append(Stage(name, report, seen or stage_seconds(report)))
            metrics = first_file(places, METRICS)
            metric_folders.append(metrics.parent if metrics else None)
        elif gpu:
            other += seen or 0.0
    submit = chain_dir / names[-1]
    prediction = first_file(pushed_output(submit, record.current(names[-1])), REPORT_NAME)
    sent = record.data.get("submission")
    return Chain(label=chain_dir.name, where=str(chain_dir), stages=stages,
                 planned_stages=planned, metrics=newest_metrics(metric_folders),
                 submission=read_json(prediction) if prediction else None,
                 scores=sent if sent and sent.get("public_score") is not None else None,
                 other_gpu_seconds=other)


# -- inside a chain's kernels ------------------------------------------------------------------
def carry_history(previous, working, stage_number):
    """Keep in this stage's output the reports of every stage before it: the previous stage's
    stage.json, and the history it carried. `previous`: the attached output folders that hold
    a stage.json (the previous stage's)."""
    history = Path(working) / HISTORY
    for folder in map(Path, previous[:1]):
        history.mkdir(exist_ok=True)
        for carried in sorted((folder / HISTORY).glob("stage-*.json")):
            shutil.copyfile(carried, history / carried.name)
        shutil.copyfile(folder / stage_report.REPORT_NAME,
                        history / f"stage-{stage_number - 1:02d}.json")


def kernel_chain(stage_folder, planned_stages=None, submission=None):
    """The chain as a kernel sees it: `stage_folder` holds the newest stage's output (its
    stage.json, metrics.csv and the history it carried, one report for each stage before)."""
    stage_folder = Path(stage_folder)
    stages = []
    for path in sorted((stage_folder / HISTORY).glob("stage-*.json")):
        report = read_json(path)
        stages.append(Stage(path.stem, report, stage_seconds(report)))
    report = stage_report.read(stage_folder)
    stages.append(Stage(f"stage-{len(stages) + 1:02d}", report, stage_seconds(report)))
    return Chain(label="this chain", where=str(stage_folder), stages=stages,
                 planned_stages=planned_stages, metrics=read_metrics(stage_folder / METRICS),
                 submission=submission)


# -- what the figures show -------------------------------------------------------------------
# Where a stage's budget went, in the order a stage spends it (stage.json's `costs`, see
# rcic/stage_report.py's UNITS). The clock counts from the kernel's start, so start-up holds
# installing the bundle, expanding the cache (shown apart) and opening the data.
PARTS = ("start-up", "cache expand", "training", "evaluation", "pseudo-labels", "saves",
         "teardown", "unused")


def cost_parts(stage):
    """{part: seconds} of a stage's budget (PARTS), summing to its budget; None without a
    report. Training is what is left of the seconds used after the measured units (the
    first step included); unused is the budget past the process's end, its margin included."""
    if stage.report is None:
        return None
    cache = ((stage.get("cache") or {}).get("seconds")) or 0.0
    startup = stage.cost("startup_seconds")
    measured = startup + sum(stage.cost(k) for k in ("eval_seconds", "pseudo_seconds",
                                                      "save_seconds"))
    used = stage.get("seconds_used") or 0.0
    ended = stage.get("exit_seconds") or used
    parts = {"start-up": max(0.0, startup - cache), "cache expand": cache,
             "training": max(0.0, used - measured),
             "evaluation": stage.cost("eval_seconds"), "pseudo-labels": stage.cost("pseudo_seconds"),
             "saves": stage.cost("save_seconds"), "teardown": max(0.0, ended - used)}
    parts["unused"] = max(0.0, (stage.get("budget_seconds") or 0.0) - sum(parts.values()))
    return parts


def stage_spans(chain):
    """(stage, first step, last step, kernel seconds when it began) for each stage with a
    report: the steps it took, on the chain's clock (the stages' run times added up)."""
    spans, step, clock = [], 0, 0.0
    for stage in chain.stages:
        if stage.report is not None:
            end = stage.get("global_step", step)
            spans.append((stage, step, end, clock))
            step = end
        clock += stage.seconds or 0.0
    return spans


def kernel_seconds_at(chain, step):
    """When the run reached `step`, in seconds of kernel time since the chain began. Stage
    reports hold where each stage began and ended; in between, steps are taken as evenly
    spread over the stage's training (from its start-up's end to its report)."""
    spans = stage_spans(chain)
    for stage, first, last, began in spans:
        if step <= last or (stage, first, last, began) == spans[-1]:
            startup, used = stage.cost("startup_seconds"), stage.get("seconds_used") or 0.0
            share = min(1.0, (step - first) / (last - first)) if last > first else 1.0
            return began + startup + max(0.0, share) * max(0.0, used - startup)
    return 0.0
