"""Walking what Kaggle attached: every folder under some roots, at any depth, once.

Kaggle's /kaggle/input layout varies (`<slug>/`, `notebooks/<owner>/<slug>/`, ...), so nothing
assumes a depth. The one place never entered is an RxRx1 data folder (it holds train.csv and
test.csv): its image tree alone is ~500,000 files and holds no checkpoint or weights.
"""
import os
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")    # where Kaggle mounts a kernel's attached inputs


def is_data_folder(filenames):
    """Whether a folder holding these file names is an RxRx1 data folder."""
    return "train.csv" in filenames and "test.csv" in filenames


def walk(roots, skip=lambda name: False):
    """Yield (folder, file names) for every folder under `roots`; symbolic links are followed,
    each real folder is visited once, and names for which `skip` is true are not entered."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    seen = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if not first_visit(Path(dirpath), seen):
                dirnames[:] = []
                continue
            yield Path(dirpath), filenames
            dirnames[:] = [] if is_data_folder(filenames) else sorted(
                d for d in dirnames if not skip(d))


def first_visit(path, seen):
    try:
        st = path.stat()
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True
