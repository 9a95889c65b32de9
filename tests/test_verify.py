"""rcic-data verify / manifest: every damaged file of a copy named in one run, and no line of
OpenCV's own (or libpng's) on the console from verify, a stage or a prediction.

The copies are made from the tiny session data: PNGs replaced (never written through: the
copies are hard links), each damaged in one known way.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from faults.harness import error_lines
from rcic.cli import data as data_cli
from rcic.data.layout import RxRx1

PLATE = "train/HUVEC-01/Plate1"
TRUNCATED, EMPTY, GARBAGE, CHANGED = (f"{PLATE}/G02_s1_w{c}.png" for c in (1, 2, 3, 4))
DEEP, ODD_SIZE, MISSING = (f"{PLATE}/G02_s2_w{c}.png" for c in (1, 2, 3))
TEST_GARBAGE = "test/HUVEC-03/Plate1/H02_s1_w1.png"     # a test treatment well: predicted
# What OpenCV and libpng print themselves, e.g. "[ WARN:0@1.778] global grfmt_png.cpp:855 ..."
FOREIGN = ("[ WARN", "[ERROR", "grfmt_png", "libpng")


def replace(root, rel, data):
    path = root / rel
    path.unlink()                      # a new file: never write through to a shared inode
    path.write_bytes(data)


def truncate(root, rel):
    data = (root / rel).read_bytes()
    replace(root, rel, data[:len(data) // 2])


def garbage(root, rel):
    """Signature and header intact (it passes the check at open), then noise: what reaches
    OpenCV in a stage, and made it print '... read_chunk user chunk data is too large'."""
    data = (root / rel).read_bytes()
    replace(root, rel, data[:33] + np.random.default_rng(0).bytes(len(data) - 33))


def change_a_pixel(root, rel):
    img = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
    img[3, 3] ^= 1
    replace(root, rel, cv2.imencode(".png", img)[1].tobytes())


def write_png(root, rel, array):
    replace(root, rel, cv2.imencode(".png", array)[1].tobytes())


def copy_of(tiny_data, folder):
    shutil.copytree(tiny_data, folder, copy_function=os.link)
    return folder


@pytest.fixture(scope="module")
def manifest(tiny_data, tmp_path_factory):
    """The manifest of the original (the data as Kaggle has it)."""
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    assert data_cli.main(["manifest", "--data", str(tiny_data), "--out", str(path),
                          "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def four(tiny_data, tmp_path_factory):
    """The issue's copy: a truncated, an empty, a garbage and a changed-pixel PNG."""
    root = copy_of(tiny_data, tmp_path_factory.mktemp("four") / "data")
    truncate(root, TRUNCATED)
    replace(root, EMPTY, b"")
    garbage(root, GARBAGE)
    change_a_pixel(root, CHANGED)
    return root


@pytest.fixture(scope="module")
def seven(four, tmp_path_factory):
    """Every kind: the four, and a 16-bit, an odd-sized and a missing PNG."""
    root = copy_of(four, tmp_path_factory.mktemp("seven") / "data")
    write_png(root, DEEP, np.zeros((16, 16), np.uint16))
    write_png(root, ODD_SIZE, np.zeros((20, 20), np.uint8))
    (root / MISSING).unlink()
    return root


SEVEN = {TRUNCATED: "truncated", EMPTY: "empty", GARBAGE: "undecodable", DEEP: "wrong depth",
         ODD_SIZE: "wrong size", MISSING: "missing"}


def run_verify(capfd, tmp_path, *argv):
    """(exit status, stdout, stderr, report rows {file: problem}) of `rcic-data verify`."""
    capfd.readouterr()
    report = tmp_path / "report.csv"
    status = data_cli.main(["verify", *argv, "--report", str(report)])
    out, err = capfd.readouterr()
    rows = pd.read_csv(report)
    assert list(rows.columns) == ["file", "problem", "detail"]
    return status, out, err, dict(zip(rows["file"], rows["problem"]))


def table_rows(out):
    """{file: problem} from the printed table."""
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].endswith(".png"):
            rows[parts[0]] = next(k for k in ("wrong depth", "wrong size", "truncated", "empty",
                                              "undecodable", "missing", "differs")
                                  if parts[1].startswith(k))
    return rows


def test_decode_check_names_every_damaged_file_and_its_kind(seven, tmp_path, capfd):
    status, out, err, report = run_verify(capfd, tmp_path, "--data", str(seven))
    assert status == 2
    assert report == SEVEN                           # the changed pixel still decodes: not found
    assert table_rows(out) == SEVEN
    assert "6 damaged file(s)" in error_lines(err)[-1]
    assert "by problem: 1 truncated, 1 empty, 1 undecodable" in out


