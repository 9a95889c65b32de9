"""How checkpoint folders are named, without torch: the supervisor (rcic.deadline) reads the
output folder at the deadline and must not pay for importing torch to do it.

A committed checkpoint is a folder ``ckpt-{step:09d}`` holding ``MANIFEST.json``; a save in
progress writes into ``.tmp-ckpt-*`` and renames it into place (rcic/checkpoint.py).
"""
import re
from pathlib import Path

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-ckpt-"
_NAME = re.compile(r"ckpt-(\d+)")


def folder_name(step):
    return f"ckpt-{step:09d}"


def step_of(name):
    """The step in a checkpoint folder's name (``ckpt-000000012`` and its ``.old-*`` copies),
    or None for any other name."""
    match = _NAME.match(name)
    return int(match[1]) if match else None


def newest_commit_on_disk(out):
    """The step of the newest committed checkpoint folder directly in `out`, or None. A commit
    is a rename, so a folder of that name holding its manifest is complete."""
    steps = [step_of(p.name) for p in Path(out).glob("ckpt-*") if (p / MANIFEST).is_file()]
    return max((s for s in steps if s is not None), default=None)
