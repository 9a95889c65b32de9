import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rcic.errors import UserError
from rcic.submission import check_submission, write_submission

CLI = str(Path(sys.executable).with_name("rcic-submission"))


@pytest.fixture
def data(tiny_data):
    return tiny_data


@pytest.fixture
def good(data, tmp_path):
    ids = pd.read_csv(data / "test.csv")["id_code"]
    return write_submission(tmp_path / "sub" / "submission.csv", ids, range(len(ids)))


def rewrite(path, edit):
    """Apply `edit` to the lines of a good file (header first)."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def test_a_written_submission_passes(data, good):
    ids = pd.read_csv(data / "test.csv")["id_code"]
    assert check_submission(good, data) == len(ids)
    assert good.read_text().splitlines()[0] == "id_code,sirna"
    assert not list(good.parent.glob(".*tmp"))      # the temporary file was renamed away


BROKEN = {
    "missing id": (lambda l: l[:-1], "1 test id\\(s\\) are missing"),
    "duplicate id": (lambda l: l + [l[1]], "appears more than once"),
    "extra id": (lambda l: l + ["HUVEC-09_1_B02,3"], "HUVEC-09_1_B02 is not a test id"),
    "non-integer": (lambda l: [l[0], l[1].split(",")[0] + ",3.5"] + l[2:], "'3.5' .* not an integer"),
    "word": (lambda l: [l[0], l[1].split(",")[0] + ",abc"] + l[2:], "not an integer"),
    "NaN": (lambda l: [l[0], l[1].split(",")[0] + ",NaN"] + l[2:], "not an integer"),
    "empty value": (lambda l: [l[0], l[1].split(",")[0] + ","] + l[2:], "empty value"),
    "control class": (lambda l: [l[0], l[1].split(",")[0] + ",1108"] + l[2:], "outside 0..1107"),
    "negative": (lambda l: [l[0], l[1].split(",")[0] + ",-1"] + l[2:], "outside 0..1107"),
    "wrong columns": (lambda l: ["id_code,siRNA"] + l[1:], "header must be exactly id_code,sirna"),
    "extra column": (lambda l: [x + ",0" for x in l], "has columns 'id_code,sirna,0'"),
    "header only": (lambda l: l[:1], "no rows"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_each_kind_of_broken_file_is_rejected(data, good, kind):
    edit, message = BROKEN[kind]
    with pytest.raises(UserError, match=message) as err:
        check_submission(rewrite(good, edit), data)
    assert str(good) in str(err.value) and "\n" not in str(err.value)


def test_empty_and_binary_files_are_rejected(data, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        check_submission(empty, data)
    png = tmp_path / "image.csv"
    png.write_bytes(next((data / "test").rglob("*.png")).read_bytes())
    with pytest.raises(UserError, match="is not a CSV file"):
        check_submission(png, data)
    with pytest.raises(UserError, match="does not exist"):
        check_submission(tmp_path / "nowhere.csv", data)


def run_cli(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_accepts_a_good_file_and_rejects_broken_ones_in_one_line(data, good, tmp_path):
    ok = run_cli("check", good, "--data", data)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    for kind in ("duplicate id", "control class", "wrong columns"):
        broken = tmp_path / f"{kind.replace(' ', '_')}.csv"
        broken.write_text(good.read_text())
        rewrite(broken, BROKEN[kind][0])
        bad = run_cli("check", broken, "--data", data)
        assert bad.returncode == 2, kind
        assert bad.stderr.startswith(f"rcic-submission: error: submission {broken}:"), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    bad = run_cli("check", empty, "--data", data)
    assert bad.returncode == 2 and "is empty" in bad.stderr


def test_cli_with_a_data_folder_lacking_the_csvs(good, tmp_path):
    bad = run_cli("check", good, "--data", tmp_path)
    assert bad.returncode == 2 and "test.csv" in bad.stderr and "--data" in bad.stderr
