"""Progress in a kernel log: a stage whose output goes to a file writes a plain line at most
every RCIC_LOG_INTERVAL seconds, never tqdm's ten refreshes a second; a terminal keeps the bar."""
import io
import json
import os
import re
import subprocess
import time

from tqdm import tqdm

from rcic.progress import PlainProgress, progress

LINE = re.compile(r"^rcic stage: step (\d+)/(\d+) \(\d+%\), epoch \d+, left [\d.]+m, "
                  r"loss [\d.]+, [\d.]+ samples/s$")


def test_a_stage_writing_to_a_pipe_prints_a_line_per_interval(tiny_data, tmp_path):
    """As in a kernel: the stage's output goes to a pipe, read here line by line as it comes."""
    interval = 2.0
    env = dict(os.environ, RCIC_LOG_INTERVAL=str(interval), PYTHONUNBUFFERED="1")
    # 200 steps, whatever they cost on this machine (seconds when idle, longer when loaded):
    # several intervals long, and many steps an interval.
    proc = subprocess.Popen(
        ["rcic-stage", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--budget", "10m",
         "--steps", "200", "--set", "data.image_size=16", "data.batch_size=4", "train.epochs=500",
         "train.log_every_steps=1", "data.num_workers=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    arrived = [(time.monotonic(), raw.decode()) for raw in proc.stdout]
    assert proc.wait() == 0
    assert not any("\r" in line for _, line in arrived)       # no tqdm refreshes
    progress_lines = [(t, line.rstrip("\n")) for t, line in arrived
                      if line.startswith("rcic stage: ")]
    assert all(LINE.match(line) for _, line in progress_lines), progress_lines
    steps = [int(LINE.match(line)[1]) for _, line in progress_lines]
    assert len(steps) >= 3 and steps == sorted(steps)
    # One line when training starts, then at most one an interval; the last closes the run.
    gaps = [b - a for (a, _), (b, _) in zip(progress_lines[:-2], progress_lines[1:-1])]
    assert all(gap >= 0.9 * interval for gap in gaps), gaps
    # A handful of lines, however many steps: tqdm would have written one a step or more.
    assert steps[-1] >= 3 * len(steps), steps
    assert json.loads((tmp_path / "run" / "stage.json").read_text())["stopped_by"] == "steps"


def test_plain_lines_keep_their_cadence():
    now = [0.0]
    out = io.StringIO()
    bar = PlainProgress(100, 0, "rcic stage", "step", lambda: {"loss": 0.5}, out, 30.0,
                        clock=lambda: now[0])
    for _ in range(100):           # a step a second for 100 s
        now[0] += 1.0
        bar.update(1)
        bar.set_postfix(epoch=1)
    bar.close()
    lines = out.getvalue().splitlines()
    # the first step, then at 31, 61, 91 s, then the end
    assert [l.split(",")[0] for l in lines] == [
        "rcic stage: step 1/100 (1%)", "rcic stage: step 31/100 (31%)",
        "rcic stage: step 61/100 (61%)", "rcic stage: step 91/100 (91%)",
        "rcic stage: step 100/100 (100%)"]
    assert lines[-1].endswith("epoch 1, loss 0.5")


def test_a_terminal_keeps_the_live_bar(monkeypatch):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        bar = progress(10, stream=terminal)
        assert isinstance(bar, tqdm) and not bar.disable
        bar.close()
    os.close(master)
    assert isinstance(progress(10, stream=io.StringIO()), PlainProgress)
    monkeypatch.setenv("RCIC_LOG_INTERVAL", "soon")
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert progress(10, stream=io.StringIO()).interval == 30.0
    assert "RCIC_LOG_INTERVAL='soon' is not a number" in err.getvalue()
