import numpy as np
import pandas as pd
import pytest

from rcic.errors import UserError
from rcic.plates import PlateStructure, assign_plate, plate_step

N = 40                                          # 4 groups of 10 treatments, as rcic-synth
GROUPS = [np.sort(g) for g in np.random.default_rng(0).permutation(N).reshape(4, -1)]


def crafted_wells(rotations, split):
    """Wells of experiments whose plate p holds GROUPS[(p - 1 + r) % 4]."""
    rows = []
    for exp, r in rotations.items():
        for plate in (1, 2, 3, 4):
            for sirna in GROUPS[(plate - 1 + r) % 4]:
                rows.append((f"{exp}_{plate}_{sirna}", exp, plate, split,
                             int(sirna) if split == "train" else -1, "treatment"))
    return pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "split", "sirna",
                                       "well_type"])


def truth(rotations):
    return np.concatenate([GROUPS[(p - 1 + r) % 4] for r in rotations.values() for p in (1, 2, 3, 4)])


TRAIN = crafted_wells({"A-01": 1, "A-02": 0, "B-01": 2}, "train")     # 3 of the 4 rotations


def learnt():
    return PlateStructure.learn(TRAIN, N)


def test_learns_the_groups_in_rotation_order_and_each_train_rotation():
    s = learnt()
    assert s.cyclic
    # rotation 0 is defined by the first complete experiment (A-01, rotation 1 in GROUPS terms)
    assert [list(g) for g in s.groups] == [list(GROUPS[(i + 1) % 4]) for i in range(4)]
    assert s.train_rotations == {"A-01": 0, "A-02": 3, "B-01": 1}


def test_learn_refuses_a_train_set_without_four_groups():
    broken = TRAIN.copy()
    # row 0 is on A-01 plate 1 (group 1); a siRNA of group 0 there merges the two groups
    broken.loc[0, "sirna"] = int(GROUPS[0][0])
    with pytest.raises(UserError, match="not 4.*--plates off"):
        PlateStructure.learn(broken, N)
    # siRNAs 40..43 never occur in train: left out of every group, not an error
    assert [list(g) for g in PlateStructure.learn(TRAIN, N + 4).groups] == \
        [list(g) for g in learnt().groups]


def test_not_cyclic_when_train_plates_break_the_rotation():
    swapped = TRAIN.copy()
    a02 = swapped["experiment"] == "A-02"
    plate1, plate2 = a02 & (swapped["plate"] == 1), a02 & (swapped["plate"] == 2)
    swapped.loc[plate1, "plate"], swapped.loc[plate2, "plate"] = 2, 1   # groups 0,1 swapped
    s = PlateStructure.learn(swapped, N)
    assert not s.cyclic and s.train_rotations == {}
    assert sorted(map(tuple, s.groups)) == sorted(map(tuple, GROUPS))


def noisy_probs(sirnas, rng, signal):
    """Probabilities that put `signal` extra mass on the true class of each well."""
    p = rng.dirichlet(np.ones(N), size=len(sirnas))
    p[np.arange(len(sirnas)), sirnas] += signal
    return p / p.sum(axis=1, keepdims=True)


def test_infers_the_unseen_fourth_rotation_jointly_over_the_plates():
    rot = {"T-01": 3}                    # never seen in train, in GROUPS terms
    wells = crafted_wells(rot, "test")
    true = truth(rot)
    rng = np.random.default_rng(0)
    probs = noisy_probs(true, rng, 0.5)
    # Plate 4 is crafted to mislead: its wells point into another group entirely.
    p4 = (wells["plate"] == 4).to_numpy()
    wrong_group = GROUPS[(4 - 1 + 3 + 1) % 4]
    probs[p4] = 0.02
    probs[np.ix_(p4, wrong_group)] = 0.2
    probs /= probs.sum(axis=1, keepdims=True)
    s = learnt()
    group = s.infer_groups(wells, probs)
    inferred = [list(s.groups[g]) for g in group]
    assert inferred == [list(GROUPS[(p - 1 + 3) % 4]) for p in wells["plate"]]
    # Without the cyclic structure plate 4 alone follows its misleading evidence.
    s.cyclic = False
    alone = s.infer_groups(wells, probs)
    assert list(s.groups[alone[p4.argmax()]]) == list(wrong_group)
    assert (alone[~p4] == group[~p4]).all()


def test_assignment_is_a_permutation_per_plate_and_beats_argmax():
    rot = {"T-01": 3, "T-02": 1}
    wells = crafted_wells(rot, "test")
    true = truth(rot)
    probs = noisy_probs(true, np.random.default_rng(1), 0.06)    # a weak model
    s = learnt()
    off = plate_step("off", wells, probs, s)
    mask = plate_step("mask", wells, probs, s)
    assign = plate_step("assign", wells, probs, s)
    for (_, _), rows in wells.groupby(["experiment", "plate"]).groups.items():
        assert sorted(assign[rows]) == sorted(true[rows])         # a permutation of the group
        assert set(mask[rows]) <= set(true[rows])                  # only possible classes
    acc = {name: (pred == true).mean() for name, pred in
           {"off": off, "mask": mask, "assign": assign}.items()}
    assert acc["off"] < acc["mask"] < acc["assign"] and acc["assign"] > acc["off"] + 0.2, acc


def test_assignment_resolves_two_wells_that_argmax_to_the_same_sirna():
    members = np.array([3, 7])
    log_probs = np.log(np.array([[0.1, 0.1, 0.1, 0.6, 0.1, 0.1, 0.1, 0.3],
                                 [0.1, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1, 0.1]]))
    assert list(assign_plate(log_probs, members)) == [7, 3]


def test_assignment_handles_more_or_fewer_wells_than_group_members():
    rng = np.random.default_rng(2)
    members = np.array([1, 4, 6])
    fewer = assign_plate(np.log(rng.dirichlet(np.ones(8), size=2)), members)
    assert len(set(fewer)) == 2 and set(fewer) <= set(members)
    more = assign_plate(np.log(rng.dirichlet(np.ones(8), size=7)), members)
    counts = np.bincount(more, minlength=8)[members]
    assert counts.sum() == 7 and counts.max() <= 3 and set(more) <= set(members)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="--plates"):
        plate_step("maybe", TRAIN, np.ones((len(TRAIN), N)) / N, learnt())
