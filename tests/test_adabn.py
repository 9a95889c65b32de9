"""Per-plate BatchNorm statistics (AdaBN): measured from the plate, restored afterwards, used by
rcic-predict plate by plate."""
import numpy as np
import pytest
import torch

from rcic.adabn import batchnorm_layers, plate_rows, plate_statistics, use_adabn
from rcic.config import Recipe
from rcic.data.layout import RxRx1
from rcic.errors import UserError
from rcic.models import create_model
from rcic.inference import load_member, site_probabilities
from rcic.predict import predict
from rcic.tta import views
from rcic.weights import save_weights


def tiny_model(dropout=0.0):
    """The tiny backbone (BatchNorm2d) with a neck (BatchNorm1d) and dropout before the head."""
    recipe = Recipe()
    recipe.model.neck, recipe.model.neck_dim, recipe.model.dropout = True, 16, dropout
    recipe.model.cell_type_onehot = True
    torch.manual_seed(0)
    return create_model(recipe.model, 8, 2)


def trained_statistics(model, batches=5):
    """Give every BatchNorm layer running statistics of clean data, as training would."""
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(torch.randn(8, 6, 16, 16, generator=torch.Generator().manual_seed(i)),
                  torch.zeros(8, dtype=torch.long))
    return model.eval()


def snapshot(model):
    return [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
             m.num_batches_tracked.clone()) for m in batchnorm_layers(model)]


def shifted_plate(n=12, gain=2.5, seed=100):
    """A clean plate and the same plate with a batch effect: every channel `gain` times brighter."""
    clean = torch.randn(n, 6, 16, 16, generator=torch.Generator().manual_seed(seed))
    return clean, clean * gain, torch.tensor([0, 1] * (n // 2))


def test_every_batchnorm_layer_takes_the_statistics_of_the_plate_batch():
    model = trained_statistics(tiny_model(dropout=0.5))
    layers = batchnorm_layers(model)
    assert len(layers) == 6                          # 4 in the backbone, 2 in the neck
    _, x, cell = shifted_plate()
    seen, dropout_training = {}, []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.__setitem__(m, inp[0].detach()))
             for m in layers]
    hooks.append(model.dropout.register_forward_hook(
        lambda m, inp, out: dropout_training.append(m.training)))
    with plate_statistics(model, [(x, cell)]):
        for h in hooks:
            h.remove()
        assert not model.training and not any(m.training for m in layers)
        for m in layers:
            inp = seen[m]
            dims = [0] if inp.ndim == 2 else [0, 2, 3]
            torch.testing.assert_close(m.running_mean, inp.mean(dims))
            torch.testing.assert_close(m.running_var, inp.var(dims, unbiased=True))
    assert dropout_training == [False]               # dropout stayed off while measuring


def test_several_batches_give_the_plate_mean():
    model = trained_statistics(tiny_model())
    _, x, cell = shifted_plate(n=12)
    first = batchnorm_layers(model)[0]
    with plate_statistics(model, [(x, cell)]):
        whole = first.running_mean.clone()
    with plate_statistics(model, [(x[:6], cell[:6]), (x[6:], cell[6:])]):
        # equal batches: the cumulative average of batch means is the plate mean (first layer:
        # its input does not depend on how earlier layers were normalised)
        torch.testing.assert_close(first.running_mean, whole)


@pytest.mark.parametrize("training", [False, True])
def test_the_trained_statistics_and_mode_come_back_even_after_an_error(training):
    model = trained_statistics(tiny_model())
    before = snapshot(model)
    model.train(training)
    _, x, cell = shifted_plate()
    with pytest.raises(RuntimeError, match="stop"):
        with plate_statistics(model, [(x, cell)]):
            assert not torch.equal(batchnorm_layers(model)[0].running_mean, before[0][1])
            raise RuntimeError("stop")
    with plate_statistics(model, [(x, cell)]):
        pass
    for (momentum, mean, var, count), m in zip(before, batchnorm_layers(model)):
        assert m.momentum == momentum == 0.1
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)
    assert model.training == training


