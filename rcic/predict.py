"""From trained weights to a checked submission: sites x TTA views x checkpoints -> plates -> CSV.

Everything is averaged as *probabilities over the treatment classes* (softmax of the first
n_treatments scores; control classes are dropped because every test well is a treatment):
- probabilities are on one scale whatever the head (linear logits, scale * cosine, summed
  log-probabilities of ce+arcface) or temperature of a checkpoint, so an ensemble of unlike
  models is a fair vote, where averaging raw logits would let the sharpest model dominate;
- the plate step needs probabilities anyway (mass per group, log-probabilities to assign);
- a mean of probabilities cannot be ruined by one view or site with an extreme logit.
Order: TTA views of a site, then the two sites of a well, then checkpoints.

Checkpoints trained on some cell types (recipe.data.cell_types) predict only those; the
others predict every cell type they know. Where both kinds cover a well, the mean of the
specialists and the mean of the generalists get equal weight, so one fine-tuned specialist
is not drowned by several general models, nor the reverse.
"""
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rcic.adabn import MODES as ADABN_MODES, batchnorm_layers, use_adabn
from rcic.data.layout import RxRx1, plate_key
from rcic.errors import UserError
from rcic.inference import load_member, site_probabilities, well_probabilities
from rcic.plates import MODES, PlateStructure, plate_step
from rcic.search import KAGGLE_INPUT
from rcic.submission import check_output_path, check_submission, write_submission
from rcic.tta import views as tta_views
from rcic.weights import find_weights, read_meta

log = logging.getLogger("rcic")
FAMILIES = ("specialist", "generalist")
REPORT_NAME = "predict_report.json"
LOCAL_RUNS = Path("runs")


def run_prediction(data, out, checkpoints=(), tta=8, plates="assign", adabn="auto",
                   batch_size=64, device="auto", workers=0, cache=""):
    """rcic-predict as a function: `data` (an RxRx1 or its folder) and the weights files or
    stage folders in `checkpoints` (none: the newest under /kaggle/input and runs/) -> the
    checked submission `out`; returns the report, also saved beside it as REPORT_NAME."""
    check_output_path(out)
    views = tta_views(tta)
    device = pick_device(device)
    data = data if isinstance(data, RxRx1) else RxRx1(data)
    roots = [r for r in (KAGGLE_INPUT, LOCAL_RUNS) if r.is_dir()]
    weights = resolve_checkpoints(checkpoints, roots)
    return predict(data, weights, out, views, plates, batch_size, device, workers, cache, adabn)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible: use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def resolve_checkpoints(paths, roots):
    """Weights files to ensemble: each --checkpoint (a file, or the newest under a folder);
    with none, the newest finished weights under `roots` (else the newest unfinished)."""
    if paths:
        out = []
        for path in map(Path, paths):
            found = find_weights([path]) if path.is_dir() else [path] if path.is_file() else []
            if not found:
                raise UserError(f"--checkpoint {path}: no weights file there: pass a weights.pt "
                                f"or a stage output folder that holds one")
            out.append(found[0])
        return out
    found = find_weights(roots)
    if not found:
        raise UserError(f"no weights.pt under {', '.join(map(str, roots))}: train with "
                        f"rcic-stage first, or pass --checkpoint PATH")
    finished = [p for p in found if read_meta(p).get("done")]
    if not finished:
        log.warning("no finished weights found: predicting with the unfinished %s", found[0])
    return [(finished or found)[0]]


class Ensemble:
    """Accumulates well probabilities per family (specialist / generalist), then combines."""

    def __init__(self, n_wells, n_classes):
        self.sums = {f: np.zeros((n_wells, n_classes), np.float64) for f in FAMILIES}
        self.counts = {f: np.zeros(n_wells) for f in FAMILIES}

    def add(self, family, rows, probs):
        self.sums[family][rows] += probs
        self.counts[family][rows] += 1

    def covered(self):
        return sum(self.counts.values()) > 0

    def probabilities(self):
        """Per well: the mean over families that cover it of each family's mean."""
        total, families = 0, 0
        for f in FAMILIES:
            has = self.counts[f] > 0
            mean = np.divide(self.sums[f], self.counts[f][:, None], where=has[:, None],
                             out=np.zeros_like(self.sums[f]))
            total, families = total + mean, families + has
        return total / np.maximum(families, 1)[:, None]


