"""rcic.budget: durations, the process-start clock, margins, estimates and polite stops."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcic.budget import Budget, DurationEstimator, StopRequest, parse_duration, process_start_time
from rcic.errors import UserError

PROGRAM = str(Path(__file__).parent / "programs" / "budget_loops.py")


@pytest.mark.parametrize("text, seconds", [
    ("8h", 8 * 3600), ("7h30m", 7.5 * 3600), ("45m", 2700), ("90s", 90), ("1h2m3s", 3723),
    ("1:30:00", 5400), ("30:00", 1800), ("90:00", 5400), ("7h 30m", 27000), ("1.5h", 5400),
    (" 8H ", 28800),
])
def test_parse_duration_accepts(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "   ", "0", "0s", "0:00", "-1h", "8x", "h", "1:99:00", "1:60", "3600", "30m1h", "1e3s",
    "nan", "9" * 400 + "h",
])
def test_parse_duration_refuses(text):
    with pytest.raises(UserError) as err:
        parse_duration(text)
    assert str(err.value) == (f"budget '{text}' is not a duration: "
                              "write e.g. 8h, 7h30m, 45m, 90s or 1:30:00")


def test_budget_arithmetic():
    start = time.time() - 40
    budget = Budget(100, start=start, margin=5)
    assert budget.deadline == start + 100
    assert 40 <= budget.elapsed() < 41
    assert 59 < budget.remaining() <= 60
    assert budget.fits(54)       # 60 left - 5 margin = 55 usable
    assert not budget.fits(55.5)
    assert not Budget(10, start=time.time() - 11, margin=0).fits(0)  # already over


def test_default_margin_keeps_unused_time_small():
    assert Budget(60).margin == 3          # short budgets: a floor for interpreter exit
    assert Budget(600).margin == 9         # 1.5 %
    assert Budget(8 * 3600).margin == 432
    for seconds in (600, 3600, 9 * 3600):
        assert Budget(seconds).margin <= 0.05 * seconds


def test_process_start_time_is_when_the_process_started_not_when_imported():
    code = ("import time; t0 = time.time(); time.sleep(1.0)\n"
            "from rcic.budget import process_start_time, Budget\n"
            "print(t0 - process_start_time(), Budget(60).elapsed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    started_before_t0, elapsed = map(float, out.stdout.split())
    # The interpreter started a little before its first line ran, and a whole second before
    # rcic.budget was imported: falling back to the import time would give about -1.
    assert 0 <= started_before_t0 < 0.5
    assert elapsed >= 1.0
    assert process_start_time() <= time.time()


def test_estimator_excludes_warmup_and_is_conservative():
    est = DurationEstimator(warmup=2, window=3)
    assert est.estimate("step") is None
    assert est.estimate("step", default=7) == 7
    est.record("step", 10.0)            # warm-up: slow
    assert est.estimate("step") == 10.0  # the only measurement so far: slow, hence safe
    est.record("step", 9.0)
    for seconds in (1.0, 2.0, 1.5):
        est.record("step", seconds)
    assert est.estimate("step") == 2.0   # warm-up gone; the worst recent step
    for seconds in (1.0, 1.0, 1.0):
        est.record("step", seconds)
    assert est.estimate("step") == 1.0   # only the last `window` samples count
    assert est.estimate("eval") is None  # kinds are independent


def test_estimator_seed_and_timer():
    est = DurationEstimator(warmup=1)
    est.seed("save", 2.0)
    assert est.estimate("save") == 2.0
    est.record("save", 5.0)              # a slow first save raises the estimate
    assert est.estimate("save") == 5.0
    with est.timer("save"):
        time.sleep(0.05)
    assert 0.05 <= est.estimate("save") < 1.0  # measured now; seed and warm-up left behind
    with pytest.raises(ZeroDivisionError):
        with est.timer("eval"):
            1 / 0
    assert est.estimate("eval") is None  # a block that failed is no sample


def _start_stop_loop(step_seconds, ignoring=()):
    """The stop loop, once it is inside its first step; started with the signals `ignoring` ignored
    (as a shell starts a background job: SIGINT and SIGQUIT ignored)."""
    def ignore():
        for signum in ignoring:
            signal.signal(signum, signal.SIG_IGN)
    proc = subprocess.Popen([sys.executable, PROGRAM, "stop", str(step_seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "step 1 start":
            return proc, lines
    raise AssertionError(f"program ended early: {lines} {proc.stderr.read()}")


def _read_until(proc, lines, wanted):
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip().startswith(wanted):
            return line.strip()
    raise AssertionError(f"no {wanted!r}: {lines} {proc.stderr.read()}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_then_exits_0(signum):
    # Whenever the signal lands (a loaded machine may delay it by a step or more), the loop
    # finishes the step it was taken in, then stops.
    proc, lines = _start_stop_loop(step_seconds=0.4)
    proc.send_signal(signum)
    step = _read_until(proc, lines, "stop seen in step").split()[-1]
    out, err = proc.communicate(timeout=30)
    lines += out.split("\n")[:-1]
    assert proc.returncode == 0, err
    assert lines[-2:] == [f"step {step} end", f"stopped after step {step}"]


@pytest.mark.parametrize("ignoring", [(), (signal.SIGINT,)], ids=["", "begun-ignoring-sigint"])
def test_second_signal_aborts(ignoring):
    # The second signal is sent only once the program has taken the first: two signals that
    # reach a descheduled process before its handler runs would be delivered as one. A process
    # begun with SIGINT ignored (a background job) must abort all the same.
    proc, lines = _start_stop_loop(step_seconds=30.0, ignoring=ignoring)
    proc.send_signal(signal.SIGINT)
    step = _read_until(proc, lines, "stop seen in step").split()[-1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err and f"step {step} end" not in out


def test_stop_request_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) != before[0]
        assert not stop.requested
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_processes_exit_before_their_budget():
    """A miniature stage with random step lengths, three at once: each exits in time, and
    stops only when one more step and the save no longer fit (by its own measured estimates,
    however slow a loaded machine makes its steps), not earlier."""
    budget, margin = 4.0, 0.5
    launched = time.time()
    procs = [subprocess.Popen([sys.executable, PROGRAM, "budget", f"{budget:g}s", str(margin), str(seed)],
                              stdout=subprocess.PIPE, text=True) for seed in range(3)]
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        report = json.loads(out.strip().splitlines()[-1])
        assert launched <= report["start"] + 0.05      # the clock started with the process
        # In time, by the process's own clock (which started when the process did) ...
        assert report["elapsed"] < budget, report
        # ... and it stopped because the next step and the save would not have fit, not before.
        assert report["stopped_at"] + report["needed"] > budget - margin, report
        assert report["steps"] >= 1