def test_manifest_check_also_finds_the_changed_pixel(seven, manifest, tmp_path, capfd):
    status, out, err, report = run_verify(capfd, tmp_path, "--data", str(seven),
                                          "--manifest", str(manifest))
    assert status == 2
    assert report == {**SEVEN, CHANGED: "differs"}
    assert table_rows(out) == report
    assert not any(word in err + out for word in FOREIGN), err


def test_untouched_data_is_whole_with_and_without_the_manifest(tiny_data, manifest, tmp_path,
                                                               capfd):
    for argv in (["--data", str(tiny_data)], ["--data", str(tiny_data), "--manifest",
                                              str(manifest)]):
        status, out, err, report = run_verify(capfd, tmp_path, *argv)
        assert (status, report) == (0, {}), err
        assert "is whole" in err


def test_the_manifest_lists_every_file_of_the_folder(tiny_data, manifest):
    rows = pd.read_csv(manifest)
    data = RxRx1(tiny_data)
    expected = [f"{folder}/{name}" for folder, names in data.expected_files().items()
                for name in names]
    assert rows["file"].tolist()[-len(expected):] == expected
    assert {"train.csv", "test.csv"} <= set(rows["file"])
    png = rows[rows["file"] == TRUNCATED].iloc[0]
    assert png["bytes"] == (tiny_data / TRUNCATED).stat().st_size
    assert (png["height"], png["width"]) == (16, 16)


def test_a_manifest_of_a_damaged_folder_is_refused(seven, tmp_path, capfd):
    out = tmp_path / "m.csv"
    status = data_cli.main(["manifest", "--data", str(seven), "--out", str(out), "--quiet"])
    printed, err = capfd.readouterr()
    assert status == 2 and not out.exists()
    assert table_rows(printed) == SEVEN
    assert "none was written" in err


def test_a_changed_csv_and_a_foreign_manifest(four, manifest, tmp_path, capfd):
    copy = copy_of(four, tmp_path / "copy")
    replace(copy, "test_controls.csv", (copy / "test_controls.csv").read_bytes() + b"\n")
    status, _, _, report = run_verify(capfd, tmp_path, "--data", str(copy), "--manifest",
                                      str(manifest))
    assert status == 2 and report["test_controls.csv"] == "differs"
    rows = pd.read_csv(manifest)
    shorter = tmp_path / "shorter.csv"
    rows[rows["file"] != DEEP].to_csv(shorter, index=False)
    status, _, _, report = run_verify(capfd, tmp_path, "--data", str(copy), "--manifest",
                                      str(shorter))
    assert status == 2 and report[DEEP] == "not in manifest"
    foreign = tmp_path / "foreign.csv"
    rows.assign(file="x/" + rows["file"]).to_csv(foreign, index=False)
    status, _, err, _ = run_verify(capfd, tmp_path, "--data", str(copy), "--manifest",
                                   str(foreign))
    assert status == 2 and "lists none of the images" in err


def test_bad_manifests_and_reports_are_one_line(four, tmp_path, capfd):
    (tmp_path / "cols.csv").write_text("file,size\nx,1\n")
    for argv, needle in [
            (["--manifest", str(tmp_path / "none.csv")], "does not exist"),
            (["--manifest", str(tmp_path / "cols.csv")], "has columns file,size"),
            (["--report", str(tmp_path / "no" / "r.csv")], "folder of --report")]:
        capfd.readouterr()
        assert data_cli.main(["verify", "--data", str(four), "--quiet", *argv]) == 2
        lines = error_lines(capfd.readouterr().err)
        assert len(lines) == 1 and needle in lines[0], lines


def quiet_run(cmd, cwd):
    """Run a console script as a real process: (exit status, stdout, stderr), after checking
    that nothing OpenCV or libpng print themselves reached its stderr."""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "RCIC_LOG_INTERVAL": "0"})
    foreign = [line for line in (result.stderr + result.stdout).splitlines()
               if any(word in line for word in FOREIGN)]
    assert not foreign, foreign
    return result.returncode, result.stdout, result.stderr


