"""Let CI's second environment use the first one's torch instead of installing another copy.

Run with the first environment's python: `share_torch.py TARGET_SITE_PACKAGES`. Installing
torch and its CUDA libraries takes minutes and GBs; both environments pin the same torch, so the
second one sees the first one's copy instead: torch, torchvision and everything they require,
except the packages the second environment pins itself (numpy, pillow), are linked into one
folder that a .pth file puts on the second environment's path *after* its own site-packages.
pip there finds torch installed and leaves it alone; the pinned numpy and pandas come first.
"""
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

SHARED = ("torch", "torchvision")
# Pinned by the second environment itself (constraints/kaggle-gpu.txt) or left to its own pip.
NOT_SHARED = {"numpy", "pillow", "setuptools", "pip"}


def normalise(name):
    return name.lower().replace("_", "-").replace(".", "-")


def closure(names):
    """The installed distributions `names` need, by normalised name, NOT_SHARED left out."""
    seen, todo = {}, list(names)
    while todo:
        name = normalise(todo.pop())
        if name in seen or name in NOT_SHARED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue    # an optional requirement this platform does not install
        seen[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def top_level_entries(dist):
    """The files and folders a distribution puts directly into site-packages."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        # Console scripts live outside site-packages; byte code is rebuilt where it is needed.
        if first not in ("..", "__pycache__"):
            entries.add(Path(dist.locate_file(first)))
    return entries


def main(target_site):
    shared = Path(target_site) / ".." / "shared-torch"
    shared = shared.resolve()
    shared.mkdir(exist_ok=True)
    dists = closure(SHARED)
    for dist in dists.values():
        for entry in top_level_entries(dist):
            link = shared / entry.name
            if not link.exists():
                link.symlink_to(entry)
    # "zz-": .pth files are read in name order; this one goes on the path after the others.
    (Path(target_site) / "zz-shared-torch.pth").write_text(f"{shared}\n")
    print(f"shared from {sys.prefix}: {', '.join(sorted(dists))}")


if __name__ == "__main__":
    main(sys.argv[1])
