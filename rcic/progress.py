"""Progress that reads in a terminal and in a kernel log alike.

A terminal gets tqdm's live bar. Anywhere else (every Kaggle kernel, the dry run's kernel.log,
a redirected run) tqdm would write a line per refresh, ten a second: hundreds of thousands of
lines for an 8-hour stage, which Kaggle's log viewer and `kaggle kernels output` handle badly.
There the same object prints one plain line at most every RCIC_LOG_INTERVAL seconds (default
30), plus a last one when the work ends:

    rcic stage: step 120/400 (30%), epoch 2, left 5.2m, loss 1.234, 85.3 samples/s

Both kinds take the calls the loops already make: `update(n)`, `set_postfix(**fields)`, and
use as a context manager.
"""
import os
import sys
import time

from tqdm import tqdm

INTERVAL_ENV = "RCIC_LOG_INTERVAL"
DEFAULT_INTERVAL = 30.0


def log_interval():
    """Seconds between two plain progress lines (RCIC_LOG_INTERVAL, default 30)."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        seconds = -1.0
    # A bad value must not stop a stage hours into a chain: fall back, and say so once.
    if not seconds >= 0:
        print(f"rcic: {INTERVAL_ENV}={text!r} is not a number of seconds; using "
              f"{DEFAULT_INTERVAL:g}", file=sys.stderr, flush=True)
        seconds = DEFAULT_INTERVAL
    return seconds


def progress(total, initial=0, *, desc="rcic", unit="step", disable=False, status=None,
             stream=None):
    """A progress reporter: tqdm's bar when `stream` (default stderr) is a terminal, else
    plain lines at most every log_interval() seconds.

    `status`: a function returning extra {name: value} fields, called only when a plain line
    is printed (so it may be costly, e.g. read a loss off the GPU).
    """
    stream = stream or sys.stderr
    if disable or stream_is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                    file=stream, dynamic_ncols=True)
    return PlainProgress(total, initial, desc, unit, status, stream, log_interval())


def stream_is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # a closed or unusual stream: treat as a file
        return False


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class PlainProgress:
    """One line at most every `interval` seconds; the first update and the end print too.

    A line falls due on an update; it is printed at the `set_postfix` that follows (loops call
    it right after `update`, with the fields of the step just taken), or at the next update
    or the end for a caller that sets none.
    """

    def __init__(self, total, initial, desc, unit, status, stream, interval, clock=time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.status, self.stream, self.interval, self.clock = status, stream, interval, clock
        self.fields = {}
        self.last_time = None          # when the last line was printed (None: none yet)
        self.printed_n = initial
        self.due = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        if self.due:
            self.print_line()
        self.n += n
        self.due = self.last_time is None or self.clock() - self.last_time >= self.interval

    def set_postfix(self, **fields):
        self.fields = fields
        if self.due:
            self.print_line()

    def close(self):
        if self.n != self.printed_n:
            self.print_line()

    def line(self):
        count = f"{self.unit} {self.n}"
        if self.total:
            count += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        fields = dict(self.fields)
        if self.status is not None:
            fields.update(self.status())
        parts = [count] + [f"{k} {format_value(v)}" if not k.endswith("/s") else
                           f"{format_value(v)} {k}" for k, v in fields.items() if v is not None]
        return f"{self.desc}: {', '.join(parts)}"

    def print_line(self):
        print(self.line(), file=self.stream, flush=True)
        self.last_time, self.printed_n, self.due = self.clock(), self.n, False


def latest(rows, key):
    """The newest value of `key` in a list of dict rows (a training history), or None."""
    return next((row[key] for row in reversed(rows) if key in row), None)
