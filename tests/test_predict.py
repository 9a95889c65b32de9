import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from rcic.cli.predict import main as predict_main
from rcic.config import Recipe
from rcic.data.layout import RxRx1
from rcic.errors import UserError
from rcic.models import create_model
from rcic.inference import site_probabilities, view_probabilities
from rcic.predict import Ensemble, resolve_checkpoints
from rcic.submission import check_submission
from rcic.tta import VIEWS, views
from rcic.weights import save_weights

from helpers import run_main


def tiny_recipe(cell_types=(), onehot=True):
    recipe = Recipe()
    recipe.data.image_size = 16
    recipe.data.cell_types = list(cell_types)
    recipe.model.cell_type_onehot = onehot
    return recipe


def save_random_weights(path, data, cell_types=(), step=1, done=True, seed=0, n_treatments=None):
    """A weights.pt as a stage writes it, with an untrained tiny model."""
    torch.manual_seed(seed)
    recipe = tiny_recipe(cell_types)
    known = sorted(data.wells["cell_type"].unique())
    model = create_model(recipe.model, data.n_treatments, len(known))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, model, recipe, {"n_treatments": n_treatments or data.n_treatments,
                                       "num_classes": data.n_treatments, "cell_types": known,
                                       "step": step, "done": done})
    return path


def test_tta_over_the_whole_group_is_invariant_to_turning_the_input():
    torch.manual_seed(0)
    model = create_model(tiny_recipe().model, 12, 2).eval()
    x = torch.randn(3, 6, 16, 16)
    cell = torch.tensor([0, 1, 0])
    with torch.inference_mode():
        averaged = view_probabilities(model, x, cell, VIEWS, 8)
        turned = view_probabilities(model, torch.rot90(x, 1, dims=(2, 3)), cell, VIEWS, 8)
        single = view_probabilities(model, x, cell, views(1), 8)
        manual = sum(torch.softmax(model.logits(model(v.apply(x), cell))[:, :8], 1) for v in VIEWS) / 8
    assert averaged.shape == (3, 8)
    torch.testing.assert_close(averaged.sum(1), torch.ones(3))     # controls dropped, renormalised
    torch.testing.assert_close(averaged, manual)
    # the 8 views form a group: turning the input only permutes them, so the mean is unchanged
    torch.testing.assert_close(averaged, turned, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single, averaged)                     # and the views do matter


