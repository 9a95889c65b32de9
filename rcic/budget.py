"""Time budgets: parse a duration, keep a deadline, and decide whether one more unit of work fits.

Kaggle kills a kernel at its limit without warning, so a stage must stop *before* its budget with
everything saved. Three pieces work together:

- `Budget` starts its clock when the *process* started (not when training starts: imports,
  data discovery and model building count against the same limit) and keeps a safety margin.
- `DurationEstimator` learns how long a step, a validation or a save takes, conservatively.
- The stage asks ``budget.fits(estimator.estimate("step") + estimator.estimate("save"))`` before
  each unit of work, so that the unit *and* the final save still fit.

`StopRequest` turns SIGTERM / SIGINT into a polite request, so the loop stops the same way.
"""
import math
import os
import re
import signal
import time
from collections import defaultdict, deque
from contextlib import contextmanager

from rcic.errors import UserError

_IMPORT_TIME = time.time()

# Seconds between the supervisor's kill and the deadline (rcic.deadline): freezing and killing
# the process tree, reaping it, writing stage.json and the supervisor's own exit (no torch in it).
# That work takes 0.03-0.2 s; on a 2-core machine at load 16, with the supervisor niced, the exit
# came up to 1.8 s after the kill (tools/budget_sweep.py): the rest is slack for a scheduler slow
# to run the supervisor at all. A supervised stage plans with this much more margin.
KILL_RESERVE = 3.0

# The share of a stage's budget that goes to training steps; the rest pays start-up, validation
# and the final save. Used to estimate how many stages a recipe needs.
USABLE_FRACTION = 0.9

# "8h", "7h30m", "45m", "90s", "1h2m3s", "1.5h"; spaces between the parts are allowed.
_UNITS = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?\s*(?:(?P<m>\d+(?:\.\d+)?)m)?\s*(?:(?P<s>\d+(?:\.\d+)?)s)?")
# "1:30:00" is h:mm:ss and "30:00" is m:ss, as in Slurm's --time; the leading field is unbounded.
_CLOCK = re.compile(r"(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d\d)")


def parse_duration(text):
    """Seconds in a duration such as ``8h``, ``7h30m``, ``45m``, ``90s``, ``1:30:00`` or ``30:00``.

    ``h:mm:ss`` and ``m:ss`` follow Slurm (minutes and seconds after a colon must be below 60).
    A bare number such as ``3600`` is refused: seconds, minutes (Slurm) and hours are all
    plausible readings, and guessing wrong costs a whole stage. Zero is refused too.
    """
    cleaned = str(text).strip().lower()
    seconds = None
    units = _UNITS.fullmatch(cleaned)
    clock = _CLOCK.fullmatch(cleaned)
    if cleaned and units:
        h, m, s = (float(units[k] or 0) for k in "hms")
        seconds = h * 3600 + m * 60 + s
    elif clock and int(clock["s"]) < 60 and (clock["h"] is None or int(clock["m"]) < 60):
        seconds = int(clock["h"] or 0) * 3600 + int(clock["m"]) * 60 + int(clock["s"])
    if not seconds or not math.isfinite(seconds):
        raise UserError(f"budget '{text}' is not a duration: write e.g. 8h, 7h30m, 45m, 90s or 1:30:00")
    return float(seconds)


def process_start_time():
    """Epoch seconds at which this process started, so a budget counts interpreter start-up too.

    Linux: the start tick in /proc/self/stat measured against /proc/uptime (both on the boot
    clock, good to 10 ms; /proc/stat's btime is rounded to whole seconds). Elsewhere, or if /proc
    looks wrong, the time this module was imported, which is a little later than the truth.
    """
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces and ')', so count fields after the last ')'.
            after_name = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22: starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        started = time.time() - age
    except (OSError, ValueError, IndexError):
        return _IMPORT_TIME
    # The process cannot have started after this module was imported; if /proc says so, distrust it.
    return started if 0 <= age and started <= _IMPORT_TIME else _IMPORT_TIME


MARGIN_FRACTION = 0.015


def default_margin(seconds):
    """Seconds a budget keeps in reserve: max(3 s, 1.5 % of the budget).

    The margin covers what comes after the last decision: writing the report and plot, flushing
    the log, joining loader workers and interpreter exit (a few seconds whatever the budget),
    plus a step or save that runs longer than its estimate (which grows with the run's scale).
    For budgets of 10 minutes or more the margin is 1.5 %, which leaves 3.5 % of the budget for
    the last unit of work that no longer fits, keeping the unused part under 5 %.
    """
    return max(3.0, MARGIN_FRACTION * seconds)


