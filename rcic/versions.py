"""The versions that decide whether a resumed run repeats an uninterrupted one bit for bit.

Exact resume holds within one environment. Across environments the same seed can still give
other numbers: torch and CUDA/cuDNN pick other kernels, numpy and OpenCV resize or round
differently, albumentations draws its random parameters in another order. Checkpoints record
these versions, and a resume under other ones says so once, naming them.
"""
import platform
from importlib import metadata

# OpenCV is published under several names; whichever is installed provides cv2.
_OPENCV_DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python",
                         "opencv-contrib-python-headless")


def _distribution_version(*names):
    """The installed version of the first of `names` found, read without importing it (an
    import of albumentations would run its update check)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment():
    """{name: version or None} for what decides exactness (and the GPU model, which does too);
    None: not installed, or no CUDA."""
    import numpy
    import torch
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn is not None else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "numpy": numpy.__version__,
        "opencv": _distribution_version(*_OPENCV_DISTRIBUTIONS),
        "albumentations": _distribution_version("albumentations"),
    }


def differences(recorded, current=None):
    """[(name, recorded version, current version)] for each version that differs."""
    current = environment() if current is None else current
    return [(name, recorded.get(name), version) for name, version in current.items()
            if name in recorded and recorded[name] != version]


def describe(changes):
    """'torch 2.10.0 -> 2.14.1, numpy 2.0.2 -> 2.4.6' (None reads as 'none')."""
    return ", ".join(f"{name} {old or 'none'} -> {new or 'none'}" for name, old, new in changes)
