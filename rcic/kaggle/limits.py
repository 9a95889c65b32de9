"""Kaggle's limits on a kernel that the local dry run holds too: the output cap and no network.

- Output: Kaggle keeps at most 20 GB of a kernel's /kaggle/working; a kernel that writes more
  loses its output, and the next kernel of the chain finds nothing. The dry run measures the
  working folder when a kernel ends and fails it the same way (`--output-limit` scales the cap
  down to the size of small data).
- Network: a kernel whose metadata says `enable_internet: false` has no network on Kaggle. The
  dry run runs it in a new network namespace (`unshare --net`, with only a loopback device),
  so a hidden download fails here, not hours into a chain. Where the OS refuses a namespace
  (no unshare, no permission) the kernel runs with the network, and the dry run says so once.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

from rcic.errors import UserError

KAGGLE_OUTPUT_LIMIT = 20 * 10**9          # bytes of /kaggle/working Kaggle keeps
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)")


def parse_size(text):
    """Bytes in a size such as ``20GB``, ``500MB``, ``1.5g`` or ``1000000`` (decimal units)."""
    match = _SIZE.fullmatch(str(text).strip().lower())
    if not match or match["unit"] not in _UNITS or float(match["number"]) <= 0:
        raise UserError(f"--output-limit {text!r} is not a size: write e.g. 20GB, 500MB or 2MB")
    return int(float(match["number"]) * _UNITS[match["unit"]])


def human_bytes(n):
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def folder_bytes(folder):
    """Bytes of the files under `folder`, symlinks not followed (as Kaggle saves them)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def check_output(name, working, limit, log_path):
    """One line if the kernel `name` left more in `working` than Kaggle keeps."""
    size = folder_bytes(working)
    if size > limit:
        raise UserError(f"{name} left {human_bytes(size)} in its working folder, over the "
                        f"output limit of {human_bytes(limit)}: Kaggle would drop its output "
                        f"(write less, or move scratch files out of the working folder); its "
                        f"log: {log_path}")
    return size


def offline_prefix():
    """(argv prefix that runs a command without network, or None; why not, or None)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "no unshare command on this machine"
    # As root a plain new namespace; otherwise a user namespace maps us to root inside it.
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--map-root-user", "--net"]
    ip = shutil.which("ip")
    if ip:
        # Loopback up, as in a kernel: local sockets (e.g. DDP's rendezvous) keep working.
        prefix += ["sh", "-c", f'"{ip}" link set lo up 2>/dev/null; exec "$@"', "rcic-offline"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        return None, f"the OS refused a network namespace ({reason})"
    return prefix, None
