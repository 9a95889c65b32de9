"""Write submission.csv and check it the way Kaggle will, before anyone spends a submission.

A bad file is an error, not a warning: the message names the file, the first problem found
and the fix, in one line.
"""
import re
from pathlib import Path

import pandas as pd

from rcic.atomic import write_atomic
from rcic.data.layout import N_TREATMENTS
from rcic.errors import UserError

COLUMNS = ["id_code", "sirna"]
INTEGER = re.compile(r"^[+-]?\d+$")


def check_output_path(path):
    """Refuse a submission path that can never be written, before any work is spent on it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: name the CSV file to write, e.g. "
                        f"{path / 'submission.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder of --out {path} ({err.strerror or err}): "
                        f"choose a writable --out") from None
    return path


def write_submission(path, id_codes, sirnas):
    """Write id_code,sirna atomically: a crash never leaves half a file where the last was."""
    path = check_output_path(path)
    text = pd.DataFrame({"id_code": list(id_codes), "sirna": [int(s) for s in sirnas]}).to_csv(
        index=False)
    try:
        write_atomic(path, text)
    except OSError as err:
        raise UserError(f"cannot write the submission {path} ({err.strerror or err}): free disk "
                        f"space or choose a writable --out; a file that was there is intact") from None
    return path


def expected_ids(data_root):
    """The id_codes Kaggle scores: those of sample_submission.csv, which must match test.csv."""
    root = Path(data_root)
    ids = {}
    for name in ("test.csv", "sample_submission.csv"):
        try:
            ids[name] = pd.read_csv(root / name, usecols=["id_code"], dtype=str)["id_code"]
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the id_code column of {root / name} "
                            f"({str(err).splitlines()[0]}): pass --data with the competition "
                            f"folder that holds test.csv and sample_submission.csv")
    if set(ids["test.csv"]) != set(ids["sample_submission.csv"]):
        raise UserError(f"{root}: test.csv and sample_submission.csv list different id_codes: "
                        f"restore both files from the same competition download")
    return set(ids["sample_submission.csv"])


def check_submission(path, data_root):
    """Raise UserError at the first problem of a submission file; return its row count."""
    path = Path(path)

    def fail(problem, fix):
        return UserError(f"submission {path}: {problem}: {fix}")

    if not path.is_file():
        raise fail("does not exist", "write it with rcic-predict or pass the right path")
    expected = expected_ids(data_root)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise fail("is empty", "write it again with rcic-predict")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise fail(f"is not a CSV file ({str(err).splitlines()[0]})",
                   "write a comma-separated text file with header id_code,sirna")
    if list(df.columns) != COLUMNS:
        shown = ",".join(map(str, df.columns))[:80]
        raise fail(f"has columns {shown!r}", "the header must be exactly id_code,sirna")
    if df.empty:
        raise fail("has a header but no rows", f"write one row per test id ({len(expected)})")
    blank = df[(df["id_code"].str.strip() == "") | (df["sirna"].str.strip() == "")]
    if len(blank):
        raise fail(f"row {blank.index[0] + 2} has an empty value",
                   "every row needs an id_code and a sirna")
    bad = df[~df["sirna"].str.strip().map(lambda s: bool(INTEGER.match(s)))]
    if len(bad):
        raise fail(f"sirna {bad['sirna'].iloc[0]!r} of {bad['id_code'].iloc[0]} is not an integer",
                   "write whole class numbers such as 17")
    sirna = df["sirna"].astype(int)
    out = df[(sirna < 0) | (sirna >= N_TREATMENTS)]
    if len(out):
        raise fail(f"sirna {out['sirna'].iloc[0]} of {out['id_code'].iloc[0]} is outside "
                   f"0..{N_TREATMENTS - 1}", "only treatment siRNAs are scored; never write "
                   "control classes")
    dup = df[df["id_code"].duplicated()]
    if len(dup):
        raise fail(f"id_code {dup['id_code'].iloc[0]} appears more than once "
                   f"({len(dup)} duplicate row(s))", "keep exactly one row per test id")
    extra = [i for i in df["id_code"] if i not in expected]
    if extra:
        raise fail(f"id_code {extra[0]} is not a test id ({len(extra)} such row(s))",
                   "predict the test wells of this data folder only")
    missing = sorted(expected - set(df["id_code"]))
    if missing:
        raise fail(f"{len(missing)} test id(s) are missing, e.g. {missing[0]}",
                   "write one row for every id_code of sample_submission.csv")
    return len(df)
