"""An RxRx1-shaped synthetic dataset: same files, schemas and plate structure, tiny images.

What makes it useful rather than just well-formed:
- learnable signal: each siRNA has its own channel profile and cell size, seen through noise;
- batch effects: every experiment (and, less, every plate) scales and offsets each channel,
  so a model that does not normalise per experiment generalises badly to new experiments;
- the plate structure: treatments fall into 4 fixed groups, each plate holds one group, and
  which group sits on which plate is a cyclic rotation per experiment (train shows 3 of the 4
  rotations), so the per-plate assignment lifts accuracy as it does on the real data.
Everything is a pure function of the seed: each plate is drawn from generators keyed by its
own name, so plates are written in parallel and the bytes do not depend on the worker count.
"""
import hashlib
import io
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rcic.data import layout
from rcic.errors import UserError, refuse_nonempty

CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
DONE_MARKER = "SYNTH_DONE.json"
# The competition's experiments: (train, test) counts per cell type. Test experiments are
# numbered after the train ones (HEPG2-08..11), as on Kaggle.
RXRX1_EXPERIMENTS = {"HEPG2": (7, 4), "HUVEC": (16, 8), "RPE": (7, 4), "U2OS": (3, 2)}


@dataclass
class SynthSpec:
    n_classes: int = 40            # treatments, a multiple of 4 (1,108 as in the real data)
    n_positive_controls: int = 4   # 30 in the real data
    image_size: int = 64           # 512 in the real data
    train_experiments: int = 3     # per cell type (the last is held out for validation)
    test_experiments: int = 1      # per cell type
    cell_types: list = field(default_factory=lambda: list(CELL_TYPES))
    seed: int = 0
    noise: float = 0.35            # per-well deviation from the class profile (log scale)
    # Explicit experiment names {"train": [...], "test": [...]}; None: numbered from the counts.
    experiments: dict = None

    def validate(self):
        if self.n_classes % 4 or not 4 <= self.n_classes <= layout.N_TREATMENTS:
            raise UserError(f"--classes {self.n_classes}: must be a multiple of 4 from 4 to 1108")
        wells = self.n_classes // 4 + self.n_positive_controls + 1
        if wells > len(layout.WELLS):
            raise UserError(f"{wells} wells a plate do not fit the 308-well grid: lower --classes "
                            f"or --controls")
        if not 0 <= self.n_positive_controls <= 30:
            raise UserError("--controls must be between 0 and 30")
        if self.image_size < 16:
            raise UserError(f"--size {self.image_size} is too small: use 16 pixels or more")
        if self.train_experiments < 1 or self.test_experiments < 1:
            raise UserError("--experiments and --test-experiments must be at least 1")

    def record(self):
        """The spec as written to SYNTH_DONE.json (and hashed for the embedded data's folder);
        `experiments` only when given, so older folders keep their identity."""
        record = asdict(self)
        if record["experiments"] is None:
            del record["experiments"]
        return record


def rxrx1_spec(image_size, seed=0, fraction=1.0):
    """The competition's shape: 1,108 siRNAs in 4 plate groups, 30 positive controls and one
    negative control (308 wells a plate), its 51 experiments by name. `fraction` < 1 keeps the
    first ceil(fraction * n) train and test experiments of each cell type (a smaller rehearsal
    with the same plates and names)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: must be above 0 and at most 1")
    names = {"train": [], "test": []}
    for cell, (n_train, n_test) in RXRX1_EXPERIMENTS.items():
        names["train"] += [f"{cell}-{k:02d}" for k in range(1, math.ceil(n_train * fraction) + 1)]
        names["test"] += [f"{cell}-{n_train + k:02d}"
                          for k in range(1, math.ceil(n_test * fraction) + 1)]
    return SynthSpec(n_classes=layout.N_TREATMENTS, n_positive_controls=30,
                     image_size=image_size, cell_types=list(RXRX1_EXPERIMENTS), seed=seed,
                     experiments=names)


def _rng(seed, *keys):
    """An independent generator for each named piece, so pieces never shift each other."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def class_profiles(spec):
    """Per class: a channel profile (6,) and a cell radius; controls get profiles too."""
    n = layout.LAST_CONTROL + 1
    rng = _rng(spec.seed, "classes")
    profiles = np.exp(rng.normal(0.0, 0.6, size=(n, layout.CHANNELS)))
    radius = rng.uniform(1.0, 2.2, size=n)
    profiles[layout.LAST_CONTROL] = 1.0       # the untreated negative control
    return profiles, radius


