"""From sites on disk to a batch on the device: Dataset, resumable sampler, transforms, normalisation.

One batch's path, in order:
1. `EpochBatchSampler` yields lists of (epoch, position) keys: the permutation of an epoch is a
   pure function of (seed, epoch), and a resumed stage starts at the saved position.
2. `SiteDataset[(epoch, position)]` reads one site as uint8 (6, S, S) from the decoded-image
   cache or the PNGs, then augments it with albumentations seeded by (seed, epoch, sample), so
   the pixels are the same whichever worker process produced them.
3. The DataLoader stacks uint8 batches (4x smaller than float to copy to the GPU).
4. `Normalizer` (on the device) turns uint8 into float, standardised per image, experiment or
   plate, which removes most of the batch effect between experiments.
"""
import os
import random
import signal

# albumentations asks PyPI for a newer release when imported: a wait for a network timeout in an
# offline Kaggle kernel, and a warning rcic has no use for. A user's own setting wins. (It is
# imported only by runs that augment, in build_augment.)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rcic.data.images import decode_site
from rcic.data.layout import plate_key
from rcic.errors import UserError


def site_reader(data, recipe, verify=True):
    """`read(row) -> uint8 (6,S,S)`: the cache when the recipe names one, else the PNGs.
    verify=False skips re-reading every byte of a cache another dataset has just verified."""
    size = recipe.data.image_size
    if recipe.data.cache:
        from rcic.data.cache import open_cache   # only runs that use a cache need it
        cache = open_cache(recipe.data.cache, data, size, verify=verify)
        return lambda row: cache.read(row.id_code, row.site)
    return lambda row: decode_site(data.paths(row), size, data.image_size)


def build_augment(name):
    """6-channel augmentations; every one of these keeps uint8 and works on (H, W, 6)."""
    if name == "none":
        return None
    # Imported here: its 1-2 s of imports are paid only by runs that augment, not by prediction.
    import albumentations as A
    geometric = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]
    if name == "light":
        return A.Compose(geometric)
    if name != "default":
        raise UserError(f"data.augment {name!r} is unknown: use default, light or none")
    return A.Compose(geometric + [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-30, 30), p=0.5),
        # Per-channel gain: mimics the stain intensity drift the winners augmented against.
        A.MultiplicativeNoise(multiplier=(0.85, 1.15), per_channel=True, elementwise=False, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                        hole_width_range=(0.05, 0.15), p=0.3),
    ])


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample in one epoch: independent of worker and batch."""
    return np.random.SeedSequence([seed, epoch, index]).generate_state(2)


class SiteDataset(Dataset):
    """Sites of one split. Keys are (epoch, index) pairs, or plain indices for evaluation."""

    def __init__(self, data, sites, recipe, train, cell_types=None, verify_cache=True):
        self.sites = sites.reset_index(drop=True)
        self.recipe = recipe
        self.read = site_reader(data, recipe, verify_cache)
        self.augment = build_augment(recipe.data.augment) if train else None
        self.seed = recipe.train.seed
        self.labels = data.class_index(self.sites["sirna"].to_numpy())
        self.labels[self.sites["sirna"].to_numpy() < 0] = -1
        self.cell_types = list(cell_types or sorted(data.wells["cell_type"].unique()))
        self.cell_type_ids = self.sites["cell_type"].map(
            {c: i for i, c in enumerate(self.cell_types)}).fillna(-1).astype(int).to_numpy()
        self.norm_keys, self.norm_idx = norm_keys(self.sites, recipe.data.normalization)
        self._rows = list(self.sites.itertuples(index=False))

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.read(self._rows[index])
        if self.augment is not None:
            state = sample_seed(self.seed, epoch, index)
            self.augment.set_random_state(np.random.default_rng(state),
                                          random.Random(int(state[0])))
            hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
            image = self.augment(image=hwc)["image"].transpose(2, 0, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": int(self.labels[index]),
            "cell_type": int(self.cell_type_ids[index]),
            "norm_idx": int(self.norm_idx[index]),
            "index": index,
        }


def norm_keys(sites, normalization):
    """The statistics group of every site: its experiment, its plate, or none (per image)."""
    if normalization == "image":
        return [], np.zeros(len(sites), int)
    if normalization == "experiment":
        keys = sites["experiment"]
    elif normalization == "plate":
        keys = plate_key(sites)
    else:
        raise UserError(f"data.normalization {normalization!r} is unknown: use image, "
                        f"experiment or plate")
    names = sorted(keys.unique())
    return names, keys.map({k: i for i, k in enumerate(names)}).to_numpy()


class Normalizer(torch.nn.Module):
    """uint8 batch on the device -> float32, standardised per channel within its group."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.per_image = mean is None
        if not self.per_image:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    @classmethod
    def for_dataset(cls, data, dataset):
        normalization = dataset.recipe.data.normalization
        if normalization == "image":
            return cls()
        stats = data.channel_stats(normalization)
        mean = np.stack([stats[k][0] for k in dataset.norm_keys])
        std = np.stack([stats[k][1] for k in dataset.norm_keys])
        return cls(mean, std)

    def forward(self, images, norm_idx):
        x = images.float()
        if self.per_image:
            mean = x.mean(dim=(2, 3), keepdim=True)
            std = x.std(dim=(2, 3), keepdim=True).clamp_min(1.0)
        else:
            mean = self.mean[norm_idx][:, :, None, None]
            std = self.std[norm_idx][:, :, None, None]
        return (x - mean) / std