class Budget:
    """A time limit counted from `start` (default: when the process started)."""

    def __init__(self, seconds, start=None, margin=None):
        self.seconds = float(seconds)
        self.start = process_start_time() if start is None else float(start)
        self.margin = default_margin(self.seconds) if margin is None else float(margin)
        self.deadline = self.start + self.seconds
        # Count on the monotonic clock so a wall-clock jump (NTP) cannot stretch the budget.
        self._start_monotonic = time.monotonic() - (time.time() - self.start)

    def elapsed(self):
        return time.monotonic() - self._start_monotonic

    def remaining(self):
        return self.seconds - self.elapsed()

    def fits(self, seconds_needed):
        """True when `seconds_needed` more seconds of work still leave the margin untouched."""
        return self.remaining() - self.margin >= seconds_needed


# Seconds torchrun takes to end after its ranks have: its agent notices (it polls every 0.1 s),
# closes the rendezvous and exits. 1.6 s for two CPU ranks on a 2-core machine at load 8
# (stage.json's measured teardown, less a one-process stage's); kept at three times that.
TORCHRUN_TEARDOWN = 5.0


def stage_budget(seconds, start, world=1):
    """The budget a supervised stage of `world` processes plans with: the supervisor's, less
    what the kill needs (and torchrun's own ending, when it runs the ranks)."""
    margin = default_margin(seconds) + KILL_RESERVE + (TORCHRUN_TEARDOWN if world > 1 else 0.0)
    return Budget(seconds, start=start, margin=margin)


def minimum_budget(work_seconds):
    """The shortest budget in which a supervised stage can do `work_seconds` of work (start-up,
    a unit, a save): what is left after its margin and the kill reserve."""
    # budget - max(3, 0.015 budget) - KILL_RESERVE >= work, solved for budget.
    return max(work_seconds + 3.0 + KILL_RESERVE, (work_seconds + KILL_RESERVE) / (1 - MARGIN_FRACTION))


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


class DurationEstimator:
    """Conservative durations of repeated kinds of work ("step", "eval", "save", ...).

    The first `warmup` samples of each kind (cudnn autotuning, loader start-up, cold caches) are
    kept apart. Once later samples exist, the estimate is the maximum of the last `window` of
    them: for one more unit that is the honest worst case, and overestimating costs at most one
    unit of idle time at the end, while underestimating costs the stage. Before then, the
    estimate is the maximum of the warm-up samples and the seed: slow, hence safe.
    """

    def __init__(self, warmup=2, window=20):
        self.warmup = warmup
        self._early = defaultdict(list)
        self._steady = defaultdict(lambda: deque(maxlen=window))
        self._seeds = {}

    def seed(self, kind, seconds):
        """A prior for `kind` before it has been measured, e.g. the save time of the last stage."""
        self._seeds[kind] = float(seconds)

    def record(self, kind, seconds):
        if len(self._early[kind]) < self.warmup:
            self._early[kind].append(float(seconds))
        else:
            self._steady[kind].append(float(seconds))

    def estimate(self, kind, default=None):
        if self._steady[kind]:
            return max(self._steady[kind])
        early = self._early[kind] + ([self._seeds[kind]] if kind in self._seeds else [])
        return max(early) if early else default

    @contextmanager
    def timer(self, kind):
        """Time the block and record it under `kind` (not when it raises: that is no sample)."""
        began = time.perf_counter()
        yield
        self.record(kind, time.perf_counter() - began)


class Interrupted(Exception):
    """A long pass (validation, pseudo-labels) stopped at a batch boundary: nothing of it is kept."""


def interruptible(batches, stop=None):
    """Yield from `batches`, asking `stop()` before taking each one (None: never asked); raise
    Interrupted when it says so. Asked before a batch is taken, so a stop wastes none."""
    iterator = iter(batches)
    while stop is None or not stop():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch
    raise Interrupted()


class StopRequest:
    """SIGTERM and SIGINT set `requested` instead of killing, so the loop can finish its step,
    save and exit 0. A second signal means the user insists: the old handlers come back and the
    signal is delivered to them (checkpoint commits are atomic, so that is safe too).

    Signal handlers can only be installed from the main thread. Use as a context manager or call
    `restore()`. The handler only sets a flag: printing from a handler can fail mid-write.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signum = None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def requested(self):
        return self._signum is not None

    def _handle(self, signum, frame):
        if self._signum is None:
            self._signum = signum
            return
        ignored = self._previous.get(signum) == signal.SIG_IGN
        self.restore()
        if ignored:
            # The process began with this signal ignored (a shell's background job begins so
            # with SIGINT): the first one was taken all the same, so the second must not vanish.
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)
        signal.raise_signal(signum)

    def restore(self):
        for signum, handler in self._previous.items():
            # None: the old handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
