"""Bad input, every console script: one clear line on stderr, a non-zero exit, nothing damaged.

Each case runs a console script's `main(argv)` (what the installed script calls) in a
workspace that already holds earlier results: a stage output, a submission, a cache. After the
command, every file that existed before must be byte-identical (a stage log may only grow).
`test_console_scripts_as_installed` runs one case per script as a real process, so stray
warnings at import or start-up would show there.

The cases and their outcomes are tabulated in RELIABILITY.md. Outcomes that are not errors
on purpose (a damaged checkpoint skipped with a warning, inputs a command never reads) are
asserted as such; known bugs in files this suite does not own are strict xfails.
"""
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from faults.harness import error_lines, on_its_own_line, snapshot
from helpers import run_main, stage_argv, stage_main_here, tiny
from rcic.checkpoint import find_checkpoints
from rcic.cli import cache, chain, predict, submission, synth

MAINS = {"rcic-synth": synth.main, "rcic-cache": cache.main, "rcic-stage": stage_main_here,
         "rcic-predict": predict.main, "rcic-submission": submission.main,
         "rcic-chain": chain.main}
# Loader workers 0: stages run inside this test process. 8 steps in all.
TINY = tiny(epochs=1, workers=0)
TRAIN_PNG = "train/HUVEC-01/Plate1/G02_s1_w1.png"     # a training (not validation) image
TEST_PNG = "test/HUVEC-03/Plate1/H02_s1_w1.png"       # a test treatment well: predicted


# ------------------------------------------------------------------ the world before the command

@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """Earlier results a bad command must leave alone: an unfinished stage (2 of 8 steps),
    a valid submission and a complete cache, all made by the real commands."""
    root = tmp_path_factory.mktemp("world")
    assert call("rcic-stage", stage_argv(tiny_data, root / "stage", "--resume-from", "--steps", 2,
                                         budget="10h", recipe=TINY))[0] == 0
    assert call("rcic-predict", ["--data", str(tiny_data), "--checkpoint", str(root / "stage"),
                                 "--out", str(root / "submission.csv"), "--tta", "1"])[0] == 0
    assert call("rcic-cache", ["--data", str(tiny_data), "--out", str(root / "cache"),
                               "--size", "16", "--workers", "1"])[0] == 0
    return root


_capture = None


@pytest.fixture(autouse=True)
def captured(capfd):
    global _capture
    _capture = capfd
    yield


def call(script, argv):
    """(exit status, stderr) of a console script's main(argv), run in this process as if
    freshly started (no log handler of an earlier command writes into this one's capture)."""
    if _capture is not None:
        _capture.readouterr()
    status = run_main(MAINS[script], argv)
    err = _capture.readouterr().err if _capture is not None else ""
    return status, err


@dataclass
class Workspace:
    root: Path
    data: Path
    paths: dict = field(default_factory=dict)

    def __getitem__(self, name):
        return self.paths.get(name, self.root / name)


def make_workspace(world, tiny_data, tmp_path):
    """A copy of the data and of the earlier results. The data files are hard links (fast):
    a case replaces a file rather than writing into it, and a command that wrote into one
    would show as a changed file."""
    ws = Workspace(tmp_path, tmp_path / "data")
    shutil.copytree(tiny_data, ws.data, copy_function=os.link)
    shutil.copytree(world / "stage", tmp_path / "stage")
    shutil.copy(world / "submission.csv", tmp_path / "submission.csv")
    shutil.copytree(world / "cache", tmp_path / "cache")
    return ws


# ------------------------------------------------------------------ the bad inputs

def replace_file(path, data):
    path.unlink()                      # a new file: never write through to a shared inode
    path.write_bytes(data)


def write_png(path, array):
    path.unlink()
    assert cv2.imwrite(str(path), array)


def edit_csv(ws, name, edit):
    path = ws.data / name
    frame = edit(pd.read_csv(path))
    path.unlink()
    frame.to_csv(path, index=False)


def first_row(frame, column, value):
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[0, column] = value
    return frame


def damage_body(ws):
    """Header intact (passes the up-front check), pixels gone: found only when decoded. The
    commands write to new outputs (a complete cache or a finished stage would read nothing)."""
    for png in (ws.data / TRAIN_PNG, ws.data / TEST_PNG):
        replace_file(png, png.read_bytes()[:60])
    ws.paths["out"] = ws.root / "fresh-output"


