"""The hard deadline: a supervising parent that ends a stage at its budget, whatever it is doing.

The stage loop stops itself before its budget when every unit of work is short against what is
left (rcic.budget). That cannot cover a unit that never returns: a DataLoader worker stuck on a
read, a save blocked in the kernel on a slow disk, a collective waiting on a dead rank, or a
first step of a big model far longer than the whole budget. A thread inside the stage cannot
help there either: it dies with the process when the process is stopped, and it cannot end the
loader workers or DDP ranks without ending itself. So `rcic-stage` runs the stage as a child
process and supervises it from a small parent that never imports torch:

- The child trains under the same clock (the parent's start) with `KILL_RESERVE` more margin,
  and tells the parent over a FIFO what it is doing (`Reporter`: start-up, step, eval, pseudo,
  save, teardown) with its counters and the step of its newest committed checkpoint.
- At the deadline less `KILL_RESERVE` the parent freezes and kills every process below it
  (`kill_tree`: the child, its loader workers, torchrun's ranks, which start sessions of their
  own; the parent is their subreaper, so none escapes by being orphaned), then writes
  ``stage.json`` with ``stopped_by: "deadline"`` and the unit it interrupted, and exits.
- Nothing committed is ever lost: a checkpoint is a folder renamed into place only when
  complete, so the kill leaves the newest committed one as it was. The half-written temporary
  folder of an interrupted save is ignored by discovery and removed by the next save.

Exit status at the deadline: 0 when a committed checkpoint of this stage's recipe is in the
output folder (the chain goes on from it, as after a stage that stopped itself); otherwise one
line saying the budget is too short, exit 2, and the folder left as it was (no stage.json).

The child dies with the parent (PR_SET_PDEATHSIG): killing `rcic-stage` kills its stage.
"""
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rcic.budget import Budget, default_margin
from rcic.config import save_recipe
from rcic.errors import UserError

# Seconds between the kill and the deadline: freezing and killing the process tree, reaping it,
# writing stage.json and the parent's own exit (no torch in it). That work takes 0.03-0.2 s; on
# a 2-core machine at load 16, with the supervisor niced, the exit came up to 1.8 s after the
# kill (tools/budget_sweep.py): the rest is slack for a scheduler slow to run the parent at all.
KILL_RESERVE = 3.0
EVENTS_ENV = "RCIC_STAGE_EVENTS"      # the FIFO a supervised stage reports to
# What a stage tells: "teardown" from its final reports on, "exit" once they are written.
PHASES = ("startup", "step", "eval", "pseudo", "save", "teardown", "exit")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option, value):
    """Linux prctl(2); a no-op where there is none (the kill then misses orphaned processes)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _die_with_parent():
    """In the child between fork and exec: get SIGKILL when the supervisor dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ------------------------------------------------------------------ the child's side

