"""What a cache kernel and a stage's expand cost, on one data folder, in one run.

  png -> raw    baseline: decode every PNG of the split into a raw cache (what reading the
                PNGs costs a stage once per pass over the data)
  png -> zlib   the cache kernel: the split as a zlib cache, its Kaggle output
  zlib -> raw   the stage kernel's expand: the zlib cache (checksums verified first) into a raw
                cache on local disk, then opened with every checksum verified, as the stage does

The expanded cache must equal the baseline byte for byte (chunk checksums compared).

    python tools/bench_expand.py --data DIR --size 32 [--split train] [--workers N] [--work DIR]
"""
import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rcic.data.cache import MANIFEST, build_cache, expand_cache, open_cache
from rcic.data.layout import RxRx1
from rcic.kaggle.limits import folder_bytes, human_bytes


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def chunk_crcs(folder):
    return [c["crc32"] for c in json.loads((Path(folder) / MANIFEST).read_text())["chunks"]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="RxRx1 folder")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed after)")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-expand-"))
    data, open_seconds = timed(lambda: RxRx1(args.data, check_images=False))
    n = int((data.sites["split"] == args.split).sum())
    build = dict(workers=args.workers, progress=False, split=args.split)
    try:
        _, png_raw = timed(lambda: build_cache(data, work / "png-raw", args.size, **build))
        _, png_zlib = timed(lambda: build_cache(data, work / "zlib", args.size, format="zlib",
                                                **build))
        _, expand = timed(lambda: expand_cache([work / "zlib"], data, work / "expanded",
                                               args.size, workers=args.workers, progress=False))
        _, verify = timed(lambda: open_cache(work / "expanded", data, args.size, verify=True))
        same = chunk_crcs(work / "expanded") == chunk_crcs(work / "png-raw")
        result = {
            "data": str(args.data), "split": args.split, "sites": n, "size": args.size,
            "workers": args.workers, "cpus": os.cpu_count(), "machine": platform.processor()
            or platform.machine(),
            "seconds": {"open_data": round(open_seconds, 2), "png_to_raw": round(png_raw, 2),
                        "png_to_zlib": round(png_zlib, 2), "zlib_to_raw": round(expand, 2),
                        "verify_expanded": round(verify, 2)},
            "bytes": {"raw": folder_bytes(work / "png-raw"), "zlib": folder_bytes(work / "zlib")},
            "expanded_equals_baseline": same,
        }
        s, b = result["seconds"], result["bytes"]
        result["expand_plus_verify_vs_png_decode"] = round(
            (s["zlib_to_raw"] + s["verify_expanded"]) / s["png_to_raw"], 3)
        print(json.dumps(result, indent=1))
        print(f"{n} {args.split} sites at {args.size} px: png->raw {s['png_to_raw']:.1f}s, "
              f"png->zlib {s['png_to_zlib']:.1f}s ({human_bytes(b['zlib'])}, "
              f"{b['zlib'] / b['raw']:.2f} of raw {human_bytes(b['raw'])}), "
              f"zlib->raw {s['zlib_to_raw']:.1f}s + verify {s['verify_expanded']:.1f}s "
              f"= {result['expand_plus_verify_vs_png_decode']:.2f}x the PNG pass; "
              f"identical: {same}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
