"""Decoding one site: six 8-bit grayscale PNGs -> one uint8 array (6, size, size).

The cache and the PNG path both call `decode_site`, so the pixels a model sees are the same
whichever path fed it.
"""
import cv2
import numpy as np

from rcic.errors import UserError

# OpenCV threads inside a DataLoader worker only fight the other workers for cores.
cv2.setNumThreads(1)


def decode_png(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"cannot decode image {path}: the file is missing or not a PNG; "
                        f"restore it from the competition download")
    if img.ndim != 2 or img.dtype != np.uint8:
        raise UserError(f"image {path} is not 8-bit grayscale (shape {img.shape}, {img.dtype}): "
                        f"restore it from the competition download")
    return img


def resize(img, size):
    """Area interpolation: the right filter for shrinking, and deterministic."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def decode_site(paths, size, native=None):
    """Six channel PNGs -> uint8 (6, size, size). `native` (height, width), when known, is the
    folder's common image size: the open samples headers only, so an odd image outside the
    sample is refused here, when it is read, instead of being silently resized."""
    return np.stack([resize(checked(decode_png(p), p, native), size) for p in paths])


def checked(img, path, native):
    if native is not None and tuple(img.shape) != tuple(native):
        raise UserError(f"image {path} is {img.shape[1]}x{img.shape[0]}, the folder's others "
                        f"{native[1]}x{native[0]}: restore it from the competition download")
    return img
