"""Decoded-image cache: every site decoded once into uint8 (6, S, S), then read many times.

Decoding six PNGs costs ~20 ms a sample at 512 px; reading a decoded site from a memory map
costs a copy. The pixels are those of `decode_site(paths, S)`, so a model sees the same input
whether it reads the cache or the PNGs.

A cache folder:
  chunks/<experiment>_<plate>.npy|.zlib   one file per plate: its sites' bytes, back to back
  chunks/<experiment>_<plate>.done.json   written after its chunk file: only now is it trusted
  index.csv                               (id_code, site) -> chunk and byte range
  CACHE.json                              written last: format, size, data identity, checksums
  BUILDING.json                           while a build is unfinished: what it is building

Formats (see BENCHMARKS.md "Input pipeline" for the measurements behind the choice):
  raw   each chunk a plain .npy of shape (sites, 6, S, S): reads are a memory-map copy
        (np.load(chunk, mmap_mode="r") works on it too).
  zlib  each site zlib-compressed (level 1): about half the bytes, so a 256 px cache of one
        RxRx1 split fits Kaggle's 20 GB kernel output, at the cost of a decompression per read.

A plate is the unit of work and of resume: a build killed at any moment loses at most the
plates in flight, and a rerun skips every plate whose `.done.json` matches its file.
"""
import hashlib
import json
import os
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.atomic import PARTIAL, write_atomic
from rcic.data import layout, synthetic
from rcic.data.layout import plate_key
from rcic.data.images import decode_site
from rcic.errors import UserError, refuse_nonempty
from rcic.progress import progress as progress_bar

FORMAT_VERSION = 1
FORMATS = ("raw", "zlib")
SUFFIX = {"raw": ".npy", "zlib": ".zlib"}
ZLIB_LEVEL = 1          # level 6 saves ~5% more bytes but encodes 7x slower (synthetic 256 px)
# Not MANIFEST.json: that is a checkpoint's, and a kernel searching its inputs tells the two
# apart by name. Caches built by earlier rcic 0.1.0 named theirs MANIFEST.json (LEGACY_MANIFEST).
MANIFEST = "CACHE.json"
LEGACY_MANIFEST = "MANIFEST.json"
BUILDING = "BUILDING.json"
INDEX = "index.csv"
CHUNKS = "chunks"
# The files that fix which sites exist and what they are; pixel_stats.csv follows from them.
IDENTITY_FILES = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv",
                  synthetic.DONE_MARKER)


def rerun_hint(folder, data, size, spec=None):
    """The command that builds, resumes or repairs this cache; `spec`: its manifest, if known."""
    spec = spec or {}
    options = "".join(f" --{key} {spec[key]}" for key in ("format", "split")
                      if spec.get(key) not in (None, "raw"))
    return f"rerun rcic-cache --data {data.root} --out {folder} --size {size}{options}"


# -- what a cache is built from ---------------------------------------------------------------
def file_crc(path):
    """CRC-32 of a file: 3 GB/s, enough to catch truncation and damaged bytes."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def native_size(data):
    """(height, width) of the data folder's PNGs, without decoding one."""
    if data.image_size is not None:
        return list(data.image_size)
    head = layout.png_header(data.paths(next(data.sites.itertuples(index=False)))[0])
    if isinstance(head, str):
        raise UserError(f"the first image of {data.root} is {head}: restore it")
    return [head[1], head[0]]


def data_identity(data):
    """What makes two data folders the same for a cache: their well lists and image size.

    Not the folder's path: a cache built in one Kaggle kernel is read where the same
    competition data is mounted elsewhere.
    """
    digests = {}
    for name in IDENTITY_FILES:
        path = data.root / name
        if path.is_file():
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"files_sha256": digests, "image_size": native_size(data)}


def cached_sites(data, split):
    """The sites a cache of `split` ('train', 'test' or None: both) holds."""
    if split is None:
        return data.sites
    return data.sites[data.sites["split"] == split].reset_index(drop=True)


def chunk_plan(sites):
    """{chunk name: positions in sites}, one chunk a plate, in a stable order."""
    return sites.groupby(plate_key(sites).to_numpy(), sort=True).indices


# -- encoding one site ------------------------------------------------------------------------
def encode(fmt, site):
    return site.tobytes() if fmt == "raw" else zlib.compress(site.tobytes(), ZLIB_LEVEL)


def decode(fmt, buf, size):
    """Bytes of one site -> a writable uint8 (6, size, size) array of its own."""
    shape = (layout.CHANNELS, size, size)
    if fmt == "raw":
        return np.array(buf).reshape(shape)
    return np.frombuffer(zlib.decompress(buf), np.uint8).reshape(shape).copy()


