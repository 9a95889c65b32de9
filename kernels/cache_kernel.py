"""rcic cache kernel: decode one split of the competition's images once, into a zlib cache.

`rcic-chain init --cache SIZE` renders this file (one kernel for the train split, one for the
test split) and fills in SETTINGS. It runs on a CPU (no GPU quota spent) with the internet off;
its output, the cache, stays inside Kaggle's 20 GB. Every stage kernel of the chain lists it as
an input and expands it onto its own local disk before training.

Environment, used by the local dry run (`rcic-chain local`) and harmless on Kaggle:
  RCIC_KAGGLE_INPUT    where the attached inputs are    (default /kaggle/input)
  RCIC_KAGGLE_WORKING  where the outputs go             (default /kaggle/working)
  RCIC_SKIP_INSTALL=1  use the rcic this Python already has instead of installing the bundle
"""
import glob
import os
import subprocess
import sys

SETTINGS = {"kind": "cache", "split": "train", "size": 256, "format": "zlib"}

INPUT = os.environ.get("RCIC_KAGGLE_INPUT", "/kaggle/input")
WORKING = os.environ.get("RCIC_KAGGLE_WORKING", "/kaggle/working")


def install_rcic():
    """Install the bundle's wheels with the internet off. Kaggle uploads one file per kernel, so
    this bootstrap is the one piece both kernel scripts repeat; everything after it is in rcic."""
    if os.environ.get("RCIC_SKIP_INSTALL") == "1":
        return
    # The attached dataset's depth under /kaggle/input has changed over the years: search.
    wheels = sorted(w for depth in range(5)
                    for w in glob.glob(os.path.join(INPUT, *["*"] * depth, "rcic-*.whl")))
    if not wheels:
        sys.exit(f"rcic kernel: no rcic wheel under {INPUT}: attach the rcic bundle dataset "
                 f"(tools/build_bundle.py, then rcic-chain publish-bundle)")
    bundle = os.path.dirname(wheels[-1])
    # --no-deps: install exactly the bundle's wheels and never touch Kaggle's torch.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                           "--no-deps", *sorted(glob.glob(os.path.join(bundle, "*.whl")))])


if __name__ == "__main__":
    install_rcic()
    from rcic.kaggle.kernel import run_kernel
    sys.exit(run_kernel(SETTINGS, INPUT, WORKING))
