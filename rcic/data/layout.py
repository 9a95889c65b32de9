"""The RxRx1 folder as Kaggle ships it: CSV schemas, one row per (well, site), image paths.

Everything is validated up front, and every problem found is reported in one message, so a
user learns about the missing column *and* the 300 missing PNGs before any training starts.
Images are checked as cheaply as that allows at 750,000 files: one directory listing a plate
folder finds every missing file, and the headers of a sample find a wrong format or size; a
file that is present but broken outside the sample fails when it is read, naming the file.
`rcic-data verify` (rcic/data/verify.py) reads every file, to name all the broken ones at once.
"""
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import UserError

SCHEMAS = {
    "train.csv": ["id_code", "experiment", "plate", "well", "sirna"],
    "test.csv": ["id_code", "experiment", "plate", "well"],
    "train_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
    "test_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
    "pixel_stats.csv": ["id_code", "experiment", "plate", "well", "site", "channel",
                        "mean", "std", "median", "min", "max"],
    "sample_submission.csv": ["id_code", "sirna"],
}
OPTIONAL_FILES = {"pixel_stats.csv"}
# Read only up to its header when the folder is opened: 750,000 rows at full size, and only
# per-experiment or per-plate normalisation needs their body (read then, in part).
BODY_WHEN_NEEDED = {"pixel_stats.csv": ["experiment", "plate", "channel", "mean", "std"]}
ANSWER_KEY = "test_answers.csv"   # id_code,sirna: written by rcic-synth only, to score local runs