# -- building ---------------------------------------------------------------------------------
_source = None   # in a build worker: the SiteCache the sites are copied from, or None: PNGs
_native = None   # in a build worker: the folder's (height, width), so an odd PNG is refused


def start_worker(source, native=None):
    # Handed over once per worker, not once per plate: its index holds every site.
    global _source, _native
    _source, _native = source, native


def build_chunk(folder, name, fmt, size, sites):
    """Write one plate's sites (id_code, site, PNG paths) into its chunk file; mark it done.

    Runs in a worker. The file is written under a name of this process's own, so a leftover
    process of a killed build never writes into the rerun's file; the rename and then the
    marker commit it.
    """
    chunks = Path(folder) / CHUNKS
    final = chunks / f"{name}{SUFFIX[fmt]}"
    ranges = []

    def write(f):
        if fmt == "raw":
            np.lib.format.write_array_header_1_0(f, {
                "descr": "|u1", "fortran_order": False,
                "shape": (len(sites), layout.CHANNELS, size, size)})
        for id_code, site, paths in sites:
            pixels = _source.read(id_code, site) if _source else decode_site(paths, size, _native)
            start = f.tell()
            f.write(encode(fmt, pixels))
            ranges.append([start, f.tell()])

    write_atomic(final, write)
    marker = {"name": name, "file": f"{CHUNKS}/{final.name}", "bytes": final.stat().st_size,
              "crc32": file_crc(final), "ranges": ranges}
    write_atomic(chunks / f"{name}.done.json", json.dumps(marker))
    return marker


def finished_chunk(folder, name, n_sites):
    """The marker of a chunk a previous run committed, or None if it must be (re)built."""
    try:
        marker = json.loads((folder / CHUNKS / f"{name}.done.json").read_text())
        path = folder / marker["file"]
        complete = (len(marker["ranges"]) == n_sites and path.stat().st_size == marker["bytes"]
                    and file_crc(path) == marker["crc32"])   # far cheaper than decoding again
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if complete else None


def claim_folder(out, spec):
    """Make `out` ours for this build, or refuse without touching it.

    Returns True when `out` already holds this exact cache, complete.
    """
    for name, state in ((MANIFEST, "a cache"), (BUILDING, "an unfinished cache")):
        path = out / name
        if not path.is_file():
            continue
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is unreadable: delete {out} and rerun rcic-cache")
        if {k: theirs.get(k) for k in spec} != spec:
            raise UserError(
                f"{out} holds {state} of another data folder, size or format ({theirs.get('size')}"
                f" px {theirs.get('format')}; asked: {spec['size']} px {spec['format']}): choose "
                f"another --out; nothing was changed")
        return name == MANIFEST
    refuse_nonempty(out, "cache folder", "it is not an rcic cache folder; choose an empty or "
                                        "new --out (nothing was changed)")
    try:
        (out / CHUNKS).mkdir(parents=True, exist_ok=True)
        write_atomic(out / BUILDING, json.dumps(spec, indent=1))
    except OSError as err:
        raise UserError(f"cannot write to {out} ({err.strerror}): choose a writable --out")
    return False


