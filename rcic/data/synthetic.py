"""An RxRx1-shaped synthetic dataset: same files, schemas and plate structure, tiny images.

What makes it useful rather than just well-formed:
- learnable signal: each siRNA has its own channel profile and cell size, seen through noise;
- batch effects: every experiment (and, less, every plate) scales and offsets each channel,
  so a model that does not normalise per experiment generalises badly to new experiments;
- the plate structure: treatments fall into 4 fixed groups, each plate holds one group, and
  which group sits on which plate is a cyclic rotation per experiment (train shows 3 of the 4
  rotations), so the per-plate assignment lifts accuracy as it does on the real data.
Everything is a pure function of the seed.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rcic.data import layout
from rcic.errors import UserError

CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
DONE_MARKER = "SYNTH_DONE.json"


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
    names = {"train": [], "test": []}
    for cell in spec.cell_types:
        for k in range(spec.train_experiments):
            names["train"].append(f"{cell}-{k + 1:02d}")
        for k in range(spec.test_experiments):
            names["test"].append(f"{cell}-{spec.train_experiments + k + 1:02d}")
    return names


def render_site(spec, profile, radius, batch_gain, batch_offset, rng):
    """One site: dim background plus Gaussian 'cells' whose channel mix is the class profile."""
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
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


def generate(out, spec=None, progress=None):
    """Write an RxRx1-shaped folder to `out` (written to a temporary folder, then renamed)."""
    spec = spec or SynthSpec()
    spec.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty: choose a new --out "
                        f"or delete it first")
    # A private temporary name: two processes may generate the embedded data at once.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create {tmp} ({err.strerror}): choose a writable --out")

    profiles, radius = class_profiles(spec)
    groups = plate_groups(spec)
    names = experiment_names(spec)
    rot = rotations(spec, names)
    controls = list(range(layout.FIRST_CONTROL, layout.FIRST_CONTROL + spec.n_positive_controls))
    controls.append(layout.LAST_CONTROL)
    rows, stats = [], []
    for split, exps in names.items():
        for exp in exps:
            rng = _rng(spec.seed, "batch", exp)
            exp_gain = np.exp(rng.normal(0, 0.35, layout.CHANNELS))
            exp_offset = rng.uniform(0, 6, layout.CHANNELS)
            cell_shift = np.exp(_rng(spec.seed, "cell", layout.cell_type_of(exp)).normal(0, 0.2, 6))
            for plate in layout.PLATES:
                prng = _rng(spec.seed, "plate", exp, plate)
                gain = exp_gain * np.exp(prng.normal(0, 0.08, layout.CHANNELS))
                sirnas = list(groups[(plate - 1 + rot[exp]) % 4]) + controls
                wells = prng.permutation(layout.WELLS)[:len(sirnas)]
                for well, sirna in zip(wells, prng.permutation(sirnas)):
                    sirna = int(sirna)
                    id_code = f"{exp}_{plate}_{well}"
                    wrng = _rng(spec.seed, "well", id_code)
                    profile = profiles[sirna] * cell_shift * np.exp(wrng.normal(0, spec.noise, 6))
                    well_type = ("treatment" if sirna < layout.FIRST_CONTROL else
                                 "negative_control" if sirna == layout.LAST_CONTROL else "positive_control")
                    rows.append((split, id_code, exp, plate, well, sirna, well_type))
                    folder = tmp / split / exp / f"Plate{plate}"
                    folder.mkdir(parents=True, exist_ok=True)
                    for site in layout.SITES:
                        img = render_site(spec, profile, radius[sirna], gain, exp_offset, wrng)
                        for c in range(layout.CHANNELS):
                            cv2.imwrite(str(folder / f"{well}_s{site}_w{c + 1}.png"), img[c])
                            ch = img[c].astype(np.float64)
                            stats.append((id_code, exp, plate, well, site, c + 1, ch.mean(),
                                          ch.std(), np.median(ch), int(ch.min()), int(ch.max())))
                if progress:
                    progress(f"{exp} plate {plate}")

    wells = pd.DataFrame(rows, columns=["split", "id_code", "experiment", "plate", "well",
                                        "sirna", "well_type"])
    base = ["id_code", "experiment", "plate", "well"]
    treat = wells[wells["well_type"] == "treatment"]
    ctrl = wells[wells["well_type"] != "treatment"]
    treat[treat["split"] == "train"][base + ["sirna"]].to_csv(tmp / "train.csv", index=False)
    treat[treat["split"] == "test"][base].to_csv(tmp / "test.csv", index=False)
    for split in ("train", "test"):
        ctrl[ctrl["split"] == split][base + ["sirna", "well_type"]].to_csv(
            tmp / f"{split}_controls.csv", index=False)
    pd.DataFrame(stats, columns=layout.SCHEMAS["pixel_stats.csv"]).to_csv(
        tmp / "pixel_stats.csv", index=False, float_format="%.4f")
    test = treat[treat["split"] == "test"]
    pd.DataFrame({"id_code": test["id_code"], "sirna": 0}).to_csv(
        tmp / "sample_submission.csv", index=False)
    test[["id_code", "sirna"]].to_csv(tmp / layout.ANSWER_KEY, index=False)
    (tmp / DONE_MARKER).write_text(json.dumps(asdict(spec), indent=1))
    try:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / DONE_MARKER).is_file():   # not a concurrent generator that won the race
            raise UserError(f"cannot move the generated data into {out}: choose another --out")
    return out


def default_data_dir():
    """The embedded dataset, generated once into the user's cache folder on first use."""
    root = Path(os.environ.get("RCIC_HOME", Path.home() / ".cache" / "rcic"))
    spec = SynthSpec()
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:8]
    out = root / f"synthetic-{digest}"
    if not (out / DONE_MARKER).is_file():
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        print(f"rcic: writing the embedded synthetic RxRx1 data to {out} (once)")
        generate(out, spec)
    return out
