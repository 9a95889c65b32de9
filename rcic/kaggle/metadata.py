"""kernel-metadata.json and dataset-metadata.json: build them, check them against Kaggle's rules.

The rules are the ones the `kaggle` client (2.2.x) and the server enforce, checked here first so a
mistake shows up at `rcic-chain init` instead of as a rejected push hours into a chain.
"""
import json
import re
from pathlib import Path

from rcic.atomic import write_atomic
from rcic.errors import UserError

KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
KAGGLE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")   # what Kaggle's slugs look like


def kernel_metadata(owner, slug, title, code_file, *, gpu, machine_shape=None,
                    dataset_sources=(), competition_sources=(), kernel_sources=()):
    """The metadata of one private script kernel with the internet off."""
    meta = {
        "id": f"{owner}/{slug}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": bool(gpu),
        # The client's default is true; a submission kernel must run with the internet off,
        # and the stages need nothing from it either, so say false explicitly.
        "enable_internet": False,
        "dataset_sources": list(dataset_sources),
        "competition_sources": list(competition_sources),
        "kernel_sources": list(kernel_sources),
        # Re-pushes of a kernel (--retry, --from) keep the image of its first version, instead
        # of moving to Kaggle's newest between two stages of a chain (rcic.kaggle.driver pins
        # the later kernels to the first one's image through docker_image).
        "docker_image_pinning_type": "original",
    }
    if machine_shape:
        meta["machine_shape"] = machine_shape
    return meta


def kernel_problems(meta, folder):
    """Every way `meta` (read from `folder`) breaks Kaggle's rules, as short phrases."""
    problems = []
    owner, _, slug = str(meta.get("id", "")).partition("/")
    slug_ok = False
    if not owner or "/" in slug:
        problems.append(f"id {meta.get('id')!r} is not owner/slug")
    elif len(slug) < 5:
        problems.append(f"kernel slug {slug!r} is shorter than 5 characters")
    else:
        slug_ok = True
    if len(str(meta.get("title", ""))) < 5:
        problems.append(f"title {meta.get('title')!r} is shorter than 5 characters")
    elif slug_ok and kaggle_slug(meta["title"]) not in (None, slug):
        problems.append(f"title {meta['title']!r} becomes the slug "
                        f"{kaggle_slug(meta['title'])!r} on Kaggle, not {slug!r}")
    code_file = meta.get("code_file")
    if not code_file or not (Path(folder) / code_file).is_file():
        problems.append(f"code_file {code_file!r} does not exist beside the metadata")
    if meta.get("language") != "python":
        problems.append("language must be 'python'")
    if meta.get("kernel_type") not in ("script", "notebook"):
        problems.append("kernel_type must be 'script' or 'notebook'")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if key in meta and not isinstance(meta[key], bool):
            problems.append(f"{key} must be a JSON boolean, not {meta[key]!r}")
    if meta.get("enable_internet") is not False:
        problems.append("enable_internet must be stated as false (the client defaults to true)")
    for key in ("kernel_sources", "dataset_sources"):
        for source in meta.get(key, []):
            owner, _, slug = str(source).partition("/")
            if not owner or not slug or "/" in slug or (key == "kernel_sources" and len(slug) < 5):
                problems.append(f"{key} entry {source!r} is not owner/slug")
    return problems


def kaggle_slug(title):
    """The slug Kaggle makes of a kernel title: the kaggle client's own python-slugify. Where
    the id's slug differs, the client warns and later calls by the id find no kernel. None
    without the client (nothing can be pushed then; push checks again)."""
    try:
        from slugify import slugify
    except ImportError:
        return None
    return slugify(title)


def check_kernel_folder(folder):
    """The metadata of a kernel folder, or a UserError naming every problem in it."""
    path = Path(folder) / KERNEL_METADATA
    meta = read_json(path)
    problems = kernel_problems(meta, folder)
    if problems:
        raise UserError(f"{path} is not valid Kaggle metadata: {'; '.join(problems)}. "
                        f"Re-render the chain with rcic-chain init")
    return meta


def dataset_metadata(template, owner):
    """The bundle's dataset metadata: the template with its owner filled in, checked."""
    meta = dict(template)
    slug = str(meta.get("id", "")).rpartition("/")[2]
    meta["id"] = f"{owner}/{slug}"
    problems = []
    if not 6 <= len(slug) <= 50:
        problems.append(f"dataset slug {slug!r} must have 6 to 50 characters")
    if not 6 <= len(str(meta.get("title", ""))) <= 50:
        problems.append(f"title {meta.get('title')!r} must have 6 to 50 characters")
    if len(meta.get("licenses", [])) != 1:
        problems.append("there must be exactly one licenses entry")
    if problems:
        raise UserError(f"dataset metadata is not valid for Kaggle: {'; '.join(problems)}: "
                        f"fix {DATASET_METADATA}")
    return meta


def check_owner(owner):
    if not owner or not KAGGLE_NAME_RE.match(owner.lower()):
        raise UserError(f"--owner {owner!r} is not a Kaggle user name: pass the name shown in "
                        f"your profile URL, e.g. --owner jdoe")
    return owner


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: render the chain first with rcic-chain init")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): fix or "
                        f"re-render it")


def write_json(path, data):
    # Atomic: the driver rewrites a kernel's metadata (its image) and may be killed meanwhile.
    write_atomic(path, json.dumps(data, indent=2) + "\n")