def build_cache(data, out, size, workers=None, progress=True, format="raw", source=None,
                split=None):
    """Decode every site of `data` at `size` px into a cache folder `out`; resumable. -> out.

    A rerun after an interruption keeps every committed plate. A folder that already holds
    this cache, complete, is verified and left as it is. `source`: a cache folder of the same
    data and size (or an open SiteCache or CacheSet) to copy the sites from instead of decoding
    PNGs (e.g. expand a zlib cache from a kernel's input into a raw one on local disk, see
    expand_cache); the result is the same, byte for byte.
    `split`: 'train' or 'test' to cache only those sites (a whole RxRx1 at 256 px does not fit
    one Kaggle output even compressed); None caches both.
    """
    if split not in (None, "train", "test"):
        raise UserError(f"split {split!r} is unknown: use train, test, or leave it out for both")
    if format not in FORMATS:
        raise UserError(f"cache format {format!r} is unknown: use one of {', '.join(FORMATS)}")
    native = native_size(data)
    if not isinstance(size, int) or not 8 <= size <= min(native):
        raise UserError(f"--size {size}: must be a whole number of pixels from 8 to the images' "
                        f"own size {min(native)} of {data.root}")
    out = Path(out)
    if isinstance(source, (str, Path)):
        if Path(source).resolve() == out.resolve():
            raise UserError(f"--from {source} is the --out folder itself: build into another --out")
        source = open_cache(source, data, size)
    all_sites = cached_sites(data, split)
    if source is not None and source.split not in (None, split):
        raise UserError(f"--from {source.folder} holds only the {source.split} sites: build "
                        f"--split {source.split} from it")
    spec = {"format_version": FORMAT_VERSION, "format": format, "size": size, "split": split,
            "channels": layout.CHANNELS, "n_sites": len(all_sites), "data": data_identity(data)}
    if claim_folder(out, spec):
        try:
            open_cache(out, data, size)
            return out
        except UserError as err:   # this very cache, damaged: rebuild the plates that fail
            if progress:
                print(f"rcic-cache: {err}; rebuilding what is damaged")
            write_atomic(out / BUILDING, json.dumps(spec, indent=1))
            (out / MANIFEST).unlink()

    plan = chunk_plan(all_sites)
    markers = {name: finished_chunk(out, name, len(rows)) for name, rows in plan.items()}
    todo = [name for name, marker in markers.items() if marker is None]
    for stale in (out / CHUNKS).glob(f"*{PARTIAL}*"):   # from killed runs; never trusted
        stale.unlink(missing_ok=True)
    done_sites = len(all_sites) - sum(len(plan[name]) for name in todo)
    sites = list(all_sites.itertuples(index=False))
    with progress_bar(len(all_sites), done_sites, unit="site", disable=not progress,
                      desc=f"rcic-cache {size}px {format}") as bar, \
            ProcessPoolExecutor(max_workers=workers or os.cpu_count(), initializer=start_worker,
                                initargs=(source, tuple(native))) as pool:
        jobs = {pool.submit(build_chunk, str(out), name, format, size,
                            [(sites[i].id_code, int(sites[i].site),
                              [str(p) for p in data.paths(sites[i])]) for i in plan[name]]): name
                for name in todo}
        for job in as_completed(jobs):
            markers[jobs[job]] = job.result()
            bar.update(len(plan[jobs[job]]))

    rows = []
    for name, positions in plan.items():
        for i, (start, end) in zip(positions, markers[name]["ranges"]):
            rows.append((sites[i].id_code, sites[i].site, name, start, end))
    pd.DataFrame(rows, columns=["id_code", "site", "chunk", "start", "end"]).to_csv(
        out / INDEX, index=False)
    manifest = dict(spec, index={"file": INDEX, "bytes": (out / INDEX).stat().st_size,
                                 "crc32": file_crc(out / INDEX)},
                    chunks=[{k: markers[name][k] for k in ("name", "file", "bytes", "crc32")}
                            for name in plan])
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / BUILDING).unlink()
    return out


# -- reading ----------------------------------------------------------------------------------
class SiteCache:
    """`read(id_code, site) -> uint8 (6, S, S)`; picklable, each process maps files itself."""

    def __init__(self, folder, fmt, size, split, chunk_files, index):
        self.folder, self.format, self.size, self.split = Path(folder), fmt, size, split
        self.chunk_files = chunk_files      # chunk number -> path
        self.index = index                  # (id_code, site) -> (chunk number, start, end)
        self._maps, self._pid = {}, None

    def __getstate__(self):
        return dict(self.__dict__, _maps={}, _pid=None)

    def __len__(self):
        return len(self.index)

    def _map(self, chunk):
        # A map made before a fork works in the child too, but mapping again per process
        # keeps every worker independent of how its parent was started.
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if chunk not in self._maps:
            self._maps[chunk] = np.memmap(self.chunk_files[chunk], dtype=np.uint8, mode="r")
        return self._maps[chunk]

    def read(self, id_code, site):
        try:
            chunk, start, end = self.index[(id_code, int(site))]
        except KeyError:
            held = f"only the {self.split} sites" if self.split else "another data folder"
            raise UserError(f"site {id_code} s{site} is not in the cache {self.folder}, which "
                            f"holds {held}: build a cache that holds it") from None
        return decode(self.format, self._map(chunk)[start:end], self.size)


