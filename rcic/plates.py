"""The plate structure of RxRx1, learnt from train and used to correct test predictions.

The treatments fall into 4 fixed, disjoint groups; each plate holds one group, each siRNA of
it once; which group sits on which plate is a cyclic rotation per experiment
(docs/rxrx1-and-kaggle.md).
So for a test plate, once we know its group, 3/4 of the classes are impossible (`mask`), and
the wells of the plate must take *different* siRNAs of the group (`assign`: a linear
assignment on log-probabilities, solved exactly by scipy).

Nothing here is specific to 1,108 classes: groups are read off the train plates.
"""
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rcic.data.layout import plate_key
from rcic.errors import UserError

N_GROUPS = 4
MODES = ("assign", "mask", "off")


@dataclass
class PlateStructure:
    """`groups[g]`: the sorted siRNAs of group g. When `cyclic`, the groups are in rotation
    order: an experiment with rotation r holds groups[(plate - 1 + r) % 4] on each plate."""
    groups: list
    cyclic: bool
    train_rotations: dict          # train experiment -> its rotation (empty when not cyclic)

    @classmethod
    def learn(cls, wells, n_treatments):
        """Read the groups and their rotation order off the train treatment wells."""
        train = wells[(wells["split"] == "train") & (wells["well_type"] == "treatment")]
        plate_ids, plates = pd.factorize(pd.MultiIndex.from_frame(train[["experiment", "plate"]]))
        sirna = train["sirna"].to_numpy()
        # Bipartite graph siRNA -- plate: its connected components are the groups, because
        # two siRNAs on one plate are in one group and each plate holds a single group.
        n = n_treatments + len(plates)
        graph = coo_matrix((np.ones(len(train)), (sirna, n_treatments + plate_ids)), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        unseen = sorted(set(range(n_treatments)) - set(sirna.tolist()))
        labels = sorted(set(component[:n_treatments]))
        if unseen or len(labels) != N_GROUPS:
            reason = (f"siRNA {unseen[0]} never occurs on a train plate" if unseen else
                      f"train plates form {len(labels)} siRNA group(s), not {N_GROUPS}")
            raise UserError(f"cannot learn the plate structure from train.csv: {reason}; "
                            f"predict with --plates off")
        table = pd.Series(component[n_treatments:], index=plates).unstack()   # experiment x plate
        order, rotations = _rotation_order(table)
        if order is None:    # no complete experiment, or not one cyclic order: plates alone
            order, rotations = labels, {}
        groups = [np.flatnonzero(component[:n_treatments] == g) for g in order]
        return cls(groups, cyclic=bool(rotations), train_rotations=rotations)

    def membership(self, n_treatments):
        """(n_treatments, 4) 0/1 matrix: siRNA s is in group g."""
        m = np.zeros((n_treatments, N_GROUPS))
        for g, members in enumerate(self.groups):
            m[members, g] = 1.0
        return m

    def infer_groups(self, wells, probs):
        """The group of every test well's plate, from predicted treatment probabilities.

        A plate's evidence for group g is the probability mass its wells put on g's siRNAs
        (a sum of probabilities, so one confidently wrong well cannot outvote the plate). With
        a cyclic structure one rotation per experiment is chosen from all its plates jointly:
        4 plates agree on 1 of 4 rotations, far more robust than 4 separate votes.
        """
        mass = probs @ self.membership(probs.shape[1])                 # (wells, 4)
        key = pd.MultiIndex.from_arrays([wells["experiment"].to_numpy(),
                                         wells["plate"].to_numpy()])
        plate_mass = pd.DataFrame(mass, index=key).groupby(level=[0, 1]).sum()
        chosen = {}
        for exp, part in plate_mass.groupby(level=0):
            plates = part.index.get_level_values(1).to_numpy()
            scores = part.to_numpy()                                    # (plates, 4)
            if self.cyclic:
                r = max(range(N_GROUPS), key=lambda r: scores[
                    np.arange(len(plates)), (plates - 1 + r) % N_GROUPS].sum())
                chosen.update({(exp, p): (p - 1 + r) % N_GROUPS for p in plates})
            else:
                chosen.update({(exp, p): int(s.argmax()) for p, s in zip(plates, scores)})
        return np.array([chosen[k] for k in key])


def _rotation_order(table):
    """(groups in rotation order, rotation per experiment), read off a (experiment x plate)
    table of group labels; (None, {}) unless every experiment is one rotation of that order."""
    complete = table.dropna()
    if table.shape[1] != N_GROUPS or complete.empty:
        return None, {}
    order = [int(g) for g in complete.iloc[0]]    # rotation 0 := the first complete experiment
    if len(set(order)) != N_GROUPS:
        return None, {}
    rotations = {}
    for exp, row in table.iterrows():
        # plate p holds order[(p - 1 + r) % 4], so each plate implies r = position - (p - 1)
        shifts = {(order.index(int(g)) - (int(p) - 1)) % N_GROUPS for p, g in row.dropna().items()}
        if len(shifts) != 1:
            return None, {}
        rotations[exp] = shifts.pop()
    return order, rotations


def assign_plate(log_probs, members):
    """Best siRNA of `members` per well, each used at most once (or evenly when wells outnumber
    them): a rectangular linear assignment maximising the summed log-probability."""
    n_wells, k = log_probs.shape[0], len(members)
    repeats = -(-n_wells // k)                  # ceil: a 278th well must still get a class
    cost = -np.tile(log_probs[:, members], (1, repeats))
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(n_wells, int)
    out[rows] = members[cols % k]
    return out


def plate_step(mode, wells, probs, structure):
    """Predicted siRNA per test well: argmax (`off`), argmax within the plate's group
    (`mask`), or the per-plate assignment (`assign`). `probs`: (wells, n_treatments)."""
    if mode not in MODES:
        raise UserError(f"--plates {mode}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return probs.argmax(axis=1)
    group = structure.infer_groups(wells, probs)
    log_probs = np.log(np.clip(probs, 1e-45, None))
    pred = np.empty(len(probs), int)
    for _, rows in pd.Series(np.arange(len(probs))).groupby(plate_key(wells).to_numpy()):
        rows = rows.to_numpy()
        members = structure.groups[group[rows[0]]]
        if mode == "mask":
            pred[rows] = members[log_probs[np.ix_(rows, members)].argmax(axis=1)]
        else:
            pred[rows] = assign_plate(log_probs[rows], members)
    return pred
