"""The inference core: a model's probabilities for a set of sites, views x sites.

Shared by prediction (predict.py: checkpoints -> submission) and pseudo-labelling (pseudo.py:
the model being trained -> labels for test wells). It changes none of its arguments: the model
comes back in the train/eval mode it had, the recipe and the sites are only read.

Probabilities are over the treatment classes (softmax of the first n_treatments scores,
controls dropped), averaged over the TTA views of each site; predict.py explains why.
"""
import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from rcic.adabn import plate_rows, plate_statistics
from rcic.data.dataset import Normalizer, SiteDataset, make_loader
from rcic.errors import UserError
from rcic.weights import load_weights


@dataclasses.dataclass
class Member:
    """One checkpoint of an ensemble and the cell types it predicts."""
    path: Path
    model: torch.nn.Module
    recipe: object
    meta: dict

    @property
    def specialist(self):
        return bool(self.recipe.data.cell_types)

    @property
    def cell_types(self):
        return list(self.recipe.data.cell_types) or list(self.meta["cell_types"])


def load_member(path, data, device):
    """The weights file at `path` as a Member on `device`; refuses weights of other classes."""
    model, recipe, meta = load_weights(path, device)
    if meta["n_treatments"] != data.n_treatments:
        raise UserError(f"weights {path} were trained with {meta['n_treatments']} treatment "
                        f"classes but {data.root} has {data.n_treatments}: predict with weights "
                        f"trained on this data")
    return Member(Path(path), model, recipe, meta)


def view_probabilities(model, x, cell_type, views, n_treatments):
    """Mean over TTA views of the softmax over the treatment classes, [B, n_treatments]."""
    total = 0
    for view in views:
        scores = model.logits(model(view.apply(x), cell_type)).float()
        total = total + torch.softmax(scores[:, :n_treatments], dim=1)
    return total / len(views)


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def site_probabilities(model, recipe, cell_types, data, sites, views, batch_size, device,
                       workers=0, cache="", adabn=False, label="predict"):
    """Probabilities of every row of `sites`, [len(sites), n_treatments] float32.

    recipe: the one the model was trained with (image size, normalization, AMP); its own
    cache path belongs to the machine that trained it, so `cache` (this data's decoded-image
    cache, or "" for the PNGs) is used instead. cell_types: the model's cell-type embedding order.
    adabn: predict plate by plate, each with BatchNorm statistics of its own images (adabn.py);
    the plate's images are then read twice, once to measure them and once to predict.
    """
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, cache=cache))
    dataset = SiteDataset(data, sites, recipe, train=False, cell_types=cell_types)
    normalize = Normalizer.for_dataset(data, dataset).to(device)
    amp = device.type == "cuda" and recipe.optim.amp

    def inputs(rows):
        """(batch, normalised images, cell types) of the given rows, batch by batch."""
        loader = make_loader(Subset(dataset, rows), batch_size=batch_size, num_workers=workers,
                             pin_memory=device.type == "cuda")
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            x = normalize(images, batch["norm_idx"].to(device))
            yield batch, x, batch["cell_type"].to(device)

    out = np.zeros((len(sites), data.n_treatments), np.float32)
    parts = plate_rows(sites) if adabn else [np.arange(len(sites))]
    with tqdm(total=len(sites), unit="site", desc=label, disable=None, leave=False) as bar, \
            eval_mode(model), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        for rows in parts:
            own_statistics = (plate_statistics(model, ((x, c) for _, x, c in inputs(rows)))
                              if adabn else contextlib.nullcontext())
            with own_statistics:
                for batch, x, cell_type in inputs(rows):
                    probs = view_probabilities(model, x, cell_type, views, data.n_treatments)
                    out[batch["index"].numpy()] = probs.float().cpu().numpy()
                    bar.update(len(x))
    return out


def well_probabilities(sites, site_probs, id_codes):
    """Mean over the sites of each well, in the order of `id_codes`."""
    frame = pd.DataFrame(site_probs).groupby(sites["id_code"].to_numpy()).mean()
    return frame.reindex(id_codes).to_numpy(np.float32)