def open_cache(folder, data, size, verify=True):
    """Open a complete cache of `data` at `size` px, after checking it is intact.

    verify=True reads every byte once (CRC-32, ~3 GB/s plus the disk); False checks only
    the manifest, sizes and index.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        try:
            building = json.loads((folder / BUILDING).read_text())
            state = "its build was interrupted"
        except (OSError, ValueError):
            building = None
            state = ("it was built by an older rcic, which named it " + LEGACY_MANIFEST
                     if (folder / LEGACY_MANIFEST).is_file() else "it is not an rcic cache folder")
        raise UserError(f"no complete cache in {folder} ({MANIFEST} missing: {state}): "
                        f"{rerun_hint(folder, data, size, building)}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / MANIFEST} is unreadable ({err}): delete {folder} and "
                        f"{rerun_hint(folder, data, size)}") from None
    broken = f"{rerun_hint(folder, data, size, manifest)} to repair it"
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("format") not in FORMATS:
        raise UserError(f"cache {folder} has format {manifest.get('format')} version "
                        f"{manifest.get('format_version')}, this rcic reads version "
                        f"{FORMAT_VERSION} ({', '.join(FORMATS)}): {broken}")
    if manifest.get("size") != size:
        raise UserError(f"cache {folder} holds {manifest.get('size')} px images, the run asks "
                        f"for {size} px: build a {size} px cache with rcic-cache --size {size} "
                        f"into a new --out, or change the image size")
    split = manifest.get("split")
    sites = cached_sites(data, split)
    if manifest.get("data") != data_identity(data) or manifest.get("n_sites") != len(sites):
        raise UserError(f"cache {folder} was built from another data folder than {data.root} "
                        f"(its CSVs or image size differ): build one for this data with "
                        f"rcic-cache --data {data.root} into a new --out")

    try:
        parts = [manifest["index"], *manifest["chunks"]]
        for part in parts:
            path = folder / part["file"]
            actual = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            if actual != f"{part['bytes']} bytes":
                raise UserError(f"cache file {path} is {actual}, the manifest says "
                                f"{part['bytes']} bytes: the cache {folder} is damaged; {broken}")
            if (verify or part["file"] == INDEX) and file_crc(path) != part["crc32"]:
                raise UserError(f"cache file {path} fails its checksum: the cache {folder} is "
                                f"damaged; {broken}")
    except (KeyError, TypeError) as err:
        raise UserError(f"{folder / MANIFEST} lacks {err}: {broken}") from None

    table = pd.read_csv(folder / INDEX)
    number = {c["name"]: k for k, c in enumerate(manifest["chunks"])}
    chunk_no = table["chunk"].map(number)
    limits = table["chunk"].map({c["name"]: c["bytes"] for c in manifest["chunks"]})
    wanted = set(zip(sites["id_code"], sites["site"]))
    keys = list(zip(table["id_code"], table["site"].astype(int)))
    row_bytes = layout.CHANNELS * size * size
    if (len(table) != len(wanted) or set(keys) != wanted or chunk_no.isna().any()
            or (table["end"] > limits).any() or (table["start"] >= table["end"]).any()
            or (manifest["format"] == "raw"
                and (table["end"] - table["start"] != row_bytes).any())):
        raise UserError(f"the index of cache {folder} does not match its data folder or chunk "
                        f"files: {broken}")
    index = dict(zip(keys, zip(chunk_no.astype(int), table["start"], table["end"])))
    chunk_files = [str(folder / c["file"]) for c in manifest["chunks"]]
    return SiteCache(folder, manifest["format"], size, split, chunk_files, index)


# -- expanding --------------------------------------------------------------------------------
class CacheSet:
    """Several open caches of one data folder and size read as one (e.g. a train-split and a
    test-split cache, each built by its own Kaggle kernel to fit the 20 GB output)."""

    def __init__(self, caches):
        self.caches = list(caches)
        splits = {cache.split for cache in self.caches}
        self.split = None if None in splits or splits == {"train", "test"} else splits.pop()
        self.folder = ", ".join(str(cache.folder) for cache in self.caches)
        self.owner = {key: k for k, cache in enumerate(self.caches) for key in cache.index}

    def __len__(self):
        return len(self.owner)

    def read(self, id_code, site):
        k = self.owner.get((id_code, int(site)))
        if k is None:
            return self.caches[0].read(id_code, site)   # its one-line error names the site
        return self.caches[k].read(id_code, site)


def expand_cache(sources, data, out, size, workers=None, progress=True):
    """Copy the caches in `sources` (folders of `data` at `size` px, any format) into one raw
    cache `out`, e.g. from a kernel's read-only input onto its fast local disk. -> out.

    The sources are verified byte by byte (checksums) before a site is copied, and `out`
    records its own checksums as it is written; a rerun into the same `out` resumes.
    """
    caches = [open_cache(folder, data, size) for folder in sources]
    if not caches:
        raise UserError("no cache to expand: attach a cache kernel's output")
    merged = CacheSet(caches)
    if len(merged) != sum(len(cache) for cache in caches):
        raise UserError(f"the caches {merged.folder} overlap: attach one train and one test "
                        f"cache, or one of both splits")
    return build_cache(data, out, size, workers=workers, progress=progress, format="raw",
                       source=merged, split=merged.split)


def raw_bytes_per_site(size):
    """Bytes one site takes in a raw cache at `size` px."""
    return layout.CHANNELS * size * size