def plate_groups(spec):
    """The 4 fixed, disjoint groups of treatments."""
    order = _rng(spec.seed, "groups").permutation(spec.n_classes)
    return [np.sort(order[g::4]) for g in range(4)]


def rotations(spec, experiments_by_split):
    """Rotation per experiment: train uses rotations 0-2 only; test may use all four."""
    rot = {}
    for split, exps in experiments_by_split.items():
        rng = _rng(spec.seed, "rotation", split)
        for i, exp in enumerate(exps):
            rot[exp] = int(rng.integers(0, 3)) if split == "train" else (3 if i == 0 else int(rng.integers(0, 4)))
    return rot


def experiment_names(spec):
    if spec.experiments is not None:
        return {split: list(spec.experiments[split]) for split in ("train", "test")}
    names = {"train": [], "test": []}
    for cell in spec.cell_types:
        for k in range(spec.train_experiments):
            names["train"].append(f"{cell}-{k + 1:02d}")
        for k in range(spec.test_experiments):
            names["test"].append(f"{cell}-{spec.train_experiments + k + 1:02d}")
    return names


_grids = {}


def _grid(size):
    if size not in _grids:
        _grids[size] = np.mgrid[0:size, 0:size].astype(np.float32)
    return _grids[size]


def render_site(spec, profile, radius, batch_gain, batch_offset, rng):
    """One site: dim background plus Gaussian 'cells' whose channel mix is the class profile."""
    size = spec.image_size
    yy, xx = _grid(size)
    signal = np.zeros((size, size), np.float32)
    scale = size / 64.0
    for _ in range(int(rng.integers(6, 11))):
        cy, cx = rng.uniform(0, size, 2)
        r = radius * scale * 2.0 * rng.uniform(0.8, 1.25)
        signal += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    channels = []
    for c in range(layout.CHANNELS):
        img = 4.0 + 14.0 * profile[c] * signal + rng.normal(0, 1.5, (size, size))
        channels.append(batch_offset[c] + batch_gain[c] * img)
    return np.clip(np.rint(np.stack(channels)), 0, 255).astype(np.uint8)


STATS_COLUMNS = layout.SCHEMAS["pixel_stats.csv"]
WELL_COLUMNS = ["split", "id_code", "experiment", "plate", "well", "sirna", "well_type"]


def plate_jobs(spec):
    """One job a plate, in the order the CSVs list them: (split, experiment, plate, siRNAs)."""
    groups = plate_groups(spec)
    names = experiment_names(spec)
    rot = rotations(spec, names)
    controls = list(range(layout.FIRST_CONTROL, layout.FIRST_CONTROL + spec.n_positive_controls))
    controls.append(layout.LAST_CONTROL)
    return [(split, exp, plate, [int(s) for s in groups[(plate - 1 + rot[exp]) % 4]] + controls)
            for split, exps in names.items() for exp in exps for plate in layout.PLATES]


def write_plate(root, spec, job):
    """Render and write one plate's PNGs. -> (its well rows, its pixel_stats.csv lines).

    A pure function of (spec, job): the generators are keyed by the plate's and wells' names."""
    split, exp, plate, sirnas = job
    profiles, radius = class_profiles(spec)
    rng = _rng(spec.seed, "batch", exp)
    exp_gain = np.exp(rng.normal(0, 0.35, layout.CHANNELS))
    exp_offset = rng.uniform(0, 6, layout.CHANNELS)
    cell_shift = np.exp(_rng(spec.seed, "cell", layout.cell_type_of(exp)).normal(0, 0.2, 6))
    prng = _rng(spec.seed, "plate", exp, plate)
    gain = exp_gain * np.exp(prng.normal(0, 0.08, layout.CHANNELS))
    wells = prng.permutation(layout.WELLS)[:len(sirnas)]
    folder = Path(root) / split / exp / f"Plate{plate}"
    folder.mkdir(parents=True, exist_ok=True)
    rows, stats = [], []
    for well, sirna in zip(wells, prng.permutation(sirnas)):
        sirna = int(sirna)
        id_code = f"{exp}_{plate}_{well}"
        wrng = _rng(spec.seed, "well", id_code)
        profile = profiles[sirna] * cell_shift * np.exp(wrng.normal(0, spec.noise, 6))
        well_type = ("treatment" if sirna < layout.FIRST_CONTROL else
                     "negative_control" if sirna == layout.LAST_CONTROL else "positive_control")
        rows.append((split, id_code, exp, plate, well, sirna, well_type))
        for site in layout.SITES:
            img = render_site(spec, profile, radius[sirna], gain, exp_offset, wrng)
            for c in range(layout.CHANNELS):
                write_png(folder / f"{well}_s{site}_w{c + 1}.png", img[c])
            flat = img.reshape(layout.CHANNELS, -1).astype(np.float64)
            for c, (mean, std, median, low, high) in enumerate(zip(
                    flat.mean(1), flat.std(1), np.median(flat, 1), flat.min(1), flat.max(1))):
                stats.append((id_code, exp, plate, well, site, c + 1, mean, std, median,
                              int(low), int(high)))
    text = io.StringIO()
    pd.DataFrame(stats, columns=STATS_COLUMNS).to_csv(text, index=False, header=False,
                                                      float_format="%.4f")
    return rows, text.getvalue()


