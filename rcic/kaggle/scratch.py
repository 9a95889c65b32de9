"""A kernel's attached caches, expanded onto its local disk before the work starts.

A cache kernel's output (zlib, to fit Kaggle's 20 GB) arrives read-only under /kaggle/input,
which is slower to read than the kernel's own disk. A stage or submission kernel copies it once
into a raw cache on local scratch (RCIC_SCRATCH, default /tmp/rcic-scratch: never
/kaggle/working, whose contents Kaggle saves as output), then reads that. The time it takes is
part of the stage's budget (its clock starts with the kernel's process) and is reported.
"""
import json
import os
import shutil
import time
from pathlib import Path

from rcic.data import cache
from rcic.errors import UserError
from rcic.kaggle.limits import human_bytes

SCRATCH_ENV = "RCIC_SCRATCH"
DEFAULT_SCRATCH = "/tmp/rcic-scratch"
SPARE_FRACTION = 0.05      # free space kept on the scratch disk beyond the expanded cache


def attached_caches(manifests, size):
    """The cache folders among `manifests` (paths of cache manifests) that hold images at
    `size` px."""
    found = []
    for path in manifests:
        try:
            manifest = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("size") == size:
            found.append(Path(path).parent)
    return found


def scratch_root():
    return Path(os.environ.get(SCRATCH_ENV) or DEFAULT_SCRATCH)


def expand_attached(manifests, data, size, who, echo=print):
    """The cache folder the kernel should read, and a report of how it got there.

    `data`: the RxRx1 layout of the attached competition data; `who`: the kernel's name in
    log lines. Raises a UserError when no cache of `size` px is attached.
    """
    started = time.monotonic()
    sources = attached_caches(manifests, size)
    if not sources:
        raise UserError(f"no rcic cache of {size} px among the inputs: attach the chain's "
                        f"cache kernels (rcic-chain init --cache {size} renders and lists them), "
                        f"or render the chain without --cache")
    n_sites = sum(json.loads((s / cache.MANIFEST).read_text())["n_sites"] for s in sources)
    need = n_sites * cache.raw_bytes_per_site(size)
    root = scratch_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the scratch folder {root} ({err.strerror}): set "
                        f"{SCRATCH_ENV} to a writable folder on the kernel's local disk")
    free = shutil.disk_usage(root).free
    if need * (1 + SPARE_FRACTION) > free:
        if len(sources) == 1:
            echo(f"{who}: notice: {human_bytes(need)} do not fit the {human_bytes(free)} free "
                 f"in {root}: reading the compressed cache {sources[0]} in place (slower)")
            return sources[0], {"expanded": False, "from": [str(sources[0])],
                                "seconds": round(time.monotonic() - started, 3)}
        raise UserError(f"the attached caches need {human_bytes(need)} expanded, {root} has "
                        f"{human_bytes(free)} free: set {SCRATCH_ENV} to a larger local disk, or "
                        f"use a smaller --cache")
    out = root / f"cache-{size}px"
    echo(f"{who}: expanding {len(sources)} cache(s) ({n_sites} sites) into {out}")
    cache.expand_cache(sources, data, out, size)
    report = {"expanded": True, "from": [str(s) for s in sources], "to": str(out),
              "sites": n_sites, "bytes": need, "seconds": round(time.monotonic() - started, 3)}
    # The sources were checked against their checksums before a byte was copied; the copy's
    # own checksums are checked when the stage or prediction opens it.
    echo(f"{who}: cache expanded in {report['seconds']:.1f}s ({human_bytes(need)} on local "
         f"disk)")
    return out, report
