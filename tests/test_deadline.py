"""rcic.deadline: the supervising parent ends a stuck stage at its deadline, with every process
below it, and says what it interrupted. Real processes and signals (tests/programs/stand_in_stage.py)."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcic.budget import parse_duration
from rcic.budget import KILL_RESERVE, format_duration, round_up_duration
from rcic.deadline import kill_tree

PROGRAM = str(Path(__file__).parent / "programs" / "stand_in_stage.py")


def supervise(out, behaviour, budget=6.0):
    """Run the supervised stand-in; returns (CompletedProcess, seconds from launch to exit)."""
    launched = time.monotonic()
    result = subprocess.run([sys.executable, PROGRAM, "supervise", f"{budget:g}s", str(out), behaviour],
                            capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - launched


def alive(pid):
    """True while `pid` runs (a zombie, killed but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds=3.0):
    end = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_stuck_stage_is_killed_at_the_deadline_with_all_its_processes(tmp_path):
    budget = 6.0
    result, seconds = supervise(tmp_path, "hang", budget)
    assert result.returncode == 0, result.stderr
    # Ends inside its budget, and not much before the kill point (budget less the reserve).
    assert budget - KILL_RESERVE - 0.1 <= seconds < budget, seconds
    report = json.loads((tmp_path / "stage.json").read_text())
    assert report["stopped_by"] == "deadline" and report["interrupted"] == "save"
    assert report["checkpoint_step"] == report["global_step"] == 3
    assert report["processes_killed"] >= 3 and report["done"] is False
    # Timed from the child's own report of the save (0.2 s after its step), up to the kill.
    assert 0 < report["interrupted_after_seconds"] < report["killed_at_seconds"] - 0.2
    assert json.loads(result.stdout)["stopped_by"] == "deadline"
    # The stage, its forked worker, the rank in a session of its own and the orphan: all gone.
    assert wait_gone(json.loads((tmp_path / "pids").read_text())) == []


def test_nothing_committed_at_the_deadline_is_one_line_and_exit_2(tmp_path):
    result, seconds = supervise(tmp_path, "nothing", 5.0)
    assert result.returncode == 2 and seconds < 5.0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    # 2 s of the 5 s budget were the stage's (less KILL_RESERVE), and its step did not end in
    # them: at least twice that, plus the margins: 2 x 2 s + 3 s + 3 s = 10 s.
    match = re.fullmatch(r"supervise: error: budget 5s is too short for recipe stand-in here: its "
                         r"first optimizer step was still running at the deadline \((\d+) s in\) "
                         r"and nothing was committed; give it at least 10s", lines[0])
    assert match and int(match[1]) <= 2, lines[0]
    assert not (tmp_path / "stage.json").exists()      # nothing committed: nothing written
    assert wait_gone(json.loads((tmp_path / "pids").read_text())) == []


def test_a_kill_between_a_commit_and_its_report_names_the_commit_on_disk(tmp_path):
    result, seconds = supervise(tmp_path, "renamed", 5.0)
    assert result.returncode == 0 and seconds < 5.0, result.stderr
    report = json.loads((tmp_path / "stage.json").read_text())
    assert report["stopped_by"] == "deadline" and report["interrupted"] == "save"
    # The child last said step 3; the folder holds the commit of step 4, which resume will use.
    assert report["checkpoint_step"] == report["global_step"] == 4


def test_a_stage_that_ends_by_itself_keeps_its_status_and_report(tmp_path):
    result, seconds = supervise(tmp_path, "finish", 20.0)
    assert result.returncode == 0 and seconds < 10
    report = json.loads((tmp_path / "stage.json").read_text())
    # Its own report, and what only the parent sees: when it exited and how long teardown took.
    assert report["stopped_by"] == "budget"
    assert 0 < report["exit_seconds"] <= seconds
    assert 0.3 <= report["costs"]["teardown_seconds"] < report["exit_seconds"]
    # It killed its rank and worker itself; the orphan it left came to the supervisor (its
    # subreaper), which ended it too.
    assert wait_gone(json.loads((tmp_path / "pids").read_text())) == []


def test_sigterm_reaches_the_stage_once(tmp_path):
    proc = subprocess.Popen([sys.executable, PROGRAM, "supervise", "30s", str(tmp_path), "signal"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 20
    while not (tmp_path / "pids").exists() and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (tmp_path / "got-SIGTERM-1").exists()


def test_kill_tree_takes_orphans_of_a_group_and_new_sessions(tmp_path):
    code = ("import os, subprocess, sys, time\n"
            "s = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
            "                     start_new_session=True)\n"
            "w = os.fork()\n"
            "if w == 0:\n    time.sleep(60); os._exit(0)\n"
            "print(s.pid, w, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            process_group=0)
    pids = [proc.pid, *map(int, proc.stdout.readline().split())]
    assert all(alive(p) for p in pids)
    assert kill_tree(proc.pid) == set(pids)
    proc.wait(timeout=5)
    assert wait_gone(pids) == []


@pytest.mark.parametrize("seconds, text", [(40, "40s"), (72, "1m12s"), (3600, "1h"),
                                           (27000, "7h30m"), (3723.4, "1h2m3s")])
def test_format_duration_is_exact(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == round(seconds)


@pytest.mark.parametrize("seconds, text", [(40.2, "41s"), (59.2, "1m"), (61, "2m"), (240, "4m"),
                                           (3600, "1h"), (4210, "1h20m")])
def test_round_up_duration(seconds, text):
    assert round_up_duration(seconds) == text
