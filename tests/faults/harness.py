"""Fault-injection harness: run rcic's console scripts as real processes and kill them at chosen
moments (tests/test_faults.py drives it).

A kill is a SIGKILL, as Kaggle ends a session at its limit: of the whole process group (the
command and its loader or cache workers) or, harder on the code, of the main process only, so
that orphaned workers may still be writing while the rerun starts. A kill is aimed either at a
random moment or at the moment a file-system trace of an operation appears:

  random     uniformly in [0, seconds) after the start (start-up, training, saving, reports)
  ckpt-write a checkpoint being written (a ``.tmp-ckpt-*`` folder exists), after a short random
             delay so that kills land at different points of the write / manifest / rename
  ckpt-prune an older checkpoint being removed (``.tmp-ckpt-removing-*`` or ``*.old-*``)
  weights    the inference weights being written (``.weights.pt.partial-*``)
  chunk      a cache chunk being written (``chunks/*.partial-*``)

A trace watched for may never appear (the process ended first): the trial then reports
``missed`` and the process has run to its end, which the caller treats as an undisturbed run.
"""
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

POLL = 0.002        # seconds between looks at the folder: saves of the tiny model take ~20-100 ms

TRACES = {
    "ckpt-write": lambda name: name.startswith(".tmp-ckpt-") and "removing" not in name,
    "ckpt-prune": lambda name: name.startswith(".tmp-ckpt-removing-") or ".old-" in name,
    "weights": lambda name: name.startswith(".weights.pt.partial-"),
    "chunk": lambda name: ".partial-" in name,
}


def _seen(folder, wanted):
    try:
        return any(wanted(entry.name) for entry in os.scandir(folder))
    except OSError:     # not created yet
        return False


def run_and_kill(cmd, mode, rng, watch=None, random_seconds=20.0, group=True, env=None,
                 timeout=600):
    """Start `cmd`; kill it as `mode` says. Returns a dict: mode, outcome ('killed', 'missed'),
    seconds (when the kill landed, or the run's length), returncode, group, pgid.

    After a kill of the main process only, its workers may live on in process group `pgid`
    (see `orphans`): the caller reruns the command first, then reaps them."""
    delay = rng.uniform(0.0, random_seconds) if mode == "random" else None
    wanted = TRACES.get(mode)
    start = time.monotonic()
    # stderr goes to a file: a pipe would stay open as long as any orphaned worker lives.
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.monotonic() - start
                if now > timeout:
                    raise AssertionError(f"{cmd[0]} still running after {timeout}s: {cmd}")
                if (delay is not None and now >= delay) or (wanted and _seen(watch, wanted)):
                    if wanted:
                        time.sleep(rng.uniform(0.0, 0.03))  # land somewhere inside the operation
                    _kill(proc, group)
                    proc.wait()
                    return {"mode": mode, "outcome": "killed", "seconds": round(now, 3),
                            "returncode": proc.returncode, "group": group, "pgid": proc.pid}
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                _kill(proc, True)
            proc.wait()
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    # It ended before the kill: an undisturbed run, which must have succeeded.
    assert proc.returncode == 0, f"{cmd[0]} failed on its own: {text[-2000:]}"
    return {"mode": mode, "outcome": "missed", "seconds": round(time.monotonic() - start, 3),
            "returncode": 0, "group": group, "pgid": proc.pid}


def orphans(pgid):
    """Process ids still alive in process group `pgid` (Linux /proc)."""
    alive = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":   # fields[2]: pgrp
                alive.append(int(entry.name))
    return alive


def reap(pgid):
    """SIGKILL what is left of a process group; returns how many processes were left."""
    left = orphans(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def _kill(proc, group):
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_ok(cmd, env=None, timeout=600):
    """Run a command to its end; it must exit 0. Returns its stdout."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stderr[-3000:]}"
    return result.stdout


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# rcic.progress's plain line where stderr is no terminal: "rcic stage: step 3/8 (38%), ..."
PROGRESS_LINE = re.compile(r"^[^:]+: \w+ \d+(/\d+ \(\d+%\))?(, |$)")


def error_lines(stderr):
    """The lines of stderr a person reads as messages. Progress is not: neither tqdm's
    carriage-return redraws nor rcic.progress's plain lines; text printed right after a bar,
    on the bar's own line, is (see `on_its_own_line`)."""
    lines = []
    for line in stderr.splitlines():
        text = line.rsplit("\r", 1)[-1].strip()
        if "%|" in text:                       # a progress bar: "  40%|####  | 4/10 [00:01<...]"
            text = text.split("]", 1)[1].strip() if "]" in text else ""
        if text and not PROGRESS_LINE.match(text):
            lines.append(text)
    return lines


def on_its_own_line(stderr, text):
    """Whether `text` starts a line of its own (not glued to the end of a progress bar)."""
    return any(line.startswith(text) for line in stderr.split("\n"))
