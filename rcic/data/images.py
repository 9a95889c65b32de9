"""Decoding one site: six 8-bit grayscale PNGs -> one uint8 array (6, size, size).

The cache and the PNG path both call `decode_site`, so the pixels a model sees are the same
whichever path fed it; `rcic-data verify` runs the same checks (`decode_png_bytes`) on every
file at once.

A broken file is named in one line of rcic's own: OpenCV's log is silenced here, where rcic
imports it, and a file whose chunks are cut short or fail their CRC is refused before libpng
sees it, because libpng prints its own "libpng error: ..." line to stderr, which no OpenCV
setting silences. (A file whose chunks are whole but whose compressed pixels are broken, which
random damage produces once in 2^32 tries, still reaches libpng: it is refused all the same,
after libpng's line.)
"""
import os
import zlib
from pathlib import Path

import cv2
import numpy as np

from rcic.data.layout import PNG_SIGNATURE
from rcic.errors import UserError

# OpenCV threads inside a DataLoader worker only fight the other workers for cores.
cv2.setNumThreads(1)


def quiet_opencv():
    """Silence OpenCV's own log lines ("[ WARN:0@1.7] global grfmt_png.cpp:855 ..."): rcic says
    what is wrong in one line. OPENCV_LOG_LEVEL, when the user sets it, still wins."""
    if os.environ.get("OPENCV_LOG_LEVEL"):
        return
    logging = getattr(cv2.utils, "logging", None)     # 4.10 and newer
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    else:
        cv2.setLogLevel(0)                            # 4.9: 0 is LOG_LEVEL_SILENT


quiet_opencv()

VERIFY_HINT = "run `rcic-data verify --data {root}` to find every damaged file"


def png_problem(data):
    """(kind, detail) when the bytes `data` cannot be a whole PNG file, else None.

    Walks the chunks: the signature, IHDR first, every chunk inside the file and passing its
    CRC, IEND reached. kind: 'empty', 'truncated' (the file ends inside a chunk or before IEND)
    or 'undecodable'. The walk costs about 2.5% of a decode (59 us against 2.4 ms for a 512 px
    PNG of 104 KB: BENCHMARKS.md, "Checking a copy of the data").
    """
    data = memoryview(data).cast("B")
    size = len(data)
    if size == 0:
        return "empty", "0 bytes"
    if bytes(data[:8]) != PNG_SIGNATURE:
        return "undecodable", "not a PNG file (no PNG signature)"
    pos = 8
    while True:
        if pos + 8 > size:
            return "truncated", f"ends after {size} bytes, before the PNG's end (IEND)"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        if not kind.isalpha() or (pos == 8 and (kind != b"IHDR" or length != 13)):
            return "undecodable", f"no valid PNG chunk at byte {pos}"
        name = kind.decode("ascii")
        end = pos + 12 + length
        if end > size:
            return "truncated", (f"ends after {size} bytes, inside chunk {name} (which ends at "
                                 f"byte {end})")
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return "undecodable", f"chunk {name} at byte {pos} fails its CRC"
        if kind == b"IEND":
            return None
        pos = end


def decode_png_bytes(data):
    """(image, None) for the bytes of a whole 8-bit grayscale PNG, else (None, (kind, detail))."""
    problem = png_problem(data)
    if problem is not None:
        return None, problem
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None, ("undecodable", "its chunks are whole but OpenCV cannot decode its pixels")
    if img.ndim != 2 or img.dtype != np.uint8:
        channels = 1 if img.ndim == 2 else img.shape[2]
        return None, ("wrong depth", f"{img.dtype.itemsize * 8}-bit, {channels} channel(s); "
                                     f"8-bit grayscale expected")
    return img, None


def read_png_bytes(path):
    """(bytes, None), or (None, (kind, detail)) for a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, ("missing", "no such file")
    except OSError as err:
        return None, ("unreadable", err.strerror or str(err))


def data_root(path):
    """The data folder an image lies in: <root>/<split>/<experiment>/Plate<n>/<file>.png."""
    parents = Path(path).parents
    return parents[3] if len(parents) > 3 else Path(path).parent


def damaged(path, detail):
    """The one line for a damaged image met while working (training, prediction, a cache)."""
    return UserError(f"cannot decode image {path} ({detail}): restore it from the competition "
                     f"download; {VERIFY_HINT.format(root=data_root(path))}")


def decode_png(path):
    data, problem = read_png_bytes(path)
    img = None
    if problem is None:
        img, problem = decode_png_bytes(data)
    if problem is not None:
        raise damaged(path, ": ".join(problem))
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
                        f"{native[1]}x{native[0]}: restore it from the competition download; "
                        f"{VERIFY_HINT.format(root=data_root(path))}")
    return img