def test_rcic_data_as_installed_names_the_issues_four(four, manifest, tmp_path):
    status, out, err = quiet_run(["rcic-data", "verify", "--data", str(four), "--manifest",
                                  str(manifest)], tmp_path)
    assert status == 2
    assert table_rows(out) == {TRUNCATED: "truncated", EMPTY: "empty",
                               GARBAGE: "undecodable", CHANGED: "differs"}
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("rcic-data: error: 4 damaged file(s)"), lines
    assert "rcic-data verify: file " in err              # progress: plain lines, not a bar
    report = pd.read_csv(tmp_path / data_cli.DEFAULT_REPORT)
    assert set(report["file"]) == set(table_rows(out))
    status, out, err = quiet_run(["rcic-data", "verify", "--data", str(four)], tmp_path)
    assert status == 2
    assert set(table_rows(out)) == {TRUNCATED, EMPTY, GARBAGE}


TINY_RECIPE = ["data.image_size=16", "data.batch_size=4", "train.epochs=1",
               "data.num_workers=0"]


def test_a_stage_and_a_prediction_meet_a_damaged_image_in_one_line(tiny_data, tmp_path):
    """Damage that passes the check at open (the header is whole) reaches the decoder while
    training and predicting: one line naming the file and rcic-data verify, nothing of
    OpenCV's or libpng's own."""
    stage = tmp_path / "stage"
    status, _, err = quiet_run(["rcic-stage", "--data", str(tiny_data), "--out", str(stage),
                                "--budget", "10h", "--quiet", "--steps", "1", "--set",
                                *TINY_RECIPE], tmp_path)
    assert status == 0, err[-2000:]
    copy = copy_of(tiny_data, tmp_path / "copy")
    garbage(copy, TRUNCATED)                          # a training image (HUVEC-01 is not held out)
    garbage(copy, TEST_GARBAGE)
    for cmd, named in [
            (["rcic-stage", "--data", str(copy), "--out", str(tmp_path / "again"), "--budget",
              "10h", "--quiet", "--steps", "8", "--set", *TINY_RECIPE], TRUNCATED),
            (["rcic-predict", "--data", str(copy), "--checkpoint", str(stage), "--out",
              str(tmp_path / "submission.csv"), "--tta", "1"], TEST_GARBAGE)]:
        status, _, err = quiet_run(cmd, tmp_path)
        assert status == 2
        last = error_lines(err)[-1]
        assert f"cannot decode image {copy / named} (undecodable" in last, last
        assert f"run `rcic-data verify --data {copy}` to find every damaged file" in last


@pytest.mark.skipif(not hasattr(cv2.utils, "logging"),
                    reason="OpenCV 4.9 lets libpng print its own errors, which no OpenCV "
                           "setting silences: rcic's chunk check keeps damaged files from it")
def test_opencv_prints_nothing_once_rcic_has_imported_it(tmp_path):
    """The setting alone, with no check of rcic's before it: OpenCV decoding the garbage file
    itself would print '[ WARN:0@...] global grfmt_png.cpp:... read_chunk ...'."""
    png = tmp_path / "g.png"
    cv2.imwrite(str(png), np.zeros((16, 16), np.uint8))
    garbage(tmp_path, "g.png")
    decode = ("import sys, cv2, numpy as np; {}"
              "print(cv2.imdecode(np.fromfile(sys.argv[1], np.uint8), cv2.IMREAD_UNCHANGED))")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"}
    loud, quiet = (subprocess.run([sys.executable, "-c", decode.format(first), str(png)],
                                  capture_output=True, text=True, env=env)
                   for first in ("", "import rcic.data.images; "))
    assert loud.stdout.strip() == quiet.stdout.strip() == "None"
    assert "grfmt_png" in loud.stderr                 # what the setting is for
    assert quiet.stderr == "", quiet.stderr


def readme_block(after, language):
    """The first ```language block of README.md after the line `after`."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_manifest_kernel_writes_the_manifest(tiny_data, manifest, tmp_path):
    """The README's one-off Kaggle kernel, run as Kaggle would (its inputs under an input
    folder, rcic already installed): it writes the same manifest as rcic-data manifest."""
    heading = "## Checking a copy of the data"
    script = tmp_path / "manifest_kernel.py"
    script.write_text(readme_block(heading, "python"))
    metadata = json.loads(readme_block(heading, "json"))
    assert metadata["code_file"] == script.name and metadata["enable_internet"] is False
    competition = tmp_path / "input" / "competitions" / metadata["competition_sources"][0]
    shutil.copytree(tiny_data, competition, copy_function=os.link)
    (tmp_path / "working").mkdir()
    env = {**os.environ, "RCIC_SKIP_INSTALL": "1", "RCIC_KAGGLE_INPUT": str(tmp_path / "input"),
           "RCIC_KAGGLE_WORKING": str(tmp_path / "working")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "working" / "rxrx1-manifest.csv").read_bytes() == manifest.read_bytes()
