"""Progressive pseudo-labelling, as the 1st-place solution did it, built to cross stages.

At the start of each epoch from `pseudo.start_epoch` on, the current model predicts the test
wells; the per-plate assignment (plates.py) gives every well one siRNA, at most once per plate;
the most confident `fraction` of those wells join the training set with that label. The
fraction grows by `fraction_per_epoch` each epoch up to `max_fraction`.

The chosen set is part of the checkpoint, so the next stage trains on exactly what this one
chose; it is never recomputed on resume. It is stored as plain lists, not as a DataFrame: a
pickled DataFrame only loads under a pandas that reads the writer's dtypes (pandas 2.2 cannot
read pandas 3's strings), and a checkpoint must resume on Kaggle's image too.
"""
import numpy as np
import pandas as pd

from rcic.inference import site_probabilities
from rcic.plates import PlateStructure, plate_step
from rcic.tta import views


def schedule_fraction(pseudo_cfg, epoch):
    """Share of the test wells used as pseudo-labels in `epoch` (0 before start_epoch)."""
    if not pseudo_cfg.enabled or epoch < pseudo_cfg.start_epoch:
        return 0.0
    grown = pseudo_cfg.fraction_per_epoch * (epoch - pseudo_cfg.start_epoch + 1)
    return min(pseudo_cfg.max_fraction, grown)


def choose_pseudo_labels(model, data, recipe, cell_types, device, fraction, batch_size, stop=None):
    """DataFrame id_code, sirna, confidence: the most confident assigned test wells. `stop()` is
    asked before each batch of the pass over the test set (rcic.budget.interruptible)."""
    sites = data.test_sites(recipe.data.cell_types)
    wells = sites.drop_duplicates("id_code").reset_index(drop=True)
    well_of, _ = pd.factorize(sites["id_code"])           # rows in the order of `wells`
    probs = site_probabilities(model, recipe, cell_types, data, sites, views(1), batch_size,
                               device, cache=recipe.data.cache, label="pseudo-labels",
                               average_by=well_of, stop=stop)
    structure = PlateStructure.learn(data.wells, data.n_treatments)
    sirna = plate_step("assign", wells, probs, structure)
    confidence = probs[np.arange(len(wells)), sirna]
    keep = int(round(fraction * len(wells)))
    # Stable order: equal confidences are broken by the wells' order, never by chance.
    chosen = np.argsort(-confidence, kind="stable")[:keep]
    return pd.DataFrame({"id_code": wells["id_code"].to_numpy()[chosen],
                         "sirna": sirna[chosen].astype(int),
                         "confidence": confidence[chosen].astype(float)})


def labels_to_lists(labels):
    """{column: list of plain values} of a pseudo-label DataFrame (None stays None)."""
    if labels is None:
        return None
    return {"id_code": [str(code) for code in labels["id_code"]],
            "sirna": [int(sirna) for sirna in labels["sirna"]],
            "confidence": [float(c) for c in labels["confidence"]]}


def labels_from_lists(columns):
    """The DataFrame labels_to_lists was given (None stays None)."""
    if columns is None:
        return None
    return pd.DataFrame({"id_code": pd.Series(columns["id_code"], dtype=object).astype(str),
                         "sirna": pd.Series(columns["sirna"], dtype="int64"),
                         "confidence": pd.Series(columns["confidence"], dtype="float64")})


def pseudo_sites(data, labels):
    """Both sites of every pseudo-labelled well, with the pseudo siRNA as its label."""
    if labels is None or len(labels) == 0:
        return data.sites.iloc[:0]
    sites = data.sites[data.sites["id_code"].isin(labels["id_code"])].copy()
    sites["sirna"] = sites["id_code"].map(dict(zip(labels["id_code"], labels["sirna"])))
    return sites
