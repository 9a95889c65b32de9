"""Progress in a kernel log: a stage whose output goes to a file writes a plain line at most
every RCIC_LOG_INTERVAL seconds, never tqdm's ten refreshes a second; a terminal keeps the bar."""
import io
import os
import re
import subprocess
import time

from tqdm import tqdm

from rcic.progress import PlainProgress, progress

LINE = re.compile(r"^rcic stage: step (\d+)/(\d+) \(\d+%\), epoch \d+, left [\d.]+m, "
                  r"loss [\d.]+, [\d.]+ samples/s$")


def test_a_stage_logging_to_a_file_writes_a_line_per_interval(tiny_data, tmp_path):
    interval = 2.0
    log = tmp_path / "kernel.log"
    env = dict(os.environ, RCIC_LOG_INTERVAL=str(interval))
    started = time.monotonic()
    with open(log, "w") as f:
        # Enough epochs that the 25 s budget, not the recipe, ends the stage.
        subprocess.run(["rcic-stage", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                        "--budget", "25s", "--set", "data.image_size=16", "data.batch_size=4",
                        "train.epochs=500", "train.log_every_steps=1", "train.eval_every_steps=0",
                        "data.num_workers=0"],
                       stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    seconds = time.monotonic() - started
    text = log.read_text()
    assert "\r" not in text                    # no tqdm refreshes
    lines = [l for l in text.splitlines() if l.startswith("rcic stage: ")]
    assert all(LINE.match(l) for l in lines), lines
    steps = [int(LINE.match(l)[1]) for l in lines]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    # One line when training starts, one per interval after it, one at the end: a handful,
    # however many steps (here hundreds) the stage took.
    assert 3 <= len(lines) <= seconds / interval + 2, (len(lines), seconds)
    assert steps[-1] > 5 * len(lines)


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
