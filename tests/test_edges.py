"""The edges of the data a quick run meets: too few experiments to split, and a train set that
covers only some siRNA ids. Real commands in subprocesses on tiny synthetic folders."""
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from helpers import tiny
from rcic.data.layout import RxRx1
from rcic.data.synthetic import SynthSpec, generate
from rcic.errors import UserError
from rcic.plates import PlateStructure, plate_step
from rcic.submission import check_submission

TINY_SETS = tiny(epochs=1, workers=0)


def command(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def one_experiment(tmp_path_factory):
    """One train experiment per cell type, as `rcic-synth --experiments 1` writes it."""
    spec = SynthSpec(n_classes=8, n_positive_controls=1, image_size=16, train_experiments=1,
                     test_experiments=1, cell_types=["HUVEC", "RPE"])
    return generate(tmp_path_factory.mktemp("one") / "data", spec)


def test_stage_with_one_train_experiment_per_cell_type_is_one_line_with_the_counts(
        one_experiment, tmp_path):
    out = tmp_path / "stage"
    run = command("rcic-stage", "--data", one_experiment, "--out", out, "--budget", "5m",
                  "--quiet", "--resume-from", "--set", *TINY_SETS, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert lines[0].startswith("rcic-stage: error: validation")
    assert "HUVEC 1, RPE 1" in lines[0] and "nothing is left to train on" in lines[0]
    assert "rcic-synth --experiments 2" in lines[0]
    assert "--set data.val_experiments=HUVEC-01" in lines[0]
    assert not (out / "weights.pt").exists()


def test_the_suggested_validation_choice_trains(one_experiment, tmp_path):
    """The fix the message names works: validate on HUVEC-01, train on RPE-01."""
    run = command("rcic-stage", "--data", one_experiment, "--out", tmp_path / "stage",
                  "--budget", "5m", "--quiet", "--resume-from", "--steps", "1",
                  "--set", *TINY_SETS, "data.val_experiments=HUVEC-01", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["global_step"] == 1


def test_split_names_validation_that_misses_the_trained_cell_types(one_experiment):
    data = RxRx1(one_experiment, check_images=False)
    with pytest.raises(UserError, match="holds none of the cell types trained"):
        data.split_sites(["HUVEC-01"], cell_types=["RPE"])
    with pytest.raises(UserError, match=r"RPE 1\).*\(rcic-synth --experiments 2\)$"):
        data.split_sites(None, cell_types=["RPE"])      # one experiment: nothing to suggest


# ------------------------------------------------------------------ siRNAs absent from train

def drop_train_sirnas(source, target, dropped):
    """A copy of `source` (images linked, not copied) whose train.csv lacks `dropped`."""
    target.mkdir()
    for entry in source.iterdir():
        (target / entry.name).symlink_to(entry)
    (target / "train.csv").unlink()
    train = pd.read_csv(source / "train.csv")
    train[~train["sirna"].isin(dropped)].to_csv(target / "train.csv", index=False)
    return target


def train_groups(data):
    return [set(map(int, g)) for g in PlateStructure.learn(data.wells, data.n_treatments).groups]


def two_unseen(data):
    """Two siRNAs of two different groups, neither the largest id (n_treatments stays 8):
    every group keeps members, as when a quick run trains on a subset of siRNAs."""
    return set([min(g) for g in train_groups(data) if min(g) != data.n_treatments - 1][:2])


def test_learn_leaves_out_siRNAs_never_seen_and_warns_once(tiny_data, caplog):
    data = RxRx1(tiny_data, check_images=False)
    full = PlateStructure.learn(data.wells, data.n_treatments)
    dropped = two_unseen(data)
    wells = data.wells[~((data.wells["split"] == "train") & data.wells["sirna"].isin(dropped))]
    with caplog.at_level("WARNING", logger="rcic"):
        part = PlateStructure.learn(wells, data.n_treatments)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("2 of the 8 siRNA ids never occur")
    assert part.cyclic == full.cyclic and part.train_rotations == full.train_rotations
    for mine, theirs in zip(part.groups, full.groups):
        assert list(mine) == [s for s in theirs if s not in dropped]
    # every plate step predicts only seen siRNAs, and assign still uses each at most once
    test = data.wells[(data.wells["split"] == "test") & (data.wells["well_type"] == "treatment")]
    test = test.reset_index(drop=True)
    probs = np.random.default_rng(0).dirichlet(np.ones(8), len(test)).astype(np.float32)
    probs[:, sorted(dropped)] += 1.0            # the unseen classes look best: never chosen
    for mode in ("mask", "assign"):
        assert not set(plate_step(mode, test, probs, part)) & dropped


def test_predict_default_plate_step_on_a_train_set_with_gaps(tiny_data, tmp_path):
    """rcic-stage then rcic-predict (default --plates assign) on data whose train siRNA ids
    skip two: a checked submission that predicts only siRNAs seen in training."""
    full = RxRx1(tiny_data, check_images=False)
    dropped = two_unseen(full)
    data_dir = drop_train_sirnas(tiny_data, tmp_path / "gaps", dropped)
    stage = command("rcic-stage", "--data", data_dir, "--out", tmp_path / "stage", "--budget",
                    "5m", "--quiet", "--resume-from", "--steps", "2", "--set", *TINY_SETS,
                    cwd=tmp_path)
    assert stage.returncode == 0, stage.stderr
    out = tmp_path / "submission.csv"
    run = command("rcic-predict", "--data", data_dir, "--checkpoint", tmp_path / "stage",
                  "--out", out, "--tta", "2", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "2 of the 8 siRNA ids never occur in train.csv" in run.stderr
    assert check_submission(out, data_dir) == len(pd.read_csv(data_dir / "test.csv"))
    sub = pd.read_csv(out)
    assert not set(sub["sirna"]) & dropped
    # each plate takes siRNAs of one group, all different until the group's seen ones run out
    seen_groups = [g - dropped for g in train_groups(full)]
    for _, plate in sub.groupby(sub["id_code"].str.rsplit("_", n=1).str[0])["sirna"]:
        group = next(g for g in seen_groups if plate.iloc[0] in g)
        assert set(plate) <= group and plate.nunique() == min(len(plate), len(group))
    report = json.loads((tmp_path / "predict_report.json").read_text())
    assert report["plates"] == "assign" and set(report["accuracy"]) == {"off", "mask", "assign"}
