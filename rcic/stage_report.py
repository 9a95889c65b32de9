"""stage.json, the one report of a stage, and the units of work it accounts for.

Three parties write it, all through this module, always atomically (a reader, or the next
kernel of a chain, finds the old report or the new one, never half of one):

- the stage's worker (rcic/stage.py) when it ends by itself: `write`;
- its supervisor (rcic/deadline.py): when the worker has exited, `amend` adds what only the
  outside sees (`exit_seconds`, the measured teardown); at a kill, `deadline_report` is written
  in the worker's place from the worker's last status;
- a Kaggle stage kernel (rcic/kaggle/kernel.py): `amend` adds how long expanding its cache took.

Torch-free: the supervisor must not pay for importing torch to write it at the deadline.

`UNITS` is the one table of the units of work a stage does: the phase the worker tells its
supervisor, the words a person reads when a budget could not hold it, and the `costs` keys its
seconds and count go to. `too_short` is the one way a stage says its budget cannot hold what it
must do. A new kind of work is one row of `UNITS`.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from rcic.atomic import write_atomic
from rcic.budget import KILL_RESERVE, format_duration, minimum_budget, round_up_duration

REPORT_NAME = "stage.json"


@dataclass(frozen=True)
class Unit:
    phase: str            # what the worker tells its supervisor before it starts this work
    words: str            # "<words> was still running at the deadline"
    seconds_key: str      # costs[...]: seconds spent on it in this stage
    count_key: str = ""   # costs[...]: how many were completed ("" when not counted)


UNITS = (
    Unit("startup", "start-up", "startup_seconds"),
    Unit("step", "its first optimizer step", "first_step_seconds"),
    Unit("eval", "a validation", "eval_seconds", "evals"),
    Unit("pseudo", "a pseudo-label pass", "pseudo_seconds", "pseudo_passes"),
    Unit("save", "its first save", "save_seconds", "saves"),
    Unit("teardown", "its teardown", "teardown_seconds"),
)
UNIT = {unit.phase: unit for unit in UNITS}
# What a worker tells: a unit's phase, or "exit" once its reports are written.
PHASES = (*UNIT, "exit")

# Every field of stage.json, and what it means. `write` refuses any other: one owner.
FIELDS = {
    "done": "the recipe is finished",
    "recipe": "the recipe's name",
    "recipe_hash": "the hash of its training fields",
    "global_step": "optimizer steps taken by the run (after a kill: at its newest commit)",
    "total_steps": "optimizer steps the recipe takes",
    "epoch": "the epoch the run is in",
    "steps_this_stage": "optimizer steps this stage took",
    "checkpoint_step": "the step of the newest committed checkpoint in the folder",
    "seconds_used": "seconds of the budget used when the report was written",
    "exit_seconds": "when the stage's process ended, as its supervisor saw it",
    "budget_seconds": "the stage's budget",
    "samples_per_second": "training throughput of this stage",
    "stages_left_estimate": "stages of this budget the recipe still needs",
    "resumed_from": "the checkpoint this stage resumed from",
    "last_eval": "the newest validation row",
    "stopped_by": "done, budget, signal, steps or deadline",
    "costs": "where the budget went: seconds and counts per unit of work",
    "interrupted": "after a kill at the deadline: the unit under way",
    "interrupted_after_seconds": "how long that unit had been running",
    "killed_at_seconds": "when the kill came",
    "processes_killed": "how many processes the kill ended",
    "killed_at_exit": "the kill came after the stage's own reports were written",
    "cache": "a Kaggle stage kernel's cache expand: folder, sites, seconds",
    "runtime": "how the stage ran: device, world size, DDP backend, deterministic kernels",
    "processes": "the process counts the run has trained on, in order (stages on 1, 2, 1: [1, 2, 1])",
    "samples_digest": "a digest of the sample ids of every step so far, in order",
}
# What the stage prints as its last line, and a chain's table shows.
SUMMARY_KEYS = ("done", "global_step", "total_steps", "epoch", "seconds_used",
                "samples_per_second", "stages_left_estimate", "stopped_by")


def new_costs(teardown_estimate):
    """Empty `costs` of a stage: every unit's seconds (None until measured once, for start-up
    and the first step) and counts, and the margin kept for the teardown."""
    costs = {}
    for unit in UNITS:
        if unit.count_key:
            costs[unit.seconds_key], costs[unit.count_key] = 0.0, 0
        elif unit.phase != "teardown":       # the teardown is measured by the supervisor
            costs[unit.seconds_key] = None
    costs["teardown_estimate_seconds"] = teardown_estimate
    return costs


def write(out, report):
    """Replace `out`/stage.json by `report`, atomically."""
    unknown = set(report) - set(FIELDS)
    if unknown:
        raise ValueError(f"stage.json has no field(s) {sorted(unknown)}: add them to FIELDS")
    write_atomic(Path(out) / REPORT_NAME, json.dumps(report, indent=1))


def read(out):
    """The stage.json in `out`, or None when there is none that reads."""
    try:
        return json.loads((Path(out) / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None


def amend(out, fields=None, costs=None):
    """Add `fields` (and `costs` entries) to the stage.json in `out`; False when there is none."""
    report = read(out)
    if report is None:
        return False
    report.update(fields or {})
    if costs:
        report.setdefault("costs", {}).update(costs)
    write(out, report)
    return True


def deadline_report(status, phase, phase_seconds, killed_at, budget, n_killed, on_disk=None):
    """stage.json after a kill: the worker's last status, and what the kill interrupted.
    `on_disk`: the newest commit found in the output folder, newer than the reported one when
    the kill came between a commit's rename and its report."""
    report = {k: v for k, v in status.items() if k in FIELDS}
    if on_disk is not None and on_disk > report["checkpoint_step"]:
        report["checkpoint_step"] = on_disk
    report.update({
        "done": False,
        "stopped_by": "deadline",
        "interrupted": phase,
        "interrupted_after_seconds": round(phase_seconds, 3),
        "killed_at_seconds": round(killed_at, 3),
        "processes_killed": n_killed,
        "budget_seconds": budget.seconds,
        "seconds_used": round(budget.elapsed(), 3),
    })
    # What the stage did after its newest commit is lost with it: the next stage starts there.
    report["global_step"] = report["checkpoint_step"]
    return report


def too_short(recipe_name, budget_seconds, why, work_seconds):
    """The one line for a budget that cannot hold a stage's work: `why` it cannot, and the
    shortest budget that holds `work_seconds` (start-up, the unit, a save) with its margins."""
    at_least = round_up_duration(max(minimum_budget(work_seconds), budget_seconds + 1))
    return (f"budget {format_duration(budget_seconds)} is too short for recipe {recipe_name} "
            f"here: {why}; give it at least {at_least}")


def killed_before_a_commit(recipe_name, budget_seconds, phase, phase_seconds):
    """`too_short` for a stage killed at the deadline with nothing committed: its work did not
    end in all the time the budget gave it, so it needs at least twice that."""
    why = (f"{UNIT[phase].words if phase in UNIT else phase} was still running at the deadline "
           f"({phase_seconds:.0f} s in) and nothing was committed")
    return too_short(recipe_name, budget_seconds, why, 2 * (budget_seconds - KILL_RESERVE))
