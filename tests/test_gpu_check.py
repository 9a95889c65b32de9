"""tools/gpu_check.py --dry: the GPU check's whole code path, at tiny sizes, on the CPU."""
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gpu_check(out, *args, timeout=600, cwd=ROOT):
    """(result, wall seconds, CPU seconds of the whole process tree)."""
    started, cpu = time.monotonic(), cpu_seconds_of_children()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry",
                             "--out", str(out), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started, cpu_seconds_of_children() - cpu


def test_dry_run_fills_the_json_and_the_table_in_under_a_minute(tmp_path):
    # Run as a user may: from another folder, with a relative --out.
    out = tmp_path / "check"
    result, elapsed, cpu = gpu_check("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # Under a minute of work: the CPU time of every process it started (on an idle 2-core
    # machine that is also about its wall time; other jobs on the CPU stretch the wall time).
    assert cpu < 60, f"the dry run took {cpu:.0f} s of CPU ({elapsed:.0f} s wall)"
    check = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()

    assert check["dry"] is True and check["env"]["device"] == "cpu (dry run)"
    assert check["env"]["torch"] and check["env"]["cpu_cores"] >= 1
    assert list(check["parts"]) == ["env", "tests", "memory", "data", "step tiny 32", "loader",
                                    "stage", "resume"]
    for name, part in check["parts"].items():
        assert part["status"] == "ok" and part["seconds"] <= part["cap_seconds"] + 1, name
        assert (out / part["log"]).stat().st_size > 0
    # Every cuda test ran through pytest and skipped cleanly.
    assert len(check["tests"]) >= 10
    assert {t["outcome"] for t in check["tests"]} == {"skipped"}

    [row] = check["training"]
    assert (row["backbone"], row["size"], row["status"]) == ("tiny", 32, "ok")
    for variant in ("baseline", "rcic"):
        figures = row["variants"][variant]
        assert figures["images_per_s"] > 0 and 0 <= figures["waits"] < 1
        # The bounded search doubled the batch 8 once and stopped at its bound, 16.
        assert (figures["largest_batch"], figures["largest_batch_at_bound"]) == (16, True)

    loader = check["loader"]
    assert [p["path"] for p in loader["paths"]] == ["seeds", "cache-raw"]
    assert loader["workers"] >= 1 and all(p["workers_per_s"] > 0 for p in loader["paths"])

    stage, resume = check["stage"]
    assert stage["resumed_from"] is None and stage["checkpoints_seen"] >= 1
    # The deterministic settings asked for in the recipe reached the worker, on the CPU.
    for run in (stage, resume):
        assert run["runtime"]["deterministic"] is True, run
        assert run["runtime"]["device"] == "cpu" and run["runtime"]["world_size"] == 1
        assert run["stopped_by"] == "steps", run     # its own --steps, not the budget or a kill
    assert resume["resumed_from"] and resume["steps_this_stage"] <= 2   # --steps 2
    # A resume that trained commits one new checkpoint; one that did not carries the old one.
    assert resume["checkpoints_seen"] == (1 if resume["steps_this_stage"] else 0)
    assert resume["global_step"] == stage["global_step"] + resume["steps_this_stage"]

    est = check["estimate"]
    rate = row["variants"]["rcic"]["images_per_s"]
    hours = est["epochs"] * est["sites_per_epoch"] / rate / 3600
    assert est["images_per_s_here"] == rate and math.isclose(est["hours_here"], hours, abs_tol=0.01)
    assert est["scale"] == 130.0          # 2 x 65 T4 TFLOPS over the dry run's nominal 1
    assert math.isclose(est["hours_kaggle"], hours / 130, abs_tol=0.01)
    # Stages of the budget rcic-chain init gives a 12-hour T4 x2 session.
    assert 11 <= est["stage_hours"] < 12
    assert est["stages_kaggle"] == math.ceil(est["hours_kaggle"] / est["stage_hours"])

    lines = table.splitlines()
    assert lines[0] == "### GPU check: cpu (dry run) (a CPU dry run, not a measurement)"
    for heading in ("| device | driver | CUDA", "| part | status |", "| test | outcome |",
                    "| backbone | px | batch |", "| path | per core /s |", "| run | status |",
                    "| | this machine | Kaggle T4 x2 (estimate) |"):
        assert any(line.startswith(heading) for line in lines), heading
    assert sum(line.startswith("| tiny | 32 | 8 |") for line in lines) == 1
    assert sum(line.startswith("| test_") for line in lines) == len(check["tests"])
    assert "**Estimate** (not a measurement)" in table
    assert sum("| steps | cpu, deterministic |" in line for line in lines) == 2

    # Again in the same place: the parts that write files start from an empty work folder.
    again, _, _ = gpu_check("check", "--parts", "env", "data", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert not list(tmp_path.glob("check/work/stage"))      # the older check's work is gone
    assert set(p.name for p in tmp_path.iterdir()) == {"check"}  # nothing outside --out


def test_a_part_past_its_cap_is_killed_and_recorded(tmp_path):
    out = tmp_path / "capped"
    result, elapsed, _ = gpu_check(out, "--parts", "loader", "--cap", "loader=1")
    assert result.returncode == 1
    assert "not ok: loader" in result.stderr
    assert elapsed < 30
    check = json.loads((out / "gpu_check.json").read_text())
    assert check["parts"]["loader"]["status"] == "timed out" and check["loader"] is None
    assert "killed after its 1 s cap" in (out / check["parts"]["loader"]["log"]).read_text()
    assert "| loader | timed out |" in (out / "gpu_check.md").read_text()
