"""Every damaged file of a data folder in one run, and a manifest to check a copy against.

A copy of RxRx1 (750,000 PNGs) moved between clouds can lose or damage files. Training names
one damaged file when it meets it; these checks read every file the CSVs imply, in parallel
threads (reading, CRCs and OpenCV's decoding all release the GIL), and name all of them:

  decode check    (`rcic-data verify --data DIR`) every PNG is walked chunk by chunk and
                  decoded exactly as training decodes it (images.decode_png_bytes): missing,
                  unreadable, empty, truncated, undecodable, wrong depth, and wrong size
                  (another size than most of the folder's images).
  manifest check  (`--manifest M.csv`) every file's byte count and CRC-32 is compared with a
                  manifest made from a good copy, Kaggle's own: this also finds a file that
                  still decodes but differs. Only the files that differ are decoded, to say how.

The manifest (`rcic-data manifest`) is made by the decode check, so it vouches only for files
that decode: a manifest of a damaged folder is refused.

Why CRC-32 (zlib.crc32) for the content hash: it is the checksum PNG itself and rcic's cache
already use; it finds every change of up to 32 consecutive bits and any other accidental
change but once in 2^32, and it runs at memory speed, so the check is as fast as the disk.
It is no defence against a file forged to match, which is not what a copy does.
"""
import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from rcic.atomic import write_atomic
from rcic.data.images import decode_png_bytes, read_png_bytes
from rcic.data.layout import SCHEMAS
from rcic.errors import UserError
from rcic.progress import progress as progress_bar

MANIFEST_COLUMNS = ["file", "bytes", "crc32", "height", "width"]
REPORT_COLUMNS = ["file", "problem", "detail"]
BATCH = 256             # files a thread checks per task: 3,000 tasks for RxRx1, not 750,000
TABLE_ROWS = 100        # rows printed; the report CSV holds them all
FROM_KAGGLE = "restore them from the competition download (or copy them again)"


def data_files(data):
    """The files of an RxRx1 folder, relative to it: its CSVs, then every PNG they imply."""
    csvs = [name for name in SCHEMAS if (data.root / name).is_file()]
    pngs = [f"{folder}/{name}" for folder, names in data.expected_files().items()
            for name in names]
    return csvs, pngs


# -- one file ---------------------------------------------------------------------------------
def inspect(path, decode, expected=None):
    """What one file holds: {problem, detail, bytes, crc32, height, width} (problem None when
    whole).

    decode: decode it as a PNG. expected: its manifest row; a file whose byte count and CRC
    match it is whole without decoding; one that differs is decoded to say how.
    """
    data, problem = read_png_bytes(path)
    if problem is not None:
        return {"problem": problem[0], "detail": problem[1]}
    found = {"problem": None, "detail": "", "bytes": len(data), "crc32": zlib.crc32(data)}
    if expected is not None:
        if (found["bytes"], found["crc32"]) == (expected["bytes"], expected["crc32"]):
            return found                       # the original's bytes: nothing to decode
        return differs(found, data, expected)
    if decode:
        decoded(found, data)
    return found


def decoded(found, data):
    """Decode a PNG's bytes as training does: its problem, or its height and width."""
    img, problem = decode_png_bytes(data)
    if problem is not None:
        found["problem"], found["detail"] = problem
    else:
        found["height"], found["width"] = img.shape


def differs(found, data, expected):
    """A file whose bytes are not the manifest's: how it is broken, else how it differs."""
    png = pd.notna(expected["height"])         # the manifest gives a PNG its size, a CSV none
    if png:
        decoded(found, data)
    if found["problem"] is not None:
        return found
    shape = (found.get("height"), found.get("width"))
    original = (expected["height"], expected["width"])
    if png and shape != original:
        found["problem"] = "wrong size"
        found["detail"] = (f"{shape[1]}x{shape[0]}, the manifest's "
                           f"{original[1]:.0f}x{original[0]:.0f}")
    else:
        found["problem"] = "differs"
        found["detail"] = (f"{'decodes, but ' if png else ''}{found['bytes']} bytes with CRC-32 "
                           f"{found['crc32']:08x}, the manifest's {expected['bytes']} bytes "
                           f"with {expected['crc32']:08x}")
    return found


def inspect_all(root, files, decode, expected, workers, desc, show_progress):
    """[inspect(root / file) for file in files], in `workers` threads, with progress."""
    batches = [files[i:i + BATCH] for i in range(0, len(files), BATCH)]

    def batch(names):
        return [inspect(root / name, decode(name), expected.get(name)) for name in names]

    done = [None] * len(batches)
    pool = ThreadPoolExecutor(workers or os.cpu_count())
    try:
        with progress_bar(len(files), unit="file", desc=desc, disable=not show_progress) as bar:
            jobs = {pool.submit(batch, names): k for k, names in enumerate(batches)}
            for job in as_completed(jobs):
                done[jobs[job]] = job.result()
                bar.update(len(batches[jobs[job]]))
    finally:
        # On Ctrl-C, wait for the batches under way only, not for the thousands queued.
        pool.shutdown(cancel_futures=True)
    return pd.DataFrame([dict(found, file=name) for part, names in zip(done, batches)
                         for found, name in zip(part, names)],
                        columns=["file", "problem", "detail", *MANIFEST_COLUMNS[1:]])