def write_png(path, image):
    png = cv2.imencode(".png", image)[1]
    try:
        path.write_bytes(png.tobytes())
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}): free some space or choose "
                        f"another --out") from None


def _write_plate_star(args):
    return write_plate(*args)


def generate(out, spec=None, progress=None, workers=1):
    """Write an RxRx1-shaped folder to `out` (written to a temporary folder, then renamed).

    `workers` processes write plates at once; the result is the same, byte for byte."""
    spec = spec or SynthSpec()
    spec.validate()
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    out = Path(out)
    refuse_nonempty(out)
    # A private temporary name: two processes may generate the embedded data at once.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create {tmp} ({err.strerror}): choose a writable --out")

    jobs = plate_jobs(spec)
    rows = []
    with open(tmp / "pixel_stats.csv", "w") as stats:
        stats.write(",".join(STATS_COLUMNS) + "\n")
        with ProcessPoolExecutor(workers) if workers > 1 else _InProcess() as pool:
            # map keeps the plates' order, whichever worker finishes first.
            written = pool.map(_write_plate_star, [(tmp, spec, job) for job in jobs])
            for (_, exp, plate, _), (plate_rows, plate_stats) in zip(jobs, written):
                rows += plate_rows
                stats.write(plate_stats)
                if progress:
                    progress(f"{exp} plate {plate}")

    wells = pd.DataFrame(rows, columns=WELL_COLUMNS)
    base = ["id_code", "experiment", "plate", "well"]
    treat = wells[wells["well_type"] == "treatment"]
    ctrl = wells[wells["well_type"] != "treatment"]
    treat[treat["split"] == "train"][base + ["sirna"]].to_csv(tmp / "train.csv", index=False)
    treat[treat["split"] == "test"][base].to_csv(tmp / "test.csv", index=False)
    for split in ("train", "test"):
        ctrl[ctrl["split"] == split][base + ["sirna", "well_type"]].to_csv(
            tmp / f"{split}_controls.csv", index=False)
    test = treat[treat["split"] == "test"]
    pd.DataFrame({"id_code": test["id_code"], "sirna": 0}).to_csv(
        tmp / "sample_submission.csv", index=False)
    test[["id_code", "sirna"]].to_csv(tmp / layout.ANSWER_KEY, index=False)
    (tmp / DONE_MARKER).write_text(json.dumps(spec.record(), indent=1))
    try:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / DONE_MARKER).is_file():   # not a concurrent generator that won the race
            raise UserError(f"cannot move the generated data into {out}: choose another --out")
    return out


class _InProcess:
    """`pool.map` in this process: one worker needs no pool (nor its start-up)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


def default_data_dir():
    """The embedded dataset, generated once into the user's cache folder on first use."""
    root = Path(os.environ.get("RCIC_HOME", Path.home() / ".cache" / "rcic"))
    spec = SynthSpec()
    digest = hashlib.sha256(json.dumps(spec.record(), sort_keys=True).encode()).hexdigest()[:8]
    out = root / f"synthetic-{digest}"
    if not (out / DONE_MARKER).is_file():
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        print(f"rcic: writing the embedded synthetic RxRx1 data to {out} (once)")
        generate(out, spec)
    return out
