"""The inference core: views x sites -> probabilities, with none of its arguments changed."""
import numpy as np
import pandas as pd
import torch

from rcic.config import Recipe
from rcic.data.dataset import Normalizer, SiteDataset
from rcic.data.layout import RxRx1
from rcic.inference import site_probabilities
from rcic.models import create_model
from rcic.tta import views


def reference_probabilities(model, recipe, cell_types, data, sites, tta):
    """One site at a time, one view at a time: the plain definition of the core's output."""
    dataset = SiteDataset(data, sites, recipe, train=False, cell_types=cell_types)
    normalize = Normalizer.for_dataset(data, dataset)
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            x = normalize(item["image"][None], torch.tensor([item["norm_idx"]]))
            cell = torch.tensor([item["cell_type"]])
            per_view = [torch.softmax(model.logits(model(v.apply(x), cell))[:, :data.n_treatments],
                                      dim=1) for v in tta]
            out.append(torch.stack(per_view).mean(0)[0].numpy())
    return np.stack(out)


def test_core_gives_the_plain_probabilities_and_changes_none_of_its_arguments(tiny_data):
    data = RxRx1(tiny_data)
    recipe = Recipe()
    recipe.data.image_size = 16
    recipe.model.dropout = 0.5            # train mode would show: dropout changes the output
    cell_types = sorted(data.wells["cell_type"].unique())
    torch.manual_seed(0)
    model = create_model(recipe.model, data.n_treatments, len(cell_types))
    model.train()
    # The recipe names a cache of the machine that trained it; the core must not use it (it
    # does not exist here) nor write the one it is given into the recipe.
    recipe.data.cache = "/training-machine/cache"
    before = recipe.to_dict()
    sites = data.test_sites().iloc[::3]   # an index with gaps: rows are positions, not labels
    sites_before = sites.copy()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    tta = views(4)
    probs = site_probabilities(model, recipe, cell_types, data, sites, tta, batch_size=5,
                               device=torch.device("cpu"), cache="")

    assert recipe.to_dict() == before
    pd.testing.assert_frame_equal(sites, sites_before)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert probs.shape == (len(sites), data.n_treatments) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)

    model.eval()
    recipe.data.cache = ""
    expected = reference_probabilities(model, recipe, cell_types, data,
                                       sites.reset_index(drop=True), tta)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