class Reporter:
    """What a supervised stage is doing, told to its supervisor one JSON line at a time.

    Writes never block and never fail the stage: a full pipe drops the line (the next one says
    everything again) and an unsupervised stage has nobody to tell."""

    def __init__(self, path=None):
        path = path if path is not None else os.environ.get(EVENTS_ENV)
        self._fd = None
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                self._fd = None

    def tell(self, phase, status):
        if self._fd is None:
            return
        line = json.dumps({"phase": phase, "status": status}, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError:     # a full pipe (EAGAIN) or a supervisor gone (EPIPE)
            pass


# ------------------------------------------------------------------ killing a process tree

def _process_table():
    """{pid: (ppid, pgid)} of every process (Linux /proc)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue            # it ended while we looked
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def tree(root):
    """`root`, every process below it, and every member of its process group."""
    table = _process_table()
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    found |= {pid for pid, (_, pgid) in table.items() if pgid == root}
    return found


def kill_tree(root):
    """SIGKILL `root` and everything below it; returns their process ids.

    Stopped first (SIGSTOP), then killed, so that none can fork a new process or hand its
    work on between the look and the kill."""
    frozen = set()
    while True:
        new = tree(root) - frozen - {os.getpid()}
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    return frozen


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pids):
    """Collect the exit status of killed processes that are our children now (orphans come to
    the subreaper), and of no other child: a caller may be waiting on its own."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


# ------------------------------------------------------------------ the supervisor

def supervised():
    """True in a stage that a supervisor runs (and in each of its ranks)."""
    return EVENTS_ENV in os.environ


def stage_budget(seconds, start):
    """The budget a supervised stage plans with: the supervisor's, less what the kill needs."""
    return Budget(seconds, start=start, margin=default_margin(seconds) + KILL_RESERVE)


def check_writable(out):
    """Fail before any work if the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rcic-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {out} is not writable ({err.strerror}): pass a writable --out")


def supervise_stage(recipe, data_root, out, budget, resume_roots, max_steps=0, quiet=False, gpus=1):
    """Run `rcic-stage` for `recipe` as a supervised child (torchrun with `gpus` > 1) on the
    clock of `budget`; returns the exit status (see `supervise`). data_root None: the embedded
    data. The recipe travels as a YAML file, exactly as given (overrides included)."""
    check_writable(out)
    folder = Path(tempfile.mkdtemp(prefix="rcic-recipe-"))
    try:
        save_recipe(recipe, folder / "recipe.yaml")
        argv = ["--config", str(folder / "recipe.yaml"), "--out", str(out),
                "--budget", f"{budget.seconds:g}s", "--steps", str(max_steps)]
        argv += ["--data", str(data_root)] if data_root is not None else []
        argv += ["--quiet"] if quiet else []
        argv += ["--resume-from", *map(str, resume_roots)]
        if gpus > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={gpus}", "-m", "rcic.cli.stage", *argv]
        else:
            cmd = [sys.executable, "-m", "rcic.cli.stage", *argv]
        env = dict(os.environ, RCIC_START_TIME=repr(budget.start))
        return supervise(cmd, budget, out, recipe.name, env=env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Listener(threading.Thread):
    """Reads the child's reports; keeps the newest and when its phase began."""

    def __init__(self, fd):
        super().__init__(daemon=True)
        self._file = os.fdopen(fd, "rb", buffering=0)
        self.phase, self.status = "startup", {}
        self.phase_since = time.monotonic()
        self.teardown_since = None
        self.lock = threading.Lock()

    def run(self):
        pending = b""
        while True:
            try:
                chunk = self._file.read(65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with self.lock:
                    if event.get("phase") != self.phase:
                        self.phase_since = time.monotonic()
                    if event.get("phase") == "teardown" and self.teardown_since is None:
                        self.teardown_since = self.phase_since
                    self.phase, self.status = event.get("phase"), event.get("status") or {}

    def teardown_seconds(self):
        """Seconds from the stage's "teardown" report to now (its exit), or None."""
        with self.lock:
            return None if self.teardown_since is None else time.monotonic() - self.teardown_since

    def snapshot(self):
        with self.lock:
            return self.phase, dict(self.status), time.monotonic() - self.phase_since


def supervise(cmd, budget, out, recipe_name, env=None):
    """Run the stage `cmd` under `budget` (a rcic.budget.Budget); end it at the deadline.

    Returns the exit status for rcic-stage: the child's own when it ended by itself; at the
    deadline 0 with a committed checkpoint, else a UserError saying the budget is too short."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    folder = Path(tempfile.mkdtemp(prefix="rcic-stage-"))
    fifo = folder / "events"
    os.mkfifo(fifo)
    # The parent holds a write end too, so the reader never sees end-of-file while the child
    # has not opened its end yet (or has closed it); opened non-blocking, then made blocking.
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(read_fd, True)
    listener = _Listener(read_fd)
    listener.start()
    child_env = dict(os.environ if env is None else env, **{EVENTS_ENV: str(fifo)})
    # Its own process group: the terminal's Ctrl-C reaches only the parent, which forwards it once.
    proc = subprocess.Popen(cmd, env=child_env, process_group=0, preexec_fn=_die_with_parent)
    previous = {s: signal.signal(s, lambda signum, frame: _signal(proc.pid, signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            returncode = proc.wait(timeout=max(0.0, budget.remaining() - KILL_RESERVE))
            if returncode == 0:
                note_exit(Path(out), budget.elapsed(), listener.teardown_seconds())
            return returncode
        except subprocess.TimeoutExpired:
            pass
        phase, status, phase_seconds = listener.snapshot()
        killed_at = budget.elapsed()
        killed = kill_tree(proc.pid)
        try:
            proc.wait(timeout=0.2)   # a process stuck in the kernel dies when the kernel lets it
        except subprocess.TimeoutExpired:
            pass
        _reap(killed - {proc.pid})
        if phase == "exit":
            # It had said all it had to say (its reports, or its one line): only the process's
            # own ending was cut short.
            returncode = status.get("returncode", 0)
            if returncode == 0:
                note_exit(Path(out), budget.elapsed(), listener.teardown_seconds(), killed=True)
            return returncode
        if phase in ("step", "eval", "pseudo", "save"):
            print(file=sys.stderr)   # the stage's progress bar may have left the line open
        if status.get("checkpoint_step") is None:
            # Nothing to continue from: say so, and leave the folder as it was.
            raise UserError(too_short_by_deadline(status.get("recipe", recipe_name),
                                                  phase, phase_seconds, budget.seconds))
        report = deadline_report(status, phase, phase_seconds, killed_at, budget, len(killed),
                                 newest_commit_on_disk(Path(out)))
        # On a disk that has stalled, writing may never return: try, but exit on time.
        writer = threading.Thread(target=_write_report, args=(Path(out), report), daemon=True)
        writer.start()
        writer.join(timeout=max(0.0, budget.remaining() - 0.5))
        print(json.dumps({k: report.get(k) for k in SUMMARY_KEYS}), flush=True)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(keep_open)
        try:
            fifo.unlink()
            folder.rmdir()
        except OSError:
            pass


SUMMARY_KEYS = ("done", "global_step", "total_steps", "epoch", "seconds_used",
                "samples_per_second", "stages_left_estimate", "stopped_by")


def newest_commit_on_disk(out):
    """The step of the newest committed checkpoint folder in `out`, or None. A commit is a
    rename, so a folder named ``ckpt-NNNNNNNNN`` is complete; the child reports its commit only
    after the rename, and a kill can fall between the two."""
    steps = [int(p.name[5:]) for p in out.glob("ckpt-*")
             if p.name[5:].isdigit() and (p / "MANIFEST.json").is_file()]
    return max(steps, default=None)


def deadline_report(status, phase, phase_seconds, killed_at, budget, n_killed, on_disk=None):
    """stage.json after a kill: the child's last status, and what the kill interrupted.
    `on_disk`: the newest commit found in the output folder, newer than the reported one when
    the kill came between a commit's rename and its report."""
    report = dict(status)
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


def note_exit(out, exit_seconds, teardown_seconds, killed=False):
    """Add to the stage's own stage.json when its process ended, as seen from outside, and how
    long its teardown took (reports, plot, loader workers joined, interpreter exit)."""
    try:
        report = json.loads((out / "stage.json").read_text())
    except (OSError, ValueError):
        return
    report["exit_seconds"] = round(exit_seconds, 3)
    if teardown_seconds is not None:
        report.setdefault("costs", {})["teardown_seconds"] = round(teardown_seconds, 3)
    if killed:
        report["killed_at_exit"] = True
    _write_report(out, report)


def _write_report(out, report):
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".stage.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out / "stage.json")
    except OSError as err:
        print(f"rcic-stage: could not write {out / 'stage.json'} ({err.strerror})", file=sys.stderr)


def too_short_by_deadline(recipe_name, phase, phase_seconds, budget_seconds):
    what = {"startup": "start-up", "step": "its first optimizer step", "eval": "a validation",
            "pseudo": "a pseudo-label pass", "save": "its first save",
            "teardown": "its teardown"}.get(phase, phase)
    return (f"budget {format_duration(budget_seconds)} is too short for recipe {recipe_name} "
            f"here: {what} was still running at the deadline ({phase_seconds:.0f} s in) and "
            f"nothing was committed; give it at least {round_up_duration(2 * budget_seconds)}")


def format_duration(seconds):
    """A duration as a person types it: 40s, 1m12s, 8h, 7h30m (whole seconds)."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + \
        (f"{seconds}s" if seconds or not (hours or minutes) else "")
    return text


def round_up_duration(seconds):
    """`seconds` rounded up to what a person would ask for: whole seconds under a minute,
    whole minutes under an hour, whole 10 minutes above."""
    step = 1 if seconds < 60 else 60 if seconds < 3600 else 600
    return format_duration(step * -(-seconds // step))