class EpochBatchSampler(Sampler):
    """Micro-batches of (epoch, index) keys for one epoch, starting at micro-batch `start`.

    The order is a pure function of (seed, epoch), so a stage that stopped after micro-batch k
    of an epoch resumes with micro-batch k+1 of the very same order. With `groups` (e.g. plate
    ids), every micro-batch is drawn from a single group (AdaBN-style plate batches).

    The micro-batches are the recipe's, whatever the number of processes: with `world` of them,
    rank r takes the r-th of `world` equal shares of every micro-batch (`world` must divide
    `batch_size`). So a position in the epoch means the same samples on 1, 2 or N processes, and
    a checkpoint resumes on any of them at the next unseen sample.
    """

    def __init__(self, n, batch_size, seed, epoch, start=0, groups=None, world=1, rank=0,
                 limit=None):
        if batch_size % world:
            raise ValueError(f"{world} processes cannot share micro-batches of {batch_size}")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.groups, self.world, self.rank = start, groups, world, rank
        self.limit = limit            # at most this many micro-batches (a fixed epoch length)
        self.batches = self._epoch_batches()

    def _epoch_batches(self):
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        if self.groups is None:
            order = rng.permutation(self.n)
            batches = [order[i:i + self.batch_size]
                       for i in range(0, self.n - self.batch_size + 1, self.batch_size)]
        else:
            # The members of each group, groups in sorted order, each in ascending index order:
            # one sort, where a comparison per group would cost plates x sites string compares
            # (seconds at full size, paid at every epoch's start).
            codes = np.unique(self.groups, return_inverse=True)[1]
            order = np.argsort(codes, kind="stable")
            batches = []
            for members in np.split(order, np.cumsum(np.bincount(codes))[:-1]):
                members = rng.permutation(members)
                batches += [members[i:i + self.batch_size]
                            for i in range(0, len(members) - self.batch_size + 1, self.batch_size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[:self.limit]

    def __len__(self):
        return max(0, len(self.batches) - self.start)

    def __iter__(self):
        share = self.batch_size // self.world
        for batch in self.batches[self.start:]:
            yield [(self.epoch, int(i)) for i in batch[self.rank * share:(self.rank + 1) * share]]


def ignore_stop_signals(_worker_id):
    """Workers leave SIGTERM/SIGINT to the main process, which finishes the step and saves;
    a worker killed by a group-wide signal would make the main process fail instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_sampler=None, batch_size=64, num_workers=0, pin_memory=False,
                generator=None):
    """A DataLoader for training (with a batch sampler) or evaluation (in order)."""
    common = dict(num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                  worker_init_fn=ignore_stop_signals if num_workers else None,
                  persistent_workers=False, prefetch_factor=4 if num_workers else None)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
