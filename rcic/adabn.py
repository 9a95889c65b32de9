"""Per-plate batch statistics at prediction (AdaBN): each test plate seen through its own BatchNorm.

Every plate of RxRx1 carries its own batch effect. A model trained on plate-homogeneous batches
(recipe data.plate_batches) has only ever normalised its features with one plate's statistics
at a time; its running statistics, an average over many training plates, describe no plate at
all. AdaBN (the 5th-place solution) re-estimates every BatchNorm layer's mean and variance from
the plate about to be predicted, predicts it, and puts the trained statistics back so that no
plate leaks into the next.

Not `torch.optim.swa_utils.update_bn`: it puts the whole model in train mode, so dropout (and
EfficientNet's drop-connect) would disturb what later layers see, and it calls model(x) with
one input where RcicModel also takes the cell type.
"""
import contextlib

from rcic.data.layout import plate_key

MODES = ("auto", "on", "off")


def use_adabn(mode, recipe):
    """Whether weights trained with `recipe` predict with per-plate statistics under `mode`.

    auto follows the recipe: on for weights trained on plate batches (data.plate_batches),
    whose BatchNorm only ever saw one plate at a time; off for weights trained on mixed
    batches, whose running statistics describe the mixed batches they were trained on.
    """
    return recipe.data.plate_batches if mode == "auto" else mode == "on"


def batchnorm_layers(model):
    """The BatchNorm layers that keep running statistics (the others always use the batch's)."""
    # torch is imported where it is used: rcic-predict reads MODES before it pays for torch.
    from torch.nn.modules.batchnorm import _BatchNorm
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def plate_statistics(model, inputs):
    """Inside the block, `model` (in eval mode) normalises with the statistics of `inputs`.

    `inputs`: (images, cell_type) pairs of one plate, on the model's device and normalised as
    for prediction; run the block under the same autocast as the prediction. Each layer's new
    statistics are the cumulative average over the batches (momentum None): with one batch they
    are exactly that batch's mean and unbiased variance; with several equal batches the mean is
    the plate's and the variance the mean within-batch variance. On exit every layer gets its
    trained statistics and momentum back, and the model its train/eval mode.
    """
    import torch
    layers = batchnorm_layers(model)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in layers]
    was_training = model.training
    try:
        model.eval()                 # dropout and drop-connect off ...
        for m in layers:             # ... and only BatchNorm measures the batches
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for images, cell_type in inputs:
                model(images, cell_type)
        for m in layers:
            m.eval()
        yield model
    finally:
        with torch.no_grad():
            for m, (momentum, mean, var, count) in zip(layers, saved):
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.train(was_training)


def plate_rows(sites):
    """Row positions of `sites` grouped by plate (experiment, plate), in order of appearance."""
    key = plate_key(sites).to_numpy()
    return list(sites.reset_index(drop=True).groupby(key, sort=False).indices.values())
