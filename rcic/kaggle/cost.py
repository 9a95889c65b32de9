"""`rcic-chain status`: where each kernel stands, and what the chain has cost and will cost
against Kaggle's weekly GPU quota.

Run times are the driver's own observations (from the first RUNNING it saw to the end it saw),
or, for a stage that ended while no driver watched, the `seconds_used` its stage.json measured.
What is left comes from the newest completed stage's stage.json: `stages_left_estimate` stages
(from its measured step time), each costing about what a full stage cost so far.
"""
import json
import time

from rcic.budget import parse_duration
from rcic.errors import UserError
from rcic.kaggle import chain, client, metadata
from rcic.kaggle.plan import hours
from rcic.kaggle.record import Record
from rcic.versions import describe, differences as versions_differences

WEEKLY_GPU_HOURS = 30.0      # Kaggle's GPU quota a week, when the API does not say
STAGE_JSON = "stage.json"
MANIFEST = "MANIFEST.json"      # rcic.checkpoint's manifest: it records the versions
REPORT_FILES = r"^(stage\.json|ckpt-\d+/MANIFEST\.json)$"


def observed_seconds(attempt, now, running):
    """Seconds a run held a GPU as the driver saw it (so far, if `running`), or None when no
    driver saw it start, or end."""
    start, end = attempt.get("running_at"), attempt.get("finished_at")
    if start is None:
        return None
    if end is not None:
        return end - start
    return now - start if running else None


def stage_report(api, folder, kernel, completed_version):
    """(stage.json, the versions its checkpoint was written under) of a stage's completed run,
    downloaded once from that version into DIR/<stage>/output/version-N; None for either that
    it did not leave."""
    if completed_version is None:
        return None, None
    kept = folder / "output" / f"version-{completed_version}"
    if not (kept / STAGE_JSON).exists():
        try:
            client.download_version(api, kernel, completed_version, folder / "output",
                                    REPORT_FILES)
        except UserError:
            return None, None
    manifests = sorted(kept.glob(f"ckpt-*/{MANIFEST}"))
    manifest = read_json(manifests[-1]) if manifests else None
    return read_json(kept / STAGE_JSON), (manifest or {}).get("versions")


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def version_lines(ran_under):
    """One line per stage with the versions it trained under, flagging a change from the stage
    before it: Kaggle's image can move between two stages of a chain."""
    lines, previous = [], None
    for name, versions in ran_under:
        line = f"{name:10s} ran under " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        changed = versions_differences(previous[1], versions) if previous else []
        if changed:
            line += (f"  CHANGED since {previous[0]}: {describe(changed)} (Kaggle's image moved; "
                     f"the resume is exact only under the same versions)")
        lines.append(line)
        previous = (name, versions)
    return lines


def chain_status(chain_dir, api, echo=print):
    folders = chain.kernel_folders(chain_dir)
    budget = parse_duration(metadata.read_json(chain_dir / chain.CHAIN_FILE)["budget"])
    record, now = Record(chain_dir), time.time()
    used, untimed, stages_left, full_stages, newest = 0.0, 0, [], [], None
    ran_under = []            # (stage, the versions its checkpoint was written under)
    for folder in folders:
        kernel, current = chain.kernel_id(folder), record.current(folder.name)
        version = current["version"] if current else None
        try:
            state, message = client.status(api, kernel, version)
        except UserError as err:
            state, message = "unknown", str(err)
        if current is None:
            message = "; ".join(filter(None, ["not pushed from this folder", message]))
        finished = state if state in client.FINISHED else None
        report = None
        if chain.is_stage(folder):
            report, versions = stage_report(api, folder, kernel,
                                            version if finished == client.COMPLETE else None)
            if versions:
                ran_under.append((folder.name, versions))
        seconds = observed_seconds(current, now, not finished) if current else None
        if seconds is None and report is not None and finished:
            seconds = report.get("seconds_used")      # it ended while no driver watched
        shown = "-" if seconds is None else hours(seconds) + ("" if finished else " so far")
        echo(f"{folder.name:10s} {kernel}  version {version or '-'}  {state}  run time {shown}"
             + (f"  ({message})" if message else ""))
        # Every run the chain made cost GPU time, the failed and the restarted ones too; a
        # cache kernel runs on a CPU and costs none.
        gpu = metadata.read_json(folder / metadata.KERNEL_METADATA).get("enable_gpu", True)
        for past in record.attempts(folder.name) if gpu else ():
            timed = seconds if past is current else observed_seconds(past, now, False)
            if timed is not None:
                used += timed
            elif past["version"] is not None:
                untimed += 1
        if chain.is_stage(folder) and not (current and finished == client.COMPLETE):
            stages_left.append(folder.name)
        if report is not None:
            newest = report
            if report.get("seconds_used") and report.get("steps_this_stage"):
                full_stages.append(report["seconds_used"])
    echo(f"GPU time used by this chain: {hours(used)}"
         + (f", and {untimed} run(s) no driver timed" if untimed else ""))
    quota = client.gpu_quota(api)
    if quota is not None:
        quota_used, quota_total = quota
        echo(f"Kaggle's weekly GPU quota: {quota_used:.1f} of {quota_total:.1f} h used "
             f"(this account, every notebook)")
        free = quota_total - quota_used
    else:
        free = WEEKLY_GPU_HOURS - used / 3600
    echo(remaining_line(stages_left, newest, full_stages, budget, free))
    for line in version_lines(ran_under):
        echo(line)


def remaining_line(stages_left, newest, full_stage, budget, free_hours):
    """What the stages not yet complete should cost, against the quota left this week."""
    if not stages_left:
        return "remaining: no stage left to run (the submission kernel only)"
    if newest is None or newest.get("stages_left_estimate") is None:
        need = len(stages_left) * budget
        basis = (f"at most {len(stages_left)} stage(s) x the {hours(budget)} budget (no "
                 f"measured stage yet)")
    else:
        needed = newest["stages_left_estimate"]
        per_stage = sum(full_stage) / len(full_stage) if full_stage else budget
        need = min(needed, len(stages_left)) * per_stage
        basis = (f"{needed} more stage(s) at {newest.get('samples_per_second')} samples/s, "
                 f"{hours(per_stage)} each as measured")
        if needed > len(stages_left):
            basis += (f"; the chain has only {len(stages_left)} stage(s) left: render a longer "
                      f"one with rcic-chain init")
    fits = "fits in" if need / 3600 <= free_hours else "does not fit in"
    return (f"remaining: about {hours(need)} of GPU ({basis}), plus the submission kernel; "
            f"{fits} the {max(0.0, free_hours):.1f} h of weekly GPU quota left")