def test_adapted_predictions_see_through_the_batch_effect_of_a_plate():
    model = trained_statistics(tiny_model())
    clean, shifted, cell = shifted_plate()

    def logits(x):
        with torch.no_grad():
            return model.logits(model(x, cell))

    plain_clean, plain_shifted = logits(clean), logits(shifted)
    with plate_statistics(model, [(shifted, cell)]):
        adapted_shifted = logits(shifted)
    with plate_statistics(model, [(clean, cell)]):
        adapted_clean = logits(clean)
    assert (adapted_shifted - plain_shifted).abs().max() > 0.5
    # With the trained statistics the brighter plate gets other predictions than the clean one;
    # with its own statistics the first BatchNorm divides the gain out (the convolution before
    # it is linear and has no bias), so the plate is predicted as if it were clean.
    moved_plain = (plain_shifted - plain_clean).abs().max()
    moved_adapted = (adapted_shifted - adapted_clean).abs().max()
    assert moved_plain > 0.01 and moved_adapted < 1e-4
    torch.testing.assert_close(logits(clean), plain_clean)   # nothing stayed adapted


def test_plate_rows_groups_sites_by_experiment_and_plate(tiny_data):
    sites = RxRx1(tiny_data).test_sites()
    parts = plate_rows(sites)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(sites)))
    for rows in parts:
        assert len(sites.iloc[rows][["experiment", "plate"]].drop_duplicates()) == 1
    assert len(parts) == len(sites[["experiment", "plate"]].drop_duplicates())


def test_auto_follows_the_recipe():
    recipe = Recipe()
    assert not use_adabn("auto", recipe) and use_adabn("on", recipe)
    recipe.data.plate_batches = True
    assert use_adabn("auto", recipe) and not use_adabn("off", recipe)


@pytest.fixture
def member(tiny_data, tmp_path):
    data = RxRx1(tiny_data)
    recipe = Recipe()
    recipe.data.image_size = 16
    cell_types = sorted(data.wells["cell_type"].unique())
    torch.manual_seed(0)
    model = trained_statistics(create_model(recipe.model, data.n_treatments, len(cell_types)))
    path = tmp_path / "weights.pt"
    save_weights(path, model, recipe, {"n_treatments": data.n_treatments,
                                       "num_classes": data.n_treatments,
                                       "cell_types": cell_types, "step": 1, "done": True})
    return data, load_member(path, data, torch.device("cpu"))


def test_prediction_adapts_each_plate_on_its_own(member):
    data, member = member
    sites = data.test_sites()
    state = {k: v.clone() for k, v in member.model.state_dict().items()}
    args = (member.model, member.recipe, member.meta["cell_types"], data)
    more = (views(2), 64, torch.device("cpu"))
    plain = site_probabilities(*args, sites, *more)
    adapted = site_probabilities(*args, sites, *more, adabn=True)
    assert not np.allclose(plain, adapted, atol=1e-4)
    # one plate predicted alone gets the same probabilities as inside the whole test set:
    # its statistics come from its own images only, and no other plate's stayed behind
    for rows in plate_rows(sites)[:2]:
        alone = site_probabilities(*args, sites.iloc[rows].reset_index(drop=True), *more,
                                   adabn=True)
        np.testing.assert_allclose(alone, adapted[rows], rtol=1e-5, atol=1e-6)
    for key, value in member.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    np.testing.assert_array_equal(site_probabilities(*args, sites, *more), plain)


def test_predict_reports_adabn_per_checkpoint_and_refuses_a_bad_mode(member, tmp_path):
    data, member = member
    out, cpu = tmp_path / "sub" / "submission.csv", torch.device("cpu")
    on = predict(data, [member.path], out, views(1), plates="off", device=cpu, adabn="on")
    auto = predict(data, [member.path], out, views(1), plates="off", device=cpu, adabn="auto")
    assert on["checkpoints"][0]["adabn"] is True and auto["checkpoints"][0]["adabn"] is False
    with pytest.raises(UserError, match="--adabn sometimes"):
        predict(data, [member.path], out, views(1), plates="off", device=cpu, adabn="sometimes")
