"""Dataset, sampler and normalisation: reproducible whatever the worker count, resumable."""
import numpy as np
import pytest
import torch

from rcic.config import Recipe
from rcic.data.dataset import EpochBatchSampler, Normalizer, SiteDataset, make_loader
from rcic.data.images import decode_site
from rcic.data.layout import RxRx1


def recipe(**data):
    r = Recipe()
    r.data.image_size = 16
    r.data.batch_size = 4
    for k, v in data.items():
        setattr(r.data, k, v)
    return r


def epoch_images(dataset, epoch, workers):
    sampler = EpochBatchSampler(len(dataset), 4, seed=3, epoch=epoch)
    loader = make_loader(dataset, batch_sampler=sampler, num_workers=workers)
    return torch.cat([b["image"] for b in loader]), torch.cat([b["index"] for b in loader])


def test_items_are_uint8_sites_with_labels(tiny_data):
    data = RxRx1(tiny_data)
    train, _ = data.split_sites()
    ds = SiteDataset(data, train, recipe(augment="none"), train=True)
    item = ds[5]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (6, 16, 16)
    row = train.iloc[5]
    assert np.array_equal(item["image"].numpy(), decode_site(data.paths(row), 16))
    assert item["label"] == row.sirna
    assert ds.cell_types[item["cell_type"]] == row.cell_type


def test_augmentation_is_identical_across_worker_counts(tiny_data):
    data = RxRx1(tiny_data)
    train, _ = data.split_sites()
    ds = SiteDataset(data, train, recipe(), train=True)
    a, ia = epoch_images(ds, epoch=1, workers=0)
    b, ib = epoch_images(ds, epoch=1, workers=2)
    assert torch.equal(ia, ib) and torch.equal(a, b)
    c, _ = epoch_images(ds, epoch=2, workers=0)
    assert not torch.equal(a, c)            # a new epoch draws new augmentations
    plain = SiteDataset(data, train, recipe(augment="none"), train=True)
    assert not torch.equal(a, torch.stack([plain[int(i)]["image"] for i in ia]))


def test_sampler_resumes_mid_epoch_in_the_same_order():
    full = [b for b in EpochBatchSampler(50, 4, seed=1, epoch=3)]
    resumed = [b for b in EpochBatchSampler(50, 4, seed=1, epoch=3, start=5)]
    assert resumed == full[5:]
    assert len(full) == 12                  # ceil(50 / 4)
    other = [b for b in EpochBatchSampler(50, 4, seed=1, epoch=4)]
    assert other != full


def test_plate_batches_hold_one_plate_and_shard_evenly():
    groups = np.repeat(np.arange(5), 9)
    for batch in EpochBatchSampler(len(groups), 4, seed=0, epoch=0, groups=groups):
        assert len({groups[i] for _, i in batch}) == 1
    # Two processes share every micro-batch: together they draw exactly what one process draws,
    # micro-batch by micro-batch, whatever the number of processes.
    one = list(EpochBatchSampler(45, 4, 0, 0, groups=groups))
    for world in (2, 4):
        ranks = [list(EpochBatchSampler(45, 4, 0, 0, groups=groups, world=world, rank=r))
                 for r in range(world)]
        assert all(len(r) == len(one) == 10 for r in ranks)
        for k, batch in enumerate(one):
            assert sorted(i for r in ranks for _, i in r[k]) == sorted(i for _, i in batch)
            assert all(len(r[k]) == 4 // world for r in ranks)
    with pytest.raises(ValueError, match="3 processes cannot share micro-batches of 4"):
        EpochBatchSampler(45, 4, 0, 0, world=3, rank=0)


def test_plate_batches_are_those_of_the_plain_per_group_definition():
    """The one-sort grouping draws exactly what a scan per group draws (resumes depend on it)."""
    rng = np.random.default_rng(3)
    groups = np.array([f"E-{g:02d}_{g % 4 + 1}" for g in rng.integers(0, 9, 700)], dtype=object)
    plain = np.random.default_rng([5, 2, 7919])
    expected = []
    for group in np.unique(groups):
        members = plain.permutation(np.flatnonzero(groups == group))
        expected += [members[i:i + 8] for i in range(0, len(members) - 7, 8)]
    expected = [expected[i] for i in plain.permutation(len(expected))]
    got = EpochBatchSampler(len(groups), 8, seed=5, epoch=2, groups=groups).batches
    assert len(got) == len(expected) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_normalizer_per_experiment_uses_pixel_stats(tiny_data):
    data = RxRx1(tiny_data)
    train, _ = data.split_sites()
    ds = SiteDataset(data, train, recipe(augment="none", normalization="experiment"), train=True)
    norm = Normalizer.for_dataset(data, ds)
    item = ds[0]
    mean, std = data.channel_stats("experiment")[train.iloc[0].experiment]
    x = norm(item["image"][None], torch.tensor([item["norm_idx"]]))
    expected = (item["image"].float() - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(x[0], expected, atol=1e-5)
    per_image = Normalizer()(item["image"][None], torch.zeros(1, dtype=torch.long))
    assert per_image.mean(dim=(2, 3)).abs().max() < 1e-4


def test_cache_and_png_paths_give_identical_batches(tiny_data, tmp_path):
    from rcic.data.cache import build_cache
    data = RxRx1(tiny_data)
    train, _ = data.split_sites()
    cache = build_cache(data, tmp_path / "cache", 12, workers=1, progress=False)
    from_png = SiteDataset(data, train, recipe(image_size=12), train=True)
    from_cache = SiteDataset(data, train, recipe(image_size=12, cache=str(cache)), train=True)
    assert from_png[0]["image"].shape == (6, 12, 12)
    for key in [(0, 0), (1, 3), (2, len(train) - 1)]:   # augmented, so (epoch, index) keys
        assert torch.equal(from_png[key]["image"], from_cache[key]["image"])