N_TREATMENTS = 1108               # siRNA 0..1107 are the scored classes
FIRST_CONTROL = 1108              # 1108..1137 positive controls, 1138 the negative control
LAST_CONTROL = 1138
N_CONTROL_CLASSES = LAST_CONTROL - FIRST_CONTROL + 1
CHANNELS = 6
SITES = (1, 2)
PLATES = (1, 2, 3, 4)
WELL_ROWS = "BCDEFGHIJKLMNO"      # 384-well plate without its outer ring: 14 x 22 = 308 wells
WELL_COLS = range(2, 24)
WELLS = [f"{r}{c:02d}" for r in WELL_ROWS for c in WELL_COLS]
EXPERIMENT_RE = re.compile(r"^([A-Za-z0-9]+)-(\d+)$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG headers read when a folder is opened: every one of a small folder, an even spread of a
# large one (a header costs a random read from a cold disk: 750,000 of them took 147 s).
HEADER_SAMPLE = 2048
HEADER_THREADS = 16               # headers are I/O waits: threads overlap them


def plate_key(frame):
    """"<experiment>_<plate>" of every row of `frame`: the one name of a physical plate (an
    experiment's plate numbers repeat in every experiment)."""
    return frame["experiment"].astype(str) + "_" + frame["plate"].astype(str)


def cell_type_of(experiment):
    """'HUVEC-07' -> 'HUVEC'."""
    return experiment.rsplit("-", 1)[0]


def image_path(root, split, experiment, plate, well, site, channel):
    return Path(root) / split / experiment / f"Plate{plate}" / f"{well}_s{site}_w{channel}.png"


def png_header(path):
    """(width, height, bit_depth, color_type) from a PNG's IHDR, or a reason it is not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(29)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if len(head) == 0:
        return "empty (0 bytes)"
    if not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return "not a PNG file"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return width, height, head[24], head[25]


def header_sample(expected, limit):
    """(folder, name) of the images whose headers to read: all when there are at most `limit`,
    else the first image of every plate folder and an even spread of the rest, about `limit`
    in all (the spread continues across folders, so small folders are not over-sampled)."""
    total = sum(len(names) for names in expected.values())
    stride = max(1, -(-total // limit))
    while math.gcd(stride, CHANNELS * len(SITES)) != 1:   # step through every channel and site
        stride += 1
    sample, position = [], 0
    for folder, names in expected.items():
        picks = set(range(-position % stride, len(names), stride)) | {0}
        sample += [(folder, names[i]) for i in sorted(picks) if i < len(names)]
        position += len(names)
    return sample


class Problems:
    """Collects every problem found while validating, then reports them in one message."""

    def __init__(self, root):
        self.root, self.items = root, []

    def add(self, text):
        self.items.append(text)

    def raise_if_any(self, fix):
        if not self.items:
            return
        shown = "; ".join(self.items[:5])
        more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
        raise UserError(f"{len(self.items)} problem(s) in data folder {self.root}: "
                        f"{shown}{more}. {fix}")


class RxRx1:
    """An RxRx1 folder: `wells` (one row a well) and `sites` (one row a well and site).

    Columns of both: id_code, experiment, cell_type, plate, well, split (train|test),
    sirna (-1 where unknown), well_type (treatment|positive_control|negative_control);
    `sites` adds `site`.
    """

    def __init__(self, root, check_images=True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data folder {self.root} does not exist: pass --data with an RxRx1 "
                            f"folder, or leave --data out to use the embedded synthetic data")
        problems = Problems(self.root)
        tables = {name: self._read_csv(name, problems) for name in SCHEMAS}
        problems.raise_if_any("Fix the CSV files named above (schemas: docs/rxrx1-and-kaggle.md).")
        self.tables = tables
        self._channel_stats = {}          # by -> {key: (mean, std)}, filled on first use
        self.wells = self._build_wells(tables, problems)
        problems.raise_if_any("Fix or restore the CSV rows named above.")
        self.answers = self._read_answers()
        self.sites = self.wells.loc[self.wells.index.repeat(len(SITES))].reset_index(drop=True)
        self.sites.insert(self.sites.columns.get_loc("well") + 1, "site",
                          np.tile(np.array(SITES), len(self.wells)))
        self.n_treatments = self._count_treatments()
        self.image_size = None
        if check_images:
            self.image_size = self._check_images(problems)
            problems.raise_if_any(f"Restore the missing or broken images (re-download, or "
                                  f"re-run rcic-synth for the embedded data); run `rcic-data "
                                  f"verify --data {self.root}` to find every damaged file.")

    # -- CSVs -------------------------------------------------------------------------------
    def _read_csv(self, name, problems):
        path = self.root / name
        if not path.is_file():
            if name not in OPTIONAL_FILES:
                problems.add(f"{name} is missing")
            return None
        try:
            df = pd.read_csv(path, nrows=0 if name in BODY_WHEN_NEEDED else None)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            problems.add(f"{name} cannot be parsed ({str(err).splitlines()[0]})")
            return None
        expected = SCHEMAS[name]
        missing = [c for c in expected if c not in df.columns]
        extra = [c for c in df.columns if c not in expected]
        if missing:
            problems.add(f"{name} lacks column(s) {', '.join(missing)}")
        if extra:
            problems.add(f"{name} has unexpected column(s) {', '.join(map(str, extra))}")
        if missing or extra:
            return None
        return df[expected]

    def _build_wells(self, t, problems):
        parts = [
            t["train.csv"].assign(split="train", well_type="treatment"),
            t["train_controls.csv"].assign(split="train"),
            t["test.csv"].assign(split="test", sirna=-1, well_type="treatment"),
            t["test_controls.csv"].assign(split="test"),
        ]
        wells = pd.concat(parts, ignore_index=True)
        wells["plate"] = pd.to_numeric(wells["plate"], errors="coerce")
        wells["sirna"] = pd.to_numeric(wells["sirna"], errors="coerce")
        for column in ("plate", "sirna"):
            bad = wells[wells[column].isna() | (wells[column] % 1 != 0)]
            for id_code in bad["id_code"].head(3):
                problems.add(f"{column} of {id_code} is not an integer")
        if problems.items:
            return None
        wells = wells.astype({"plate": int, "sirna": int, "experiment": str, "well": str})
        dup = wells[wells["id_code"].duplicated()]["id_code"]
        if len(dup):
            problems.add(f"{len(dup)} duplicated id_code(s), e.g. {dup.iloc[0]}")
        bad_exp = sorted(e for e in wells["experiment"].unique() if not EXPERIMENT_RE.match(e))
        if bad_exp:
            problems.add(f"unknown experiment name(s) {', '.join(bad_exp[:3])} "
                         f"(expected CELLTYPE-NN, e.g. HUVEC-01)")
        bad_plate = wells[~wells["plate"].isin(PLATES)]
        if len(bad_plate):
            problems.add(f"plate {bad_plate['plate'].iloc[0]} of {bad_plate['id_code'].iloc[0]}"
                         f" is not one of 1-4")
        bad_well = wells[~wells["well"].isin(WELLS)]
        if len(bad_well):
            problems.add(f"well {bad_well['well'].iloc[0]} of {bad_well['id_code'].iloc[0]} is "
                         f"not on the 308-well grid B02..O23")
        expected_id = plate_key(wells) + "_" + wells["well"]
        bad_id = wells[wells["id_code"] != expected_id]
        if len(bad_id):
            problems.add(f"id_code {bad_id['id_code'].iloc[0]} does not match its experiment, "
                         f"plate and well")
        treat = wells[(wells["well_type"] == "treatment") & (wells["split"] == "train")]
        bad = treat[(treat["sirna"] < 0) | (treat["sirna"] >= N_TREATMENTS)]
        if len(bad):
            problems.add(f"train.csv siRNA {bad['sirna'].iloc[0]} of {bad['id_code'].iloc[0]} is "
                         f"outside 0..{N_TREATMENTS - 1}")
        ctrl = wells[wells["well_type"] != "treatment"]
        bad = ctrl[(ctrl["sirna"] < FIRST_CONTROL) | (ctrl["sirna"] > LAST_CONTROL)]
        if len(bad):
            problems.add(f"control siRNA {bad['sirna'].iloc[0]} of {bad['id_code'].iloc[0]} is "
                         f"outside {FIRST_CONTROL}..{LAST_CONTROL}")
        bad = ctrl[~ctrl["well_type"].isin(["positive_control", "negative_control"])]
        if len(bad):
            problems.add(f"well_type {bad['well_type'].iloc[0]!r} of {bad['id_code'].iloc[0]} is "
                         f"not positive_control or negative_control")
        if problems.items:
            return None
        wells.insert(2, "cell_type", wells["experiment"].map(cell_type_of))
        return wells[["id_code", "experiment", "cell_type", "plate", "well", "split", "sirna",
                      "well_type"]]

    def _read_answers(self):
        path = self.root / ANSWER_KEY
        if not path.is_file():
            return None
        answers = pd.read_csv(path)
        if list(answers.columns) != ["id_code", "sirna"]:
            raise UserError(f"{path} must have columns id_code,sirna: fix or delete the file")
        return answers

    def _count_treatments(self):
        """Classes are siRNA 0..n-1: 1,108 on the real data, fewer on small synthetic sets."""
        treat = self.wells[(self.wells["split"] == "train") & (self.wells["well_type"] == "treatment")]
        if len(treat) == 0:
            raise UserError(f"{self.root / 'train.csv'} has no rows: it must list the training wells")
        return int(treat["sirna"].max()) + 1

    # -- images -----------------------------------------------------------------------------
    def paths(self, row):
        """The six channel PNGs of one `sites` row."""
        return [image_path(self.root, row.split, row.experiment, row.plate, row.well, row.site, c)
                for c in range(1, CHANNELS + 1)]

    def _check_images(self, problems):
        """Check that every PNG exists and that a sample of headers is sane; returns the
        common image size.

        Existence comes from one listing a plate folder, compared with the names the CSVs
        imply. The common size is the one most sampled images have: a single odd image is the
        one named, even when it happens to be read first."""
        expected = self.expected_files()
        present = {}                      # folder -> names in it; absent: missing or unreadable
        for folder, names in expected.items():
            try:
                present[folder] = set(os.listdir(self.root / folder))
            except FileNotFoundError:
                problems.add(f"{folder} is missing (its {len(names)} images)")
                continue
            except OSError as err:
                problems.add(f"{folder} is unreadable ({err.strerror})")
                continue
            for name in names:
                if name not in present[folder]:
                    problems.add(f"{folder}/{name} is missing")
        sample = [(folder, name) for folder, name in header_sample(expected, HEADER_SAMPLE)
                  if name in present.get(folder, ())]
        with ThreadPoolExecutor(HEADER_THREADS) as pool:
            heads = list(pool.map(lambda item: png_header(self.root / item[0] / item[1]), sample))
        by_size = {}                      # (height, width) -> relative paths
        for (folder, name), head in zip(sample, heads):
            rel = f"{folder}/{name}"
            if isinstance(head, str):
                problems.add(f"{rel} is {head}")
                continue
            width, height, depth, color = head
            if depth != 8 or color != 0:
                problems.add(f"{rel} is not 8-bit grayscale (bit depth {depth}, colour type {color})")
            else:
                by_size.setdefault((height, width), []).append(rel)
        if not by_size:
            return None
        size = max(by_size, key=lambda s: len(by_size[s]))
        for (height, width), paths in by_size.items():
            if (height, width) != size:
                for rel in paths:
                    problems.add(f"{rel} is {width}x{height}, the others {size[1]}x{size[0]}")
        return size

    def expected_files(self):
        """{plate folder relative to the root: its PNG names}, in the CSVs' order."""
        files = {}
        for (split, experiment, plate), part in self.sites.groupby(
                ["split", "experiment", "plate"], sort=False):
            names = files.setdefault(f"{split}/{experiment}/Plate{plate}", [])
            names += [f"{well}_s{site}_w{c}.png"
                      for well, site in zip(part["well"].tolist(), part["site"].tolist())
                      for c in range(1, CHANNELS + 1)]
        return files

    # -- splits and statistics ----------------------------------------------------------------
    def experiments(self, split="train"):
        return sorted(self.wells.loc[self.wells["split"] == split, "experiment"].unique())

    def default_val_experiments(self):
        """The last train experiment of each cell type: validation never shares a batch effect."""
        exps = pd.Series(self.experiments("train"))
        return sorted(exps.groupby(exps.map(cell_type_of)).max())

    def split_sites(self, val_experiments=None, cell_types=None, use_controls=False,
                    use_test_controls=False):
        """Train and validation sites, split by whole experiments (never by wells: that leaks)."""
        val_experiments_given = bool(val_experiments)
        val_experiments = list(val_experiments or self.default_val_experiments())
        unknown = sorted(set(val_experiments) - set(self.experiments("train")))
        if unknown:
            raise UserError(f"validation experiment(s) {', '.join(unknown)} are not train "
                            f"experiments of {self.root}: choose from "
                            f"{', '.join(self.experiments('train'))}")
        sites = self.sites
        if cell_types:
            unknown = sorted(set(cell_types) - set(sites["cell_type"]))
            if unknown:
                raise UserError(f"cell type(s) {', '.join(unknown)} do not occur in {self.root}: "
                                f"choose from {', '.join(sorted(sites['cell_type'].unique()))}")
            sites = sites[sites["cell_type"].isin(cell_types)]
        labelled = sites["split"] == "train"
        if not use_controls:
            labelled &= sites["well_type"] == "treatment"
        in_val = sites["experiment"].isin(val_experiments)
        train = sites[labelled & ~in_val]
        if use_test_controls:
            train = pd.concat([train, sites[(sites["split"] == "test")
                                            & (sites["well_type"] != "treatment")]])
        val = sites[in_val & (sites["well_type"] == "treatment")]
        if not (labelled & ~in_val).any() or val.empty:
            self._refuse_split(sites, val_experiments, val_experiments_given,
                               nothing_to_train=not (labelled & ~in_val).any())
        return train.reset_index(drop=True), val.reset_index(drop=True)

    def _refuse_split(self, sites, val_experiments, chosen, nothing_to_train):
        """One line on a split that leaves nothing to train on or nothing to validate on."""
        experiments = sites.loc[sites["split"] == "train", ["experiment", "cell_type"]]
        per_cell = experiments.drop_duplicates().groupby("cell_type")["experiment"]
        counts = ", ".join(f"{cell} {n}" for cell, n in per_cell.nunique().items())
        which = (f"data.val_experiments {', '.join(val_experiments)}" if chosen else
                 "validation (by default the last train experiment of each cell type)")
        if not nothing_to_train:
            raise UserError(f"{which} holds none of the cell types trained (train experiments "
                            f"per cell type: {counts}): choose validation experiments of those "
                            f"cell types with --set data.val_experiments=NAME")
        fewer = ""
        if experiments["experiment"].nunique() > 1:
            fewer = (f", or validate on fewer, e.g. --set data.val_experiments="
                     f"{experiments['experiment'].iloc[0]}")
        raise UserError(f"{which} takes every train experiment of {self.root} (train "
                        f"experiments per cell type: {counts}), so nothing is left to train "
                        f"on: use data with at least 2 train experiments per cell type "
                        f"(rcic-synth --experiments 2){fewer}")

    def test_sites(self, cell_types=None):
        """Sites of the test wells to predict (controls excluded: they are never submitted)."""
        sites = self.sites[(self.sites["split"] == "test") & (self.sites["well_type"] == "treatment")]
        if cell_types:
            sites = sites[sites["cell_type"].isin(cell_types)]
        return sites.reset_index(drop=True)

    def class_index(self, sirna):
        """Model class of a siRNA: treatments keep their number, controls follow them."""
        sirna = np.asarray(sirna)
        return np.where(sirna >= FIRST_CONTROL, self.n_treatments + sirna - FIRST_CONTROL, sirna)

    def _pixel_stats_body(self):
        """The columns of pixel_stats.csv that statistics need."""
        path = self.root / "pixel_stats.csv"
        try:
            return pd.read_csv(path, usecols=BODY_WHEN_NEEDED[path.name],
                               dtype={"plate": int, "channel": int, "mean": float, "std": float})
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise UserError(f"{path} cannot be read ({str(err).splitlines()[0]}): restore "
                            f"the file or set data.normalization=image") from None

    def channel_stats(self, by):
        """Per-group channel mean and std (each (6,) float32) from pixel_stats.csv.

        `by` is 'experiment' or 'plate' (key experiment_plate). Pooled over sites exactly:
        var = E[std^2 + mean^2] - E[mean]^2. Computed once per `by`: the train and validation
        sets of a stage both ask.
        """
        if by in self._channel_stats:
            return dict(self._channel_stats[by])
        if self.tables.get("pixel_stats.csv") is None:
            raise UserError(f"{self.root / 'pixel_stats.csv'} is missing, and normalization "
                            f"'{by}' needs it: restore the file or set data.normalization=image")
        stats = self._pixel_stats_body()
        stats["key"] = (stats["experiment"] if by == "experiment"
                        else plate_key(stats))
        stats["sq"] = stats["std"] ** 2 + stats["mean"] ** 2
        grouped = stats.groupby(["key", "channel"])[["mean", "sq"]].mean()
        out = {}
        for key, part in grouped.groupby(level=0):
            part = part.droplevel(0).reindex(range(1, CHANNELS + 1))
            if part.isna().any().any():
                raise UserError(f"{self.root / 'pixel_stats.csv'} lacks channels for {key}: "
                                f"restore the file or set data.normalization=image")
            mean = part["mean"].to_numpy(np.float64)
            std = np.sqrt(np.maximum(part["sq"].to_numpy(np.float64) - mean ** 2, 1e-6))
            out[key] = (mean.astype(np.float32), std.astype(np.float32))
        self._channel_stats[by] = out
        return dict(out)