def test_both_sites_of_a_well_are_averaged_as_they_are_predicted(tiny_data):
    """average_by gives, per well, the mean of the per-site probabilities, in the order its
    codes name, sites shuffled so that a well's two sites fall in different batches."""
    data = RxRx1(tiny_data)
    recipe = tiny_recipe()
    cell_types = sorted(data.wells["cell_type"].unique())
    torch.manual_seed(0)
    model = create_model(recipe.model, data.n_treatments, len(cell_types))
    sites = data.test_sites().sample(frac=1, random_state=0).reset_index(drop=True)
    args = (model, recipe, cell_types, data, sites, views(2), 3, torch.device("cpu"))
    per_site = site_probabilities(*args)
    well_of, ids = pd.factorize(sites["id_code"])
    per_well = site_probabilities(*args, average_by=well_of)
    assert per_well.shape == (len(ids), data.n_treatments) and per_well.dtype == np.float32
    expected = pd.DataFrame(per_site).groupby(sites["id_code"].to_numpy()).mean().loc[ids]
    np.testing.assert_allclose(per_well, expected.to_numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(per_well[0], per_site[0])      # two different sites were averaged


def test_ensemble_gives_specialists_and_generalists_equal_weight():
    ens = Ensemble(3, 2)
    ens.add("generalist", np.array([0, 1, 2]), np.array([[1.0, 0], [1, 0], [1, 0]]))
    ens.add("generalist", np.array([0, 1, 2]), np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    ens.add("specialist", np.array([1]), np.array([[0.0, 1.0]]))
    ens.add("specialist", np.array([2]), np.array([[0.0, 1.0]]))
    ens.add("specialist", np.array([2]), np.array([[0.2, 0.8]]))
    np.testing.assert_allclose(ens.probabilities(), [[0.75, 0.25],      # generalists only
                                                     [0.375, 0.625],    # (0.75 + 0) / 2
                                                     [0.425, 0.575]])   # (0.75 + 0.1) / 2
    assert ens.covered().all()
    assert not Ensemble(2, 2).covered().any()


def test_auto_discovery_prefers_the_newest_finished_weights(tiny_data, tmp_path):
    data = RxRx1(tiny_data, check_images=False)
    done = save_random_weights(tmp_path / "runs" / "a" / "weights.pt", data, step=5, done=True)
    save_random_weights(tmp_path / "runs" / "b" / "weights.pt", data, step=9, done=False)
    assert resolve_checkpoints(None, [tmp_path / "runs"]) == [done]
    assert resolve_checkpoints([tmp_path / "runs" / "b"], []) == [tmp_path / "runs" / "b" / "weights.pt"]
    with pytest.raises(UserError, match="no weights.pt under"):
        resolve_checkpoints(None, [tmp_path / "empty"])
    with pytest.raises(UserError, match="--checkpoint"):
        resolve_checkpoints([tmp_path / "missing.pt"], [])


def rcic_predict(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["rcic-predict", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_writes_a_checked_submission_and_a_report(tiny_data, tmp_path):
    data = RxRx1(tiny_data, check_images=False)
    general = save_random_weights(tmp_path / "g" / "weights.pt", data, seed=1)
    huvec = save_random_weights(tmp_path / "h" / "weights.pt", data, cell_types=["HUVEC"], seed=2)
    out = tmp_path / "out" / "submission.csv"
    run = rcic_predict("--data", tiny_data, "--checkpoint", general, "--checkpoint", huvec,
                       "--out", out, "--tta", "2", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert check_submission(out, tiny_data) == len(pd.read_csv(tiny_data / "test.csv"))
    report = json.loads((out.parent / "predict_report.json").read_text())
    assert report["plates"] == "assign" and report["tta_views"] == ["identity", "hflip"]
    assert [c["cell_types"] for c in report["checkpoints"]] == [["HUVEC", "RPE"], ["HUVEC"]]
    assert set(report["accuracy"]) == {"off", "mask", "assign"}
    for acc in report["accuracy"].values():
        assert 0 <= acc["overall"] <= 1 and set(acc["per_cell_type"]) == {"HUVEC", "RPE"}
    assert "accuracy --plates assign" in run.stdout
    # the default plate step is the assignment: each siRNA at most once on a test plate
    sub = pd.read_csv(out)
    plate = sub["id_code"].str.rsplit("_", n=1).str[0]
    assert not sub.groupby(plate)["sirna"].apply(lambda s: s.duplicated().any()).any()


def test_cli_refuses_uncovered_cell_types_and_foreign_weights(tiny_data, tmp_path, capsys,
                                                              monkeypatch):
    # rcic-predict's main in this process (the test above runs it as a real process): its exit
    # status and its one line on stderr.
    def rcic_predict_here(*args):
        capsys.readouterr()
        status = run_main(predict_main, ["--data", tiny_data, *args])
        return status, capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    data = RxRx1(tiny_data, check_images=False)
    huvec = save_random_weights(tmp_path / "h" / "weights.pt", data, cell_types=["HUVEC"])
    out = tmp_path / "submission.csv"
    status, err = rcic_predict_here("--checkpoint", huvec, "--out", out)
    assert status == 2 and "no checkpoint predicts cell type(s) RPE" in err
    assert not out.exists()
    foreign = save_random_weights(tmp_path / "f" / "weights.pt", data, n_treatments=1108)
    status, err = rcic_predict_here("--checkpoint", foreign, "--out", out)
    assert status == 2 and "1108 treatment classes" in err
    status, err = rcic_predict_here("--out", out)                      # no runs/ here
    assert status == 2 and "no weights.pt under" in err
    assert err.count("\n") == 1
