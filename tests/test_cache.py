"""The decoded-image cache: identical pixels, resume after a real SIGKILL, refusal when damaged."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rcic.cli.cache import main as cache_main
from rcic.data.cache import MANIFEST as CACHE_MANIFEST, build_cache, open_cache
from rcic.data.images import decode_site
from rcic.data.layout import RxRx1
from rcic.data.synthetic import SynthSpec, generate
from rcic.errors import UserError


def small_spec(**kw):
    base = dict(n_classes=8, n_positive_controls=1, image_size=32, train_experiments=2,
                test_experiments=1, cell_types=["HUVEC", "RPE"])
    return SynthSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return RxRx1(generate(tmp_path_factory.mktemp("data") / "d", small_spec()))


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """One cache per (format, size), built once for the whole module."""
    caches = {}

    def get(fmt, size):
        if (fmt, size) not in caches:
            out = tmp_path_factory.mktemp("cache") / f"{fmt}{size}"
            caches[fmt, size] = build_cache(data, out, size, workers=2, progress=False, format=fmt)
        return caches[fmt, size]
    return get


def tree_digest(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["raw", "zlib"])
@pytest.mark.parametrize("size", [32, 20])
def test_cache_pixels_equal_png_decoding_for_every_site(data, built, fmt, size):
    cache = open_cache(built(fmt, size), data, size)
    assert len(cache) == len(data.sites) == 192
    for row in data.sites.itertuples(index=False):
        got = cache.read(row.id_code, row.site)
        assert got.dtype == np.uint8 and got.shape == (6, size, size) and got.flags.writeable
        np.testing.assert_array_equal(got, decode_site(data.paths(row), size))


def test_raw_chunks_are_plain_npy_files(data, built):
    folder = built("raw", 20)
    chunk = np.load(folder / "chunks" / "HUVEC-01_1.npy", mmap_mode="r")
    assert chunk.shape == (8, 6, 20, 20) and chunk.dtype == np.uint8


class CacheSites(Dataset):
    def __init__(self, cache, sites):
        self.cache, self.sites = cache, sites

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, i):
        return torch.from_numpy(self.cache.read(*self.sites[i]))


@pytest.mark.parametrize("fmt", ["raw", "zlib"])
def test_cache_reads_in_dataloader_workers_and_after_pickling(data, built, fmt):
    cache = open_cache(built(fmt, 20), data, 20)
    sites = list(zip(data.sites["id_code"], data.sites["site"]))
    expected = np.stack([cache.read(*s) for s in sites])   # maps opened in this process first
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.read(*sites[5]), expected[5])
    loader = DataLoader(CacheSites(cache, sites), batch_size=16, num_workers=2)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), expected)


def test_raw_cache_from_a_zlib_cache_is_identical_to_one_from_pngs(data, built, tmp_path):
    expanded = build_cache(data, tmp_path / "raw", 20, workers=2, progress=False,
                           source=built("zlib", 20))
    assert tree_digest(expanded) == tree_digest(built("raw", 20))
    with pytest.raises(UserError, match="holds 20 px images"):
        build_cache(data, tmp_path / "raw32", 32, progress=False, source=built("zlib", 20))
    assert not (tmp_path / "raw32").exists()


def test_cache_of_one_split_holds_exactly_its_sites(data, built, tmp_path):
    folder = build_cache(data, tmp_path / "train", 20, workers=2, progress=False, split="train",
                         format="zlib")
    cache = open_cache(folder, data, 20)
    train = data.sites[data.sites["split"] == "train"]
    assert len(cache) == len(train) < len(data.sites)
    for row in train.itertuples(index=False):
        np.testing.assert_array_equal(cache.read(row.id_code, row.site),
                                      decode_site(data.paths(row), 20))
    test_row = data.sites[data.sites["split"] == "test"].iloc[0]
    with pytest.raises(UserError, match="holds only the train sites"):
        cache.read(test_row.id_code, test_row.site)
    with pytest.raises(UserError, match="holds only the train sites"):
        build_cache(data, tmp_path / "test", 20, progress=False, split="test", source=folder)
    # A train-only raw cache can be expanded from a cache of both splits.
    expanded = build_cache(data, tmp_path / "raw", 20, workers=2, progress=False, split="train",
                           source=built("raw", 20))
    assert len(open_cache(expanded, data, 20)) == len(train)


def test_rebuild_of_a_complete_cache_changes_nothing(data, built):
    folder = built("raw", 32)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    build_cache(data, folder, 32, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_cache_is_refused_then_repaired_by_a_rerun(data, tmp_path, damage):
    folder = build_cache(data, tmp_path / "c", 16, workers=2, progress=False, format="zlib")
    chunk = folder / "chunks" / "RPE-02_3.zlib"
    blob = bytearray(chunk.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
        chunk.write_bytes(bytes(blob))
    elif damage == "truncate":
        chunk.write_bytes(bytes(blob[:-100]))
    else:
        chunk.unlink()
    with pytest.raises(UserError) as err:
        open_cache(folder, data, 16)
    message = str(err.value)
    assert str(folder) in message and "\n" not in message
    assert f"rerun rcic-cache --data {data.root} --out {folder} --size 16 --format zlib" in message

    build_cache(data, folder, 16, workers=2, progress=False, format="zlib")
    cache = open_cache(folder, data, 16)
    row = data.sites[data.sites["id_code"].str.startswith("RPE-02_3_")].iloc[0]
    np.testing.assert_array_equal(cache.read(row.id_code, row.site),
                                  decode_site(data.paths(row), 16))


def test_cache_without_a_whole_manifest_is_refused(data, tmp_path):
    folder = build_cache(data, tmp_path / "c", 16, workers=2, progress=False)
    manifest = folder / CACHE_MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[:-20])
    with pytest.raises(UserError, match="CACHE.json is unreadable"):
        open_cache(folder, data, 16)
    content = json.loads(text)
    del content["chunks"]
    manifest.write_text(json.dumps(content))
    with pytest.raises(UserError, match="CACHE.json lacks 'chunks'"):
        open_cache(folder, data, 16)
    manifest.unlink()
    with pytest.raises(UserError, match="no complete cache"):
        open_cache(folder, data, 16)
    # A cache of rcic 0.1.0 or older, whose manifest had a checkpoint's name: named as such.
    (folder / "MANIFEST.json").write_text(text)
    with pytest.raises(UserError, match="built by an older rcic, which named it MANIFEST.json"):
        open_cache(folder, data, 16)


def test_cache_of_another_size_or_data_folder_is_refused_on_open(data, built, tmp_path):
    with pytest.raises(UserError, match="holds 32 px images"):
        open_cache(built("raw", 32), data, 20)
    other = RxRx1(generate(tmp_path / "other", small_spec(seed=1)))
    with pytest.raises(UserError, match="another data folder"):
        open_cache(built("raw", 32), other, 32)


# -- resume after a real kill -----------------------------------------------------------------
def rcic_cache(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "rcic.cli.cache", *map(str, args)], **popen)


def test_resume_after_sigkill_finishes_with_identical_bytes(tmp_path):
    # Enough plates (24) that one worker is still busy when the first one is committed.
    data_dir = generate(tmp_path / "d", small_spec(n_classes=40, n_positive_controls=2,
                                                   image_size=96))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = rcic_cache("--data", data_dir, "--out", killed, "--size", 80, "--workers", 1,
                      start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((killed / "chunks").glob("*.done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended before the kill"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)   # the build and its workers, as Kaggle kills a kernel
    proc.wait()

    committed = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                 for p in (killed / "chunks").glob("*.npy")
                 if (killed / "chunks" / p.name.replace(".npy", ".done.json")).exists()}
    assert not (killed / CACHE_MANIFEST).exists()
    assert 1 <= len(committed) < 24, "the kill must land mid-build"
    with pytest.raises(UserError, match="interrupted"):
        open_cache(killed, RxRx1(data_dir), 80)

    assert rcic_cache("--data", data_dir, "--out", killed, "--size", 80, "--workers", 2,
                      stderr=subprocess.DEVNULL).wait() == 0
    assert rcic_cache("--data", data_dir, "--out", whole, "--size", 80, "--workers", 2,
                      stderr=subprocess.DEVNULL).wait() == 0
    for name, stamp in committed.items():   # committed plates were kept, not decoded again
        p = killed / "chunks" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert tree_digest(killed) == tree_digest(whole)
    assert not list(killed.rglob("*.partial-*")) and not (killed / "BUILDING.json").exists()


# -- the command line -------------------------------------------------------------------------
def run_cli(capsys, *args):
    code = cache_main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("bad", ["missing_data", "out_under_a_file", "out_is_a_file", "size_zero",
                                 "size_text", "size_too_big", "workers_zero", "no_out"])
def test_cli_bad_input_is_one_line_exit_2(data, tmp_path, capsys, bad):
    (tmp_path / "file").write_text("keep")
    args = {"--data": data.root, "--out": tmp_path / "out", "--size": 16}
    args.update({
        "missing_data": {"--data": tmp_path / "nowhere"},
        "out_under_a_file": {"--out": tmp_path / "file" / "out"},
        "out_is_a_file": {"--out": tmp_path / "file"},
        "size_zero": {"--size": 0},
        "size_text": {"--size": "big"},
        "size_too_big": {"--size": 64},
        "workers_zero": {"--workers": 0},
    }.get(bad, {}))
    if bad == "no_out":
        del args["--out"]
    code, err = run_cli(capsys, *[x for kv in args.items() for x in kv])
    assert code == 2
    assert err.startswith("rcic-cache: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "keep"


def test_cli_refuses_an_out_folder_holding_something_else(data, tmp_path, capsys):
    assert run_cli(capsys, "--data", data.root, "--out", tmp_path / "c", "--size", 16)[0] == 0
    before = tree_digest(tmp_path / "c")
    other = generate(tmp_path / "other", small_spec(seed=3))
    for args in (["--data", data.root, "--size", 20],            # another size
                 ["--data", data.root, "--size", 16, "--format", "zlib"],
                 ["--data", other, "--size", 16]):               # another data folder
        code, err = run_cli(capsys, *args, "--out", tmp_path / "c")
        assert code == 2 and "another data folder, size or format" in err and err.count("\n") == 1
    assert tree_digest(tmp_path / "c") == before

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    code, err = run_cli(capsys, "--data", data.root, "--out", tmp_path / "notes", "--size", 16)
    assert code == 2 and "not an rcic cache folder" in err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_cli_without_data_uses_the_embedded_data(data, tmp_path, capsys, monkeypatch):
    # Generating the embedded set takes ~10 s of CPU, too much for this file: stand the small
    # one in for it, and check the command took its data from there.
    monkeypatch.setattr("rcic.data.synthetic.default_data_dir", lambda: data.root)
    assert run_cli(capsys, "--out", tmp_path / "c", "--size", 16, "--workers", 2)[0] == 0
    manifest = json.loads((tmp_path / "c" / CACHE_MANIFEST).read_text())
    assert manifest["n_sites"] == len(data.sites)
    open_cache(tmp_path / "c", data, 16)
