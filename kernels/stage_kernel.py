"""rcic stage kernel: one time-budgeted training stage of a chain, run by Kaggle.

`rcic-chain init` renders this file once per stage and fills in SETTINGS (the stage number, the
budget and the recipe itself): Kaggle uploads only the script, so everything it needs is inline
or attached as an input (the rcic bundle dataset, the competition data, the previous stage).

Environment, used by the local dry run (`rcic-chain local`) and harmless on Kaggle:
  RCIC_KAGGLE_INPUT    where the attached inputs are    (default /kaggle/input)
  RCIC_KAGGLE_WORKING  where the outputs go             (default /kaggle/working)
  RCIC_SKIP_INSTALL=1  use the rcic this Python already has instead of installing the bundle
  RCIC_SCRATCH         local disk the attached caches are expanded onto (default /tmp/rcic-scratch)
"""
import glob
import os
import subprocess
import sys

SETTINGS = {"kind": "stage", "stage": 1, "stages": 1, "budget": "8h30m", "recipe_yaml": ""}

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
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # offline: no update check at import
    install_rcic()
    from rcic.kaggle.kernel import run_kernel
    sys.exit(run_kernel(SETTINGS, INPUT, WORKING))
