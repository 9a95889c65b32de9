"""The Kaggle dataset that carries rcic into kernels with the internet off.

A flat folder (Kaggle uploads only a dataset's top level unless told to zip folders):
    rcic-<version>-py3-none-any.whl
    <one wheel per package Kaggle's image lacks>
    dataset-metadata.json          the top-level template with the owner filled in
Kernels install it with `pip install --no-index --no-deps <its wheels>`. Torch, torchvision,
albumentations, opencv, pandas, scipy, tqdm and matplotlib are never bundled: Kaggle's image
has them built for its own CUDA, and replacing them would break it.
"""
import importlib.util
import json
import subprocess
import sys
from importlib import metadata as dist_metadata
from pathlib import Path

from rcic.errors import UserError, refuse_nonempty
from rcic.kaggle import metadata

# Runtime dependencies of rcic that Kaggle's image does not have (docs/rxrx1-and-kaggle.md).
MISSING_ON_KAGGLE = ["efficientnet-pytorch"]


def can_build_here():
    """Whether this environment's setuptools builds wheels by itself (70.1 and newer do)."""
    try:
        return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    except ImportError:
        return False


def pip_wheel(requirement, out):
    """Build or fetch one wheel, without its dependencies."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
           "--wheel-dir", str(out), str(requirement)]
    if can_build_here():
        # Skips fetching setuptools into a throw-away build environment: faster, and offline.
        cmd.append("--no-build-isolation")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"pip could not build a wheel of {requirement} ({last}): check that "
                        f"PyPI is reachable, or that the project folder is rcic's")


def build_bundle(out, owner, project, template=None):
    """Write the bundle folder `out` for `owner`; returns the wheel paths in it."""
    project, out = Path(project), Path(out)
    if not (project / "setup.py").is_file():
        raise UserError(f"{project} has no setup.py: run from (or pass --project) the rcic "
                        f"source folder")
    refuse_nonempty(out, "bundle folder")
    template = Path(template or project / metadata.DATASET_METADATA)
    meta = metadata.dataset_metadata(metadata.read_json(template), metadata.check_owner(owner))
    out.mkdir(parents=True, exist_ok=True)
    pip_wheel(project, out)
    for name in MISSING_ON_KAGGLE:
        # The version tested here is the version shipped.
        pip_wheel(f"{name}=={dist_metadata.version(name)}", out)
    metadata.write_json(out / metadata.DATASET_METADATA, meta)
    return sorted(out.glob("*.whl"))


def bundle_ref(folder):
    """The dataset id (owner/slug) a built bundle folder will be published as."""
    path = Path(folder) / metadata.DATASET_METADATA
    if not path.is_file():
        raise UserError(f"{folder} is not a built bundle (no {metadata.DATASET_METADATA}): "
                        f"build it with tools/build_bundle.py --owner USER --out {folder}")
    return json.loads(path.read_text())["id"]