def odd_sizes(found):
    """Mark the decoded images whose size is not the one most images have as 'wrong size'."""
    decoded = found[found["problem"].isna() & found["height"].notna()]
    if decoded.empty:
        return found
    shapes = Counter(zip(decoded["height"], decoded["width"]))
    height, width = shapes.most_common(1)[0][0]
    odd = decoded[(decoded["height"] != height) | (decoded["width"] != width)]
    found.loc[odd.index, "problem"] = "wrong size"
    found.loc[odd.index, "detail"] = [f"{w:.0f}x{h:.0f}, most images {width:.0f}x{height:.0f}"
                                      for h, w in zip(odd["height"], odd["width"])]
    return found


# -- the checks -------------------------------------------------------------------------------
def verify(data, manifest=None, workers=None, progress=True):
    """Every damaged file of `data` (an RxRx1): a frame of file, problem, detail (empty when
    none), in the folder's order. With `manifest` (a path), a file must match its row."""
    csvs, pngs = data_files(data)
    expected = {}
    if manifest is not None:
        rows = read_manifest(manifest)
        if not set(rows["file"]) & set(pngs):
            raise UserError(f"manifest {manifest} lists none of the images of {data.root}: it "
                            f"was made from another data folder; make one of this data's "
                            f"original with rcic-data manifest")
        expected = {row["file"]: row for row in rows.to_dict("records")}
    # The manifest's own files first (also those the copy's CSVs no longer imply), then the
    # files of the copy it does not list: those get the decode check.
    unlisted = [f for f in csvs + pngs if f not in expected]
    to_decode = set(pngs) - set(expected)
    found = inspect_all(data.root, list(expected) + unlisted, to_decode.__contains__, expected,
                        workers, "rcic-data verify", progress)
    unlisted = found["file"].isin(unlisted)
    checked = odd_sizes(found[unlisted].copy())
    found.loc[unlisted, ["problem", "detail"]] = checked[["problem", "detail"]]
    if expected:
        fine = unlisted & found["problem"].isna()
        found.loc[fine, "problem"] = "not in manifest"
        found.loc[fine, "detail"] = "the manifest was made from other data, or the CSVs changed"
    return found.loc[found["problem"].notna(), REPORT_COLUMNS].reset_index(drop=True)


def make_manifest(data, out, workers=None, progress=True):
    """Write the manifest of `data` to `out` (CSV: file, bytes, crc32, height, width) after the
    decode check of every image; refused, writing nothing, when any is damaged. -> problems
    (an empty frame when the manifest was written)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists: choose a new --out or delete it first (nothing was "
                        f"changed)")
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist: create it first")
    csvs, pngs = data_files(data)
    is_png = set(pngs)
    found = odd_sizes(inspect_all(data.root, csvs + pngs, lambda f: f in is_png, {}, workers,
                                  "rcic-data manifest", progress))
    problems = found[found["problem"].notna()]
    if not problems.empty:
        return problems[REPORT_COLUMNS].reset_index(drop=True)
    rows = found.reindex(columns=MANIFEST_COLUMNS)
    rows[["height", "width"]] = rows[["height", "width"]].astype("Int64")
    try:
        write_atomic(out, rows.to_csv(index=False))
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror}): choose a writable --out")
    return problems[REPORT_COLUMNS]


def read_manifest(path):
    """A manifest's rows, checked: file, bytes, crc32, height and width (empty for CSVs)."""
    fix = "make it with rcic-data manifest --data DIR --out FILE"
    try:
        rows = pd.read_csv(path, dtype={"file": str}, keep_default_na=False,
                           na_values={"height": [""], "width": [""]})
    except FileNotFoundError:
        raise UserError(f"manifest {path} does not exist: {fix}") from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"manifest {path} cannot be read ({str(err).splitlines()[0]}): "
                        f"{fix}") from None
    if list(rows.columns) != MANIFEST_COLUMNS:
        raise UserError(f"manifest {path} has columns {','.join(map(str, rows.columns))}, not "
                        f"{','.join(MANIFEST_COLUMNS)}: {fix}")
    numbers = rows[["bytes", "crc32", "height", "width"]].apply(pd.to_numeric, errors="coerce")
    if numbers[["bytes", "crc32"]].isna().any().any() or rows["file"].duplicated().any():
        raise UserError(f"manifest {path} has a row without a number or a file listed twice: "
                        f"{fix}")
    rows[numbers.columns] = numbers
    return rows.astype({"bytes": int, "crc32": int})


# -- the report -------------------------------------------------------------------------------
def table(problems, rows=TABLE_ROWS):
    """The problems as aligned text lines, at most `rows` of them, and a count by kind."""
    shown = problems.head(rows)
    width = max([len("file")] + [len(f) for f in shown["file"]])
    kinds = max([len("problem")] + [len(p) for p in shown["problem"]])
    lines = [f"{'file':<{width}}  {'problem':<{kinds}}  detail"]
    lines += [f"{f:<{width}}  {p:<{kinds}}  {d}" for f, p, d in shown.itertuples(index=False)]
    if len(problems) > rows:
        lines.append(f"... and {len(problems) - rows} more")
    counts = problems["problem"].value_counts()
    lines.append("by problem: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return lines


def write_report(problems, path):
    try:
        write_atomic(path, problems[REPORT_COLUMNS].to_csv(index=False))
    except OSError as err:
        raise UserError(f"cannot write the report {path} ({err.strerror}): choose a writable "
                        f"--report") from None
