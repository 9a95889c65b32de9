"""A program that tests/test_deadline.py runs as real processes (no torch: it starts fast).

    python stand_in_stage.py supervise BUDGET OUT BEHAVIOUR
        rcic.deadline.supervise() over `python stand_in_stage.py child EVENTS OUT BEHAVIOUR`, as
        rcic-stage runs a stage's worker; exits with its status (a UserError: one line, exit 2).
    python stand_in_stage.py child EVENTS OUT BEHAVIOUR
        A stand-in stage. It starts a grandchild in a session of its own (as torchrun starts
        its ranks), a forked worker in its process group (as a DataLoader does) and an orphan
        (a sleeper whose parent exited), writes their pids to OUT/pids, reports phase "step" with a committed checkpoint at step 3, then:
          hang       reports "save" and sleeps forever (a save stuck in the kernel)
          nothing    reports "step" with no committed checkpoint and sleeps forever
          finish     reports "teardown", writes OUT/stage.json itself 0.3 s later, exits 0
          signal     waits for SIGTERM, writes OUT/got-SIGTERM-N (N: how many), exits 0 after 1 s
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rcic.budget import Budget, parse_duration
from rcic.deadline import Reporter, supervise
from rcic.errors import cli_main

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def orphaned_sleeper():
    """A sleeper in a session of its own whose parent has exited, as a daemonising tool leaves
    one: the supervisor (a subreaper) adopts it, so it is no longer below this process."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        sleeper = subprocess.Popen(SLEEPER)
        os.write(write, str(sleeper.pid).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    return int(os.read(read, 32))


def child(events, out, behaviour):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = subprocess.Popen(SLEEPER, start_new_session=True)
    worker = os.fork()
    if worker == 0:
        time.sleep(3600)
        os._exit(0)
    orphan = orphaned_sleeper()
    (out / "pids").write_text(json.dumps([os.getpid(), rank.pid, worker, orphan]))
    reporter = Reporter(events)
    committed = {"recipe": "stand-in", "global_step": 3, "checkpoint_step": 3, "total_steps": 10}
    if behaviour == "finish":
        reporter.tell("teardown", committed)
        time.sleep(0.3)
        (out / "stage.json").write_text(json.dumps({"stopped_by": "budget"}))
        rank.kill()
        os.kill(worker, signal.SIGKILL)
        return 0
    if behaviour == "signal":
        received = []
        signal.signal(signal.SIGTERM, lambda *_: received.append(1))
        reporter.tell("step", committed)
        while not received:
            time.sleep(0.01)
        time.sleep(1.0)        # a second signal would arrive in here
        (out / f"got-SIGTERM-{len(received)}").write_text("")
        rank.kill()
        os.kill(worker, signal.SIGKILL)
        return 0
    if behaviour == "nothing":
        reporter.tell("step", dict(committed, checkpoint_step=None))
    elif behaviour == "renamed":
        # A save whose commit (the rename into ckpt-000000004) is done but not yet reported:
        # the kill falls in between.
        reporter.tell("save", committed)
        (out / "ckpt-000000004").mkdir()
        (out / "ckpt-000000004" / "MANIFEST.json").write_text("{}")
    else:
        reporter.tell("step", committed)
        time.sleep(0.2)
        reporter.tell("save", committed)
    while True:
        time.sleep(3600)


def run_supervised(argv):
    budget_text, out, behaviour = argv
    return supervise(lambda events: [sys.executable, __file__, "child", str(events), out, behaviour],
                     Budget(parse_duration(budget_text)), out, "stand-in")


if __name__ == "__main__":
    if sys.argv[1] == "supervise":
        raise SystemExit(cli_main("supervise", run_supervised, sys.argv[2:]))
    raise SystemExit(child(*sys.argv[2:]))
