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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rcic import stage_report
from rcic.budget import KILL_RESERVE
from rcic.checkpoint_names import newest_commit_on_disk
from rcic.errors import UserError

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
    """What a supervised stage is doing, told to its supervisor one JSON line at a time: a
    phase of rcic.stage_report.PHASES and the stage's numbers so far.

    Writes never block and never fail the stage: a full pipe drops the line (the next one says
    everything again), and a stage without a supervisor (`path` None) has nobody to tell."""

    def __init__(self, path=None):
        self._fd = None
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                self._fd = None

    def tell(self, phase, status):
        assert phase in stage_report.PHASES, phase
        if self._fd is None:
            return
        # When, on the clock every process of the machine shares: the supervisor times phases
        # from it, not from when it got round to reading the line (late on a loaded machine).
        line = json.dumps({"phase": phase, "status": status, "at": time.monotonic()},
                          separators=(",", ":")) + "\n"
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


def children(parent):
    """The process ids whose parent is `parent`."""
    return {pid for pid, (ppid, _) in _process_table().items() if ppid == parent}


def tree(*roots):
    """`roots`, every process below them, and every member of their process groups."""
    table = _process_table()
    found, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    found |= {pid for pid, (_, pgid) in table.items() if pgid in roots}
    return found


def kill_tree(*roots):
    """SIGKILL `roots` and everything below them; returns their process ids.

    Stopped first (SIGSTOP), then killed, so that none can fork a new process or hand its
    work on between the look and the kill."""
    frozen = set()
    while True:
        new = tree(*roots) - frozen - {os.getpid()}
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
                        self.phase_since = event.get("at") or time.monotonic()
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


def supervise(command, budget, out, recipe_name):
    """Run the stage `command(events)` under `budget` (a rcic.budget.Budget); end it at the
    deadline. `command` makes the stage's argv from the path of the FIFO its Reporter writes to.

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
    ours = children(os.getpid())     # our own children, before the stage: never the stage's
    # Its own process group: the terminal's Ctrl-C reaches only the parent, which forwards it once.
    proc = subprocess.Popen(command(fifo), process_group=0, preexec_fn=_die_with_parent)

    def adopted():
        """Orphans of the stage (their parent exited), which came to us as its subreaper."""
        return children(os.getpid()) - ours - {proc.pid}

    previous = {s: signal.signal(s, lambda signum, frame: _signal(proc.pid, signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            returncode = proc.wait(timeout=max(0.0, budget.remaining() - KILL_RESERVE))
            _reap(kill_tree(*adopted()))     # none outlives the stage
            if returncode == 0:
                note_exit(out, budget.elapsed(), listener.teardown_seconds())
            return returncode
        except subprocess.TimeoutExpired:
            pass
        phase, status, phase_seconds = listener.snapshot()
        killed_at = budget.elapsed()
        killed = kill_tree(proc.pid, *adopted())
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
                note_exit(out, budget.elapsed(), listener.teardown_seconds(), killed=True)
            return returncode
        if phase in ("step", "eval", "pseudo", "save"):
            print(file=sys.stderr)   # the stage's progress bar may have left the line open
        if status.get("checkpoint_step") is None:
            # Nothing to continue from: say so, and leave the folder as it was.
            raise UserError(stage_report.killed_before_a_commit(
                status.get("recipe", recipe_name), budget.seconds, phase, phase_seconds))
        report = stage_report.deadline_report(status, phase, phase_seconds, killed_at, budget,
                                              len(killed), newest_commit_on_disk(out))
        # On a disk that has stalled, writing may never return: try, but exit on time.
        writer = threading.Thread(target=_write_report, args=(out, report), daemon=True)
        writer.start()
        writer.join(timeout=max(0.0, budget.remaining() - 0.5))
        print(json.dumps({k: report.get(k) for k in stage_report.SUMMARY_KEYS}), flush=True)
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


def note_exit(out, exit_seconds, teardown_seconds, killed=False):
    """Add to the stage's own stage.json when its process ended, as seen from outside, and how
    long its teardown took (reports, plot, loader workers joined, interpreter exit)."""
    fields = {"exit_seconds": round(exit_seconds, 3)}
    if killed:
        fields["killed_at_exit"] = True
    costs = None if teardown_seconds is None else {"teardown_seconds": round(teardown_seconds, 3)}
    try:
        stage_report.amend(out, fields, costs)
    except OSError as err:
        print(f"rcic-stage: could not write {Path(out) / stage_report.REPORT_NAME} "
              f"({err.strerror})", file=sys.stderr)


def _write_report(out, report):
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        stage_report.write(out, report)
    except OSError as err:
        print(f"rcic-stage: could not write {Path(out) / stage_report.REPORT_NAME} "
              f"({err.strerror})", file=sys.stderr)
