"""expand_cache: a kernel's attached zlib caches (one per split) become one raw cache on local
disk, the same site for site as a cache built from the PNGs; damaged or overlapping inputs are
one line; a scratch disk too small for the expanded cache falls back to reading in place."""
import subprocess

import numpy as np
import pytest

from rcic.data.cache import CHUNKS, MANIFEST, build_cache, expand_cache, open_cache
from rcic.data.layout import RxRx1
from rcic.errors import UserError
from rcic.kaggle.scratch import SCRATCH_ENV, expand_attached


@pytest.fixture(scope="module")
def split_caches(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    data = RxRx1(tiny_data)
    return data, {split: build_cache(data, root / split, 16, workers=1, progress=False,
                                     format="zlib", split=split) for split in ("train", "test")}


def test_train_and_test_caches_expand_into_one_raw_cache(split_caches, tmp_path):
    data, caches = split_caches
    out = expand_cache([caches["train"], caches["test"]], data, tmp_path / "local", 16,
                       workers=1, progress=False)
    expanded = open_cache(out, data, 16)
    assert expanded.format == "raw" and expanded.split is None
    direct = open_cache(build_cache(data, tmp_path / "direct", 16, workers=1, progress=False),
                        data, 16)
    assert len(expanded) == len(direct) == len(data.sites)
    for row in data.sites.itertuples(index=False):
        site = (row.id_code, row.site)
        assert np.array_equal(expanded.read(*site), direct.read(*site))
    only_train = open_cache(expand_cache([caches["train"]], data, tmp_path / "t", 16, workers=1,
                                         progress=False), data, 16)
    assert only_train.split == "train" and len(only_train) == (data.sites["split"] == "train").sum()


def test_overlapping_or_damaged_sources_are_one_line(split_caches, tmp_path):
    data, caches = split_caches
    with pytest.raises(UserError, match="overlap"):
        expand_cache([caches["train"], caches["train"]], data, tmp_path / "a", 16, progress=False)
    damaged = tmp_path / "damaged"
    build_cache(data, damaged, 16, workers=1, progress=False, format="zlib", split="test")
    chunk = sorted((damaged / CHUNKS).glob("*.zlib"))[0]
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="fails its checksum") as err:
        expand_cache([caches["train"], damaged], data, tmp_path / "b", 16, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 kB file system (tmpfs), where the OS lets this process mount one."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_scratch_disk_too_small_reads_the_cache_in_place(split_caches, small_disk,
                                                           monkeypatch):
    data, caches = split_caches
    monkeypatch.setenv(SCRATCH_ENV, str(small_disk))
    manifests = [caches[s] / MANIFEST for s in ("train", "test")]
    lines = []
    folder, report = expand_attached(manifests[:1], data, 16, "rcic stage 1", lines.append)
    assert folder == caches["train"] and report["expanded"] is False
    assert len(lines) == 1 and "do not fit" in lines[0] and "reading the compressed cache" \
        in lines[0]
    # Two caches cannot be read in place as one: one line naming the fix.
    with pytest.raises(UserError, match=f"set {SCRATCH_ENV} to a larger local disk"):
        expand_attached(manifests, data, 16, "rcic stage 1", lines.append)
    assert list(small_disk.iterdir()) == []
