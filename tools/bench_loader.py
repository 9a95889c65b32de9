"""Input pipeline benchmark: samples/s on one core and with all workers, on the same files.

  seeds       the seeds' way: PIL.Image.open per channel, np.array, float32 conversion and
              per-channel normalisation on the CPU, a float tensor per sample
  png         rcic's PNG path: decode_site -> uint8 (normalised later, on the device)
  cache-raw   rcic's cache, memory-mapped uint8
  cache-zlib  rcic's cache, zlib-compressed uint8
  in-memory   a copy from an array already in RAM: the ceiling of the DataLoader itself

It writes its own synthetic RxRx1 folder (images at --size px) and builds both caches from it,
so every path reads the same sites. "per core" is a loop in this process; "workers" is a torch
DataLoader with --workers processes (default: all cores), timed after its first batch.

    python tools/bench_loader.py --size 256
    python tools/bench_loader.py --paths seeds cache-raw --json loader.json   # as gpu_check.py
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rcic.data.cache import build_cache, open_cache
from rcic.data.images import decode_site
from rcic.data.layout import RxRx1
from rcic.data.synthetic import SynthSpec, generate

# Fixed per-channel statistics, as the seeds' Normalize used (values of RxRx1's dim channels).
SEED_MEAN = np.array([6.7, 16.0, 9.8, 10.1, 5.8, 8.6], np.float32)[:, None, None] / 255
SEED_STD = np.array([7.9, 11.9, 6.6, 8.1, 4.8, 5.4], np.float32)[:, None, None] / 255


PATHS = ["seeds", "png", "cache-raw", "cache-zlib", "in-memory"]


def seeds_way(paths):
    img = np.stack([np.array(Image.open(p)) for p in paths]).astype(np.float32) / 255
    return torch.from_numpy((img - SEED_MEAN) / SEED_STD)


class Sites(Dataset):
    def __init__(self, load, n):
        self.load, self.n = load, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.load(i)


def per_core(load, n_sites, seconds):
    """Samples/s of `load` in this process: whole passes over the sites for >= `seconds`."""
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        for i in range(n_sites):
            load(i)
        done += n_sites
    return done / (time.perf_counter() - start)


def with_workers(load, n_sites, workers, seconds, batch=32):
    """Samples/s through a DataLoader with `workers` processes, from its first batch on."""
    loader = DataLoader(Sites(lambda i: load(i % n_sites), 10 ** 9), batch_size=batch,
                        num_workers=workers)
    batches = iter(loader)
    next(batches)   # the workers have started
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < seconds:
        done += len(next(batches))
    return done / (time.perf_counter() - start)


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side of the synthetic PNGs")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--classes", type=int, default=16,
                        help="synthetic treatments, a multiple of 4: 6 sites each (96 by default)")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS,
                        help="the paths to measure (default: all; the first is the baseline)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)   # one core means one core, for numpy, OpenCV and torch alike

    with tempfile.TemporaryDirectory(prefix="rcic-bench-") as tmp:
        tmp = Path(tmp)
        spec = SynthSpec(n_classes=args.classes, n_positive_controls=1, image_size=args.size,
                         train_experiments=1, test_experiments=1, cell_types=["HUVEC"])
        data = RxRx1(generate(tmp / "data", spec))
        rows = list(data.sites.itertuples(index=False))
        paths = [data.paths(r) for r in rows]
        n = len(rows)
        png_bytes = sum(p.stat().st_size for ps in paths for p in ps)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"python {platform.python_version()}, torch {torch.__version__}")
        print(f"command: python tools/bench_loader.py {' '.join(sys.argv[1:])}")
        print(f"data: {n} sites of 6 x {args.size}x{args.size} PNG, "
              f"{png_bytes / n / 1e3:.0f} kB/site as PNG files\n")

        loads = {"seeds": lambda i: seeds_way(paths[i]),
                 "png": lambda i: decode_site(paths[i], args.size)}
        for fmt in [f for f in ("raw", "zlib") if f"cache-{f}" in args.paths]:
            start = time.perf_counter()
            folder = build_cache(data, tmp / fmt, args.size, workers=args.workers,
                                 progress=False, format=fmt)
            built = time.perf_counter() - start
            start = time.perf_counter()
            cache = open_cache(folder, data, args.size)
            opened = time.perf_counter() - start
            size = folder_bytes(folder)
            print(f"cache-{fmt}: {size / n / 1e3:.0f} kB/site ({size / png_bytes:.2f}x the PNGs),"
                  f" built at {n / built:.0f} sites/s with {args.workers} workers, "
                  f"opened and verified in {opened * 1e3:.0f} ms")
            loads[f"cache-{fmt}"] = lambda i, cache=cache, r=rows: cache.read(r[i].id_code,
                                                                             r[i].site)
        if "cache-zlib" in args.paths:
            start = time.perf_counter()
            build_cache(data, tmp / "expanded", args.size, workers=args.workers, progress=False,
                        source=tmp / "zlib")
            print(f"cache-raw from cache-zlib (rcic-cache --from): built at "
                  f"{n / (time.perf_counter() - start):.0f} sites/s with {args.workers} workers")

        if "in-memory" in args.paths:
            pixels = np.stack([decode_site(p, args.size) for p in paths])
            loads["in-memory"] = lambda i: pixels[i].copy()

        x_base = f"x {args.paths[0]}"
        print(f"\n{'path':<12}{'per core /s':>13}{x_base:>9}"
              f"{f'{args.workers} workers /s':>17}{x_base:>9}")
        base, results = None, []
        for name in args.paths:
            one = per_core(loads[name], n, args.seconds)
            many = with_workers(loads[name], n, args.workers, args.seconds)
            base = base or (one, many)
            print(f"{name:<12}{one:>13.0f}{one / base[0]:>9.1f}{many:>17.0f}"
                  f"{many / base[1]:>9.1f}")
            results.append({"path": name, "per_core_per_s": round(one, 1),
                            "workers_per_s": round(many, 1),
                            "x_baseline_per_core": round(one / base[0], 2),
                            "x_baseline_workers": round(many / base[1], 2)})
        if args.json:
            args.json.write_text(json.dumps({"size": args.size, "sites": n, "workers": args.workers,
                                             "seconds": args.seconds, "paths": results}, indent=1))


if __name__ == "__main__":
    main()