def predict(data, checkpoints, out, views, plates="assign", batch_size=64,
            device=torch.device("cpu"), workers=0, cache="", adabn="auto"):
    """Write and validate the submission; return the report (also saved beside it).

    adabn: auto, on or off: per-plate BatchNorm statistics (adabn.py); auto decides per
    checkpoint from its recipe."""
    if plates not in MODES:
        raise UserError(f"--plates {plates}: choose one of {', '.join(MODES)}")
    if adabn not in ADABN_MODES:
        raise UserError(f"--adabn {adabn}: choose one of {', '.join(ADABN_MODES)}")
    sites = data.test_sites()
    wells = sites.drop_duplicates("id_code").reset_index(drop=True)
    ensemble = Ensemble(len(wells), data.n_treatments)
    used = []
    for path in checkpoints:
        member = load_member(path, data, device)
        mine = sites["cell_type"].isin(member.cell_types).to_numpy()
        if not mine.any():
            log.warning("weights %s cover none of the test cell types: skipped", path)
            continue
        log.info("predicting %d test sites (%s) with %s", mine.sum(),
                 ", ".join(sorted(sites.loc[mine, "cell_type"].unique())), path)
        part = sites[mine].reset_index(drop=True)
        per_plate = use_adabn(adabn, member.recipe)
        if per_plate and not batchnorm_layers(member.model):
            log.warning("weights %s have no BatchNorm layer: --adabn changes nothing", path)
        probs = site_probabilities(member.model, member.recipe, member.meta["cell_types"], data,
                                   part, views, batch_size, device, workers, cache, per_plate,
                                   label=f"predict {path}")
        ids = part["id_code"].drop_duplicates()
        rows = wells.index[wells["id_code"].isin(ids)].to_numpy()
        ensemble.add("specialist" if member.specialist else "generalist", rows,
                     well_probabilities(part, probs, wells["id_code"].to_numpy()[rows]))
        used.append({"path": str(path), "cell_types": member.cell_types,
                     "step": member.meta.get("step"), "done": member.meta.get("done"),
                     "adabn": per_plate})
        del member
    uncovered = sorted(wells.loc[~ensemble.covered(), "cell_type"].unique())
    if uncovered:
        raise UserError(f"no checkpoint predicts cell type(s) {', '.join(uncovered)}: add "
                        f"--checkpoint weights trained on them (or on all cell types)")
    probs = ensemble.probabilities()

    structure = PlateStructure.learn(data.wells, data.n_treatments) if plates != "off" else None
    pred = plate_step(plates, wells, probs, structure)
    out = write_submission(out, wells["id_code"], pred)
    check_submission(out, data.root)
    report = {"submission": str(out), "data": str(data.root), "rows": len(wells), "tta_views": [v.name for v in views],
              "plates": plates, "checkpoints": used}
    if data.answers is not None:
        report.update(score(data, wells, probs, structure))
    (out.parent / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return report


def describe(report):
    """The lines a person reads about a prediction: what was written, and any accuracy."""
    lines = [f"wrote {report['submission']} ({report['rows']} rows, checked against "
             f"{report['data']})"]
    for mode, acc in report.get("accuracy", {}).items():
        cells = ", ".join(f"{c} {a:.3f}" for c, a in acc["per_cell_type"].items())
        lines.append(f"accuracy --plates {mode}: {acc['overall']:.4f} ({cells})")
    if "plate_groups_correct" in report:
        lines.append(f"test plates with the right siRNA group: {report['plate_groups_correct']}")
    return lines


def score(data, wells, probs, structure=None):
    """Accuracy against the answer key with each plate mode, overall and per cell type, and
    how many test plates got their siRNA group right."""
    truth = wells["id_code"].map(data.answers.set_index("id_code")["sirna"])
    if truth.isna().any():
        raise UserError(f"{data.root}/test_answers.csv lacks {int(truth.isna().sum())} test "
                        f"id(s), e.g. {wells['id_code'][truth.isna()].iloc[0]}: regenerate it")
    truth = truth.to_numpy(int)
    if structure is None:
        try:
            structure = PlateStructure.learn(data.wells, data.n_treatments)
        except UserError as err:
            log.warning("accuracy without the plate step only: %s", err)
    accuracy = {}
    for mode in ("off", "mask", "assign") if structure is not None else ("off",):
        correct = plate_step(mode, wells, probs, structure) == truth
        by_cell = pd.Series(correct).groupby(wells["cell_type"].to_numpy()).mean()
        accuracy[mode] = {"overall": float(correct.mean()),
                          "per_cell_type": {c: float(a) for c, a in by_cell.items()}}
    result = {"accuracy": accuracy}
    if structure is not None:
        group_of = np.zeros(data.n_treatments, int)
        for g, members in enumerate(structure.groups):
            group_of[members] = g
        right = pd.Series(structure.infer_groups(wells, probs) == group_of[truth]).groupby(
            plate_key(wells).to_numpy()).all()
        result["plate_groups_correct"] = f"{int(right.sum())}/{len(right)}"
    return result