def checkpoint_copy(ws, edit):
    """A copy of the earlier stage, its checkpoint edited, as --resume-from / --checkpoint."""
    folder = ws.root / "other"
    shutil.copytree(ws.root / "stage", folder)
    edit(next(folder.glob("ckpt-*")), folder)
    ws.paths["resume"] = folder


def truncate(path):
    data = path.read_bytes()
    replace_file(path, data[:len(data) // 2])


def edit_manifest(ckpt, **changes):
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest.update(changes)
    replace_file(ckpt / "MANIFEST.json", json.dumps(manifest).encode())


def edit_weights(ws, edit):
    folder = ws.root / "other"
    shutil.copytree(ws.root / "stage", folder)
    blob = torch.load(folder / "weights.pt", weights_only=False)
    edit(blob)
    (folder / "weights.pt").unlink()
    torch.save(blob, folder / "weights.pt")
    ws.paths["resume"] = folder


def write_recipe(ws, text):
    ws.paths["recipe"] = ws.root / "recipe.yaml"
    ws.paths["recipe"].write_text(text)


def edit_submission(ws, edit):
    path = ws.root / "bad.csv"
    edit(pd.read_csv(ws.root / "submission.csv")).to_csv(path, index=False)
    ws.paths["submission"] = path


def raw_submission(ws, data):
    ws.paths["submission"] = ws.root / "bad.csv"
    ws.paths["submission"].write_bytes(data)


def under_a_file(ws):
    (ws.root / "a-file").write_text("not a folder")
    ws.paths["out"] = ws.root / "a-file" / "out"


INPUTS = {
    # data folder
    "missing data folder": lambda ws: setattr(ws, "data", ws.root / "no-such-folder"),
    "missing PNG": lambda ws: (ws.data / TRAIN_PNG).unlink(),
    "zero-byte PNG": lambda ws: replace_file(ws.data / TRAIN_PNG, b""),
    "PNG that is not a PNG": lambda ws: replace_file(ws.data / TRAIN_PNG, b"GIF89a" + bytes(90)),
    "PNG with a damaged body": damage_body,
    "PNG of the wrong size": lambda ws: write_png(ws.data / TRAIN_PNG, np.zeros((20, 20), np.uint8)),
    "PNG of the wrong depth": lambda ws: write_png(ws.data / TRAIN_PNG, np.zeros((16, 16), np.uint16)),
    "RGB PNG": lambda ws: write_png(ws.data / TRAIN_PNG, np.zeros((16, 16, 3), np.uint8)),
    "CSV missing a column": lambda ws: edit_csv(ws, "test.csv", lambda f: f.drop(columns="plate")),
    "CSV with an extra column": lambda ws: edit_csv(ws, "train.csv", lambda f: f.assign(x=1)),
    "CSV with a duplicated id": lambda ws: edit_csv(ws, "train.csv",
                                                    lambda f: pd.concat([f, f.iloc[:1]])),
    "malformed experiment name": lambda ws: edit_csv(ws, "train_controls.csv",
                                                     lambda f: first_row(f, "experiment", "FOO")),
    "unknown experiment": lambda ws: edit_csv(ws, "train.csv", lambda f: first_row(
        first_row(f, "experiment", "HUVEC-09"), "id_code", "HUVEC-09_" + f["id_code"][0].split("_", 1)[1])),
    "siRNA out of range": lambda ws: edit_csv(ws, "train.csv", lambda f: first_row(f, "sirna", 5000)),
    "test ids differ from sample_submission": lambda ws: edit_csv(
        ws, "sample_submission.csv", lambda f: f.iloc[1:]),
    # checkpoints and weights
    "truncated checkpoint": lambda ws: checkpoint_copy(ws, lambda c, f: truncate(c / "state.pt")),
    "tampered checkpoint": lambda ws: checkpoint_copy(ws, lambda c, f: replace_file(
        c / "state.pt", bytes(b ^ 1 for b in (c / "state.pt").read_bytes()))),
    "checkpoint of another recipe, same name": lambda ws: ws.paths.update(
        resume=ws.root / "stage", sets=["optim.lr=0.01"]),
    "checkpoint of another recipe, other name": lambda ws: checkpoint_copy(
        ws, lambda c, f: edit_manifest(c, recipe_hash="0123456789abcdef", info={
            **json.loads((c / "MANIFEST.json").read_text())["info"], "name": "other",
            "recipe": {**json.loads((c / "MANIFEST.json").read_text())["info"]["recipe"],
                       "name": "other"}})),
    "checkpoint from a newer rcic": lambda ws: checkpoint_copy(
        ws, lambda c, f: edit_manifest(c, package_version="99.0.0")),
    "truncated weights.pt": lambda ws: checkpoint_copy(ws, lambda c, f: truncate(f / "weights.pt")),
    "zero-byte weights.pt": lambda ws: checkpoint_copy(
        ws, lambda c, f: replace_file(f / "weights.pt", b"")),
    "weights.pt that is not a torch file": lambda ws: checkpoint_copy(
        ws, lambda c, f: replace_file(f / "weights.pt", b"id_code,sirna\n")),
    "weights of another data set": lambda ws: edit_weights(
        ws, lambda b: b["meta"].update(n_treatments=12)),
    "weights from a newer rcic (unknown recipe field)": lambda ws: edit_weights(
        ws, lambda b: b["recipe"]["model"].update(new_knob=1)),
    "weights from a newer rcic (other tensors)": lambda ws: edit_weights(
        ws, lambda b: b["model"].update(extra_tensor=torch.zeros(3))),
    # budgets and recipes
    "malformed budget": lambda ws: ws.paths.update(budget="8x"),
    "bare-number budget": lambda ws: ws.paths.update(budget="3600"),
    "recipe that is not YAML": lambda ws: write_recipe(ws, "data: [1, 2\n"),
    "recipe that is not a mapping": lambda ws: write_recipe(ws, "- a\n- b\n"),
    "recipe field of the wrong type": lambda ws: write_recipe(ws, "data:\n  image_size: big\n"),
    "unknown recipe field": lambda ws: write_recipe(ws, "optim:\n  lr_max: 0.1\n"),
    "negative epochs": lambda ws: write_recipe(ws, "train:\n  epochs: -3\n"),
    "zero batch size": lambda ws: write_recipe(ws, "data:\n  batch_size: 0\n"),
    "unknown backbone": lambda ws: write_recipe(ws, "model:\n  backbone: nosuchnet\n"),
    "unknown validation experiment": lambda ws: write_recipe(
        ws, "data:\n  val_experiments: [HUVEC-99]\n"),
    # submissions
    "submission missing an id": lambda ws: edit_submission(ws, lambda f: f.iloc[1:]),
    "submission with a duplicate id": lambda ws: edit_submission(
        ws, lambda f: pd.concat([f, f.iloc[:1]])),
    "submission with a non-integer class": lambda ws: edit_submission(
        ws, lambda f: first_row(f, "sirna", "3.5")),
    "submission with a class out of range": lambda ws: edit_submission(
        ws, lambda f: first_row(f, "sirna", 1108)),
    "submission with a wrong header": lambda ws: edit_submission(
        ws, lambda f: f.rename(columns={"sirna": "siRNA"})),
    "empty submission": lambda ws: raw_submission(ws, b""),
    "binary submission": lambda ws: raw_submission(ws, b"\x89PNG\r\n\x1a\n\x00\xff"),
    # outputs
    "output under a file": under_a_file,
    "output folder not empty": lambda ws: ws.paths.update(out=ws.root / "stage"),
    "output is a folder": lambda ws: ws.paths.update(out=ws.root / "stage"),
    "output holds another cache": lambda ws: ws.paths.update(out=ws.root / "cache", size="8"),
    "truncated stage.json": lambda ws: (replace_file(ws.root / "stage" / "stage.json", b'{"done": fa'),
                                        ws.paths.update(from_stage=True)),
}


# ------------------------------------------------------------------ how each script is called

def argv_for(script, ws, recipe_needed=False):
    p = ws.paths
    recipe = ["--config", str(p["recipe"])] if "recipe" in p else []
    if script == "rcic-synth":
        return ["--out", str(p.get("out", ws.root / "synth")), "--classes", "8", "--size", "16",
                "--cell-types", "HUVEC", "--experiments", "1"]
    if script == "rcic-cache":
        return ["--data", str(ws.data), "--out", str(p.get("out", ws.root / "cache")),
                "--size", p.get("size", "16"), "--workers", "1"]
    if script == "rcic-stage":
        resume = [str(p["resume"])] if "resume" in p else []
        out = p.get("out", ws.root / ("new-stage" if resume or recipe else "stage"))
        return stage_argv(ws.data, out, "--resume-from", *resume, *recipe,
                          budget=p.get("budget", "10h"), recipe=TINY, sets=p.get("sets", []))
    if script == "rcic-predict":
        return ["--data", str(ws.data), "--checkpoint", str(p.get("resume", ws.root / "stage")),
                "--out", str(p.get("out", ws.root / "submission.csv")), "--tta", "1"]
    if script == "rcic-submission":
        return ["check", str(p.get("submission", ws.root / "submission.csv")),
                "--data", str(ws.data)]
    if script == "rcic-chain init":
        return ["init", "--owner", "someone", "--prefix", "rcic-test", "--stages", "2",
                "--config", str(p.get("recipe", ws.root / "stage" / "recipe.yaml")),
                "--budget", p.get("budget", "8h"), "--out", str(p.get("out", ws.root / "chain"))]
    if script == "rcic-chain plan":
        source = (["--from-stage-json", str(ws.root / "stage" / "stage.json")]
                  if "from_stage" in p else ["--samples-per-second", "10"])
        return ["plan", *source, "--data", str(ws.data), "--budget", p.get("budget", "8h"),
                *recipe]
    if script == "rcic-chain local":
        return ["local", "--stages", "1", "--budget", p.get("budget", "2m"), "--data",
                str(ws.data), "--out", str(p.get("out", ws.root / "chain")), *recipe]
    raise AssertionError(script)


# ------------------------------------------------------------------ the table

ERR = "error"          # exit 2, one line holding every needle
LATE = "late error"    # found only while working: exit 2, the error last, after log lines
OK = "ok"              # exit 0 on purpose; every needle in the stderr lines (if any)
DATA_FIX = "Restore the missing or broken images"
VERIFY_FIX = "run `rcic-data verify --data"


# (input, script, outcome, needles[, marks])
CASES = [
    # -- data folder x every command that reads one
    *[(inp, s, ERR, ["data folder", "does not exist", "--data"])
      for inp in ["missing data folder"]
      for s in ["rcic-cache", "rcic-stage", "rcic-predict", "rcic-chain plan"]],
    ("missing data folder", "rcic-submission", ERR, ["test.csv", "pass --data"]),
    *[(inp, s, ERR, [needle, TRAIN_PNG, DATA_FIX, VERIFY_FIX])
      for inp, needle in [("missing PNG", "is missing"), ("zero-byte PNG", "empty (0 bytes)"),
                          ("PNG that is not a PNG", "not a PNG"),
                          ("PNG of the wrong depth", "bit depth 16"),
                          ("RGB PNG", "colour type 2"), ("PNG of the wrong size", "20x20")]
      for s in ["rcic-cache", "rcic-stage", "rcic-predict"]],
    *[(inp, "rcic-chain plan", OK, []) for inp in ["missing PNG", "PNG of the wrong size"]],
    *[("PNG with a damaged body", s, LATE, ["cannot decode image", png, "truncated",
                                            "run `rcic-data verify --data"])
      for s, png in [("rcic-cache", "restore it"), ("rcic-predict", TEST_PNG), ("rcic-stage", TRAIN_PNG)]],
    ("recipe that is not YAML", "rcic-chain local", ERR, ["is not valid YAML"]),
    *[(inp, s, ERR, needles)
      for inp, needles in [
          ("CSV missing a column", ["test.csv lacks column(s) plate"]),
          ("CSV with an extra column", ["train.csv has unexpected column(s) x"]),
          ("CSV with a duplicated id", ["duplicated id_code", "HUVEC-01_1_G02"]),
          ("malformed experiment name", ["unknown experiment name(s) FOO"]),
          ("unknown experiment", ["train/HUVEC-09/Plate1", "is missing"]),
          ("siRNA out of range", ["siRNA 5000", "outside 0..1107"])]
      for s in ["rcic-cache", "rcic-stage", "rcic-predict", "rcic-chain plan"]
      if not (inp == "unknown experiment" and s == "rcic-chain plan")],
    ("unknown experiment", "rcic-chain plan", OK, []),
    # rcic-submission reads only the id_code columns of test.csv and sample_submission.csv.
    ("CSV missing a column", "rcic-submission", OK, []),
    ("test ids differ from sample_submission", "rcic-submission", ERR,
     ["test.csv and sample_submission.csv list different id_codes"]),
    ("missing data folder", "rcic-chain local", ERR, ["data folder", "does not exist"]),
    # -- checkpoints: rcic-stage resumes from them, rcic-predict reads their weights.pt
    ("truncated checkpoint", "rcic-stage", OK, ["skipping checkpoint", "truncated?"]),
    ("tampered checkpoint", "rcic-stage", OK, ["skipping checkpoint", "sha256"]),
    ("checkpoint of another recipe, same name", "rcic-stage", ERR,
     ["other training fields (optim.lr)", "resume with the same recipe"]),
    ("checkpoint of another recipe, other name", "rcic-stage", OK, []),
    ("checkpoint from a newer rcic", "rcic-stage", ERR,
     ["written by rcic 99.0.0", "upgrade rcic"]),
    ("checkpoint from a newer rcic", "rcic-predict", OK, []),
    ("truncated weights.pt", "rcic-predict", ERR, ["cannot be read", "truncated"]),
    ("zero-byte weights.pt", "rcic-predict", ERR, ["cannot be read", "truncated"]),
    ("weights.pt that is not a torch file", "rcic-predict", ERR, ["cannot be read"]),
    ("weights of another data set", "rcic-predict", ERR, ["12 treatment classes", "has 8"]),
    ("weights from a newer rcic (unknown recipe field)", "rcic-predict", ERR,
     ["unknown recipe field model.new_knob"]),
    ("weights from a newer rcic (other tensors)", "rcic-predict", ERR, ["weights.pt"]),
    ("truncated weights.pt", "rcic-stage", OK, []),
    # -- budgets and recipes
    *[(inp, s, ERR, ["budget", "is not a duration"])
      for inp in ["malformed budget", "bare-number budget"]
      for s in ["rcic-stage", "rcic-chain init", "rcic-chain plan", "rcic-chain local"]],
    *[(inp, s, ERR, needles)
      for inp, needles in [("recipe that is not YAML", ["is not valid YAML"]),
                           ("recipe that is not a mapping", ["must hold a mapping"]),
                           ("recipe field of the wrong type", ["data.image_size", "'big'"]),
                           ("unknown recipe field", ["unknown recipe field optim.lr_max"]),
                           ("negative epochs", ["train.epochs", "-3"]),
                           ("zero batch size", ["data.batch_size", "0"])]
      for s in ["rcic-stage", "rcic-chain init", "rcic-chain plan"]],
    ("unknown backbone", "rcic-stage", ERR, ["unknown backbone 'nosuchnet'"]),
    ("unknown backbone", "rcic-chain init", ERR, ["nosuchnet"]),
    ("unknown validation experiment", "rcic-stage", ERR,
     ["validation experiment(s) HUVEC-99", "choose from"]),
    ("truncated stage.json", "rcic-chain plan", ERR, ["stage.json"]),
    # -- submissions
    *[(inp, "rcic-submission", ERR, needles)
      for inp, needles in [("submission missing an id", ["1 test id(s) are missing"]),
                           ("submission with a duplicate id", ["appears more than once"]),
                           ("submission with a non-integer class", ["'3.5'", "not an integer"]),
                           ("submission with a class out of range", ["1108", "outside 0..1107"]),
                           ("submission with a wrong header", ["must be exactly id_code,sirna"]),
                           ("empty submission", ["is empty"]),
                           ("binary submission", ["is not a CSV file"])]],
    # -- outputs
    ("output under a file", "rcic-synth", ERR, ["a-file", "writable --out"]),
    ("output folder not empty", "rcic-synth", ERR, ["not empty", "choose a new --out"]),
    ("output under a file", "rcic-cache", ERR, ["a-file", "writable --out"]),
    ("output holds another cache", "rcic-cache", ERR, ["16 px raw; asked: 8 px", "nothing was changed"]),
    ("output under a file", "rcic-stage", ERR, ["a-file", "not writable", "writable --out"]),
    ("output under a file", "rcic-predict", ERR, ["a-file", "--out"]),
    ("output is a folder", "rcic-predict", ERR, ["is a folder", "--out"]),
    ("output under a file", "rcic-chain init", ERR, ["a-file", "--out"]),
    ("output under a file", "rcic-chain local", ERR, ["a-file", "--out"]),
]


def case_id(case):
    return f"{case[1]}: {case[0]}"


def params():
    for case in CASES:
        marks = case[4:] if len(case) > 4 else ()
        yield pytest.param(*case[:4], marks=marks, id=case_id(case))


def unchanged(before, after):
    """Files that existed before: byte-identical, except that a log may grow at its end."""
    changed = [name for name, data in before.items()
               if not (after.get(name) == data
                       or (name.endswith("stage.log") and after.get(name, b"").startswith(data)))]
    return changed


@pytest.mark.parametrize("inp, script, outcome, needles", list(params()))
def test_bad_input(world, tiny_data, tmp_path, inp, script, outcome, needles):
    ws = make_workspace(world, tiny_data, tmp_path)
    INPUTS[inp](ws)
    before = snapshot(tmp_path)
    program = script.split()[0]
    status, err = call(program, argv_for(script, ws))
    lines = error_lines(err)
    if outcome in (ERR, LATE):
        assert status == 2, f"exit {status}: {err[-3000:]}"
        assert lines and lines[-1].startswith(f"{program}: error: "), lines
        # LATE: the log of the work done before the problem showed ("rcic: ..." lines) may come
        # first; the error itself is still one line.
        assert len(lines) == 1 or (outcome == LATE and all(
            line.startswith("rcic: ") for line in lines[:-1])), lines
    else:
        assert status == 0, f"exit {status}: {err[-3000:]}"
        assert len(lines) <= 1, lines
    for needle in needles:
        assert needle in (lines[-1] if lines else ""), (needle, lines)
    assert unchanged(before, snapshot(tmp_path)) == []


def test_the_table_covers_every_script_and_input():
    scripts = {case[1].split()[0] for case in CASES}
    assert scripts == set(MAINS)
    assert {case[0] for case in CASES} == set(INPUTS)


def test_stage_keeps_its_steps_when_an_image_turns_out_broken(world, tiny_data, tmp_path):
    ws = make_workspace(world, tiny_data, tmp_path)
    damage_body(ws)
    status, err = call("rcic-stage", argv_for("rcic-stage", ws))
    assert status == 2
    assert on_its_own_line(err, "rcic-stage: error: cannot decode image"), err[-500:]
    assert [ref.step for ref in find_checkpoints([ws["out"]])], "no steps saved"


# ------------------------------------------------------------------ as installed

INSTALLED = [
    ("rcic-synth", lambda ws: ["--out", str(ws.root / "a-file" / "x")], "a-file"),
    ("rcic-cache", lambda ws: ["--data", str(ws.root / "nope"), "--out", str(ws.root / "c"),
                               "--size", "16"], "does not exist"),
    ("rcic-stage", lambda ws: ["--data", str(ws.data), "--budget", "8x"], "not a duration"),
    ("rcic-predict", lambda ws: ["--data", str(ws.root / "nope"), "--out", "s.csv"],
     "does not exist"),
    ("rcic-submission", lambda ws: ["check", str(ws.root / "a-file"), "--data", str(ws.data)],
     "id_code,sirna"),
    ("rcic-chain", lambda ws: ["plan", "--samples-per-second", "1", "--budget", "0s"],
     "not a duration"),
    ("rcic-data", lambda ws: ["verify", "--data", str(ws.root / "nope")], "does not exist"),
]


@pytest.mark.parametrize("script, argv, needle", INSTALLED, ids=[c[0] for c in INSTALLED])
def test_console_scripts_as_installed(tiny_data, tmp_path, script, argv, needle):
    ws = Workspace(tmp_path, tiny_data)
    (tmp_path / "a-file").write_text("not a folder\n")
    result = subprocess.run([script, *argv(ws)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), lines
    assert needle in lines[0], lines
