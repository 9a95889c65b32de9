"""What `rcic-data verify` costs against reading the same bytes with no check, in one run.

Each pass reads every file of one data folder (its CSVs and every PNG they imply), with the
same threads and batches:

  read      baseline: the bytes only, no check (the disk's limit)
  hash      `rcic-data verify --manifest`: byte count and CRC-32 compared with the manifest
  decode    `rcic-data verify`: every PNG's chunks walked (CRCs) and decoded by OpenCV

Every pass runs cold (the folder's pages first dropped from the page cache with
posix_fadvise, so the bytes come from the disk) and then warm (from memory). Reported: files
per second of wall time, files per CPU-second of this process (= per core, whatever else loads
the machine) and each pass's time over the read baseline's. Then, on one thread with the bytes
in memory: the cost of a file's CRC-32 (and of blake2b and md5, the other candidates for the
manifest's hash), of rcic's chunk walk and of OpenCV's decode.

The folder is made here by rcic-synth (or passed with --data):

    python tools/bench_verify.py --preset --size 32 --fraction 1     # the competition's files
    python tools/bench_verify.py --size 512                          # real-sized images, few
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from rcic.cli.synth import main as synth_main
from rcic.data.images import png_problem
from rcic.data.layout import RxRx1
from rcic.data.verify import BATCH, data_files, make_manifest, verify


def synth(out, args):
    """A data folder from rcic-synth: the competition's shape (--preset) or a small one."""
    shape = (["--preset", "rxrx1", "--fraction", str(args.fraction)] if args.preset else
             ["--classes", "40", "--controls", "4", "--experiments", "2",
              "--test-experiments", "1", "--cell-types", "HUVEC", "RPE"])
    command = ["rcic-synth", "--out", str(out), "--size", str(args.size), *shape,
               "--workers", str(os.cpu_count())]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):        # stdout carries the JSON result
        assert synth_main(command[1:]) == 0
    return " ".join(command), time.perf_counter() - start


def drop_cached(paths):
    """Evict the files' pages from the page cache (clean pages: nothing is lost)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths, workers):
    """The baseline: every file's bytes, in the same threads and batches as verify."""
    def batch(part):
        total = 0
        for path in part:
            with open(path, "rb") as f:
                total += len(f.read())
        return total

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(batch, [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]))


def measure(name, run, paths, cold):
    if cold:
        drop_cached(paths)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"pass": name, "cache": "cold" if cold else "warm", "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "files_per_s": round(len(paths) / wall),
            "files_per_cpu_s": round(len(paths) / cpu)}


def in_memory(paths, sample=2000):
    """One thread, bytes already in memory, on a spread of the folder's PNGs: seconds a file
    for the checksums one could use, for rcic's chunk walk and for OpenCV's decode."""
    step = max(1, len(paths) // sample)
    blobs = [Path(path).read_bytes() for path in paths[::step]]
    costs = {"crc32": zlib.crc32, "blake2b": lambda b: hashlib.blake2b(b, digest_size=16),
             "md5": hashlib.md5, "chunk_walk": png_problem,
             "opencv_decode": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8),
                                                     cv2.IMREAD_UNCHANGED)}
    result = {"files": len(blobs)}
    for name, fn in costs.items():
        start = time.perf_counter()
        for blob in blobs:
            fn(blob)
        seconds = time.perf_counter() - start
        result[f"{name}_us_per_file"] = round(1e6 * seconds / len(blobs), 1)
        if name in ("crc32", "blake2b", "md5"):
            result[f"{name}_GB_per_s"] = round(sum(map(len, blobs)) / seconds / 1e9, 2)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="an existing RxRx1 folder (default: make one)")
    p.add_argument("--preset", action="store_true",
                   help="make the competition's experiments, plates and wells (rcic-synth "
                        "--preset rxrx1)")
    p.add_argument("--fraction", type=float, default=1.0, help="with --preset")
    p.add_argument("--size", type=int, default=32, help="image side of the folder made")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="reading threads")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args()

    load_start = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    made = None
    if args.data is None:
        args.data = work / "data"
        made = synth(args.data, args)
    data = RxRx1(args.data, check_images=False)
    csvs, pngs = data_files(data)
    paths = [str(data.root / f) for f in csvs + pngs]
    manifest = work / "manifest.csv"
    manifest.unlink(missing_ok=True)
    start = time.perf_counter()
    assert make_manifest(data, manifest, args.workers, progress=False).empty
    manifest_seconds = time.perf_counter() - start

    passes = {
        "read": lambda: read_all(paths, args.workers),
        "hash": lambda: verify(data, manifest, args.workers, progress=False),
        "decode": lambda: verify(data, None, args.workers, progress=False),
    }
    rows = [measure(name, run, paths, cold) for cold in (True, False)
            for name, run in passes.items()]
    for row in rows:
        base = next(r for r in rows if r["pass"] == "read" and r["cache"] == row["cache"])
        row["time_over_read"] = round(row["seconds"] / base["seconds"], 2)
    result = {
        "data": str(args.data), "made_by": made and made[0],
        "made_seconds": made and round(made[1]), "files": len(paths),
        "mean_png_bytes": round(sum(os.path.getsize(p) for p in paths[len(csvs):]) / len(pngs)),
        "workers": args.workers, "cpus": os.cpu_count(),
        "load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],   # start, end
        "manifest_seconds": round(manifest_seconds, 1), "passes": rows,
        "in_memory": in_memory(paths[len(csvs):]),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
