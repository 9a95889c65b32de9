"""Checkpoints that survive a kill at any moment, and finding the newest valid one anywhere.

A checkpoint is a folder ``ckpt-{step:09d}`` holding ``state.pt`` (torch.save of the caller's
dict, which may hold only tensors and plain Python values: rcic/portable.py), any extra files,
and ``MANIFEST.json``: format, step, epoch, recipe hash, package version, creation time, whether
the recipe is finished, the caller's info, the versions that decide exactness (rcic/versions.py)
and each file's size and sha256.

Saving is a commit protocol:

1. write every file into ``.tmp-ckpt-*`` inside the output folder and fsync it;
2. write MANIFEST.json last, fsync it and the folder;
3. rename the folder to ``ckpt-{step:09d}`` (atomic within one file system), fsync the parent;
4. only then remove older checkpoints beyond `keep` and leftovers of interrupted saves.

A kill before step 3 leaves a ``.tmp-ckpt-*`` folder that discovery never looks at; after it, a
complete checkpoint. Saving a step that already has a folder first renames the old one aside to
``ckpt-{step:09d}.old-*``: still a checkpoint discovery accepts, so a kill between the two renames
loses nothing. Discovery trusts nothing: a folder whose manifest is missing, unreadable or whose
files do not match it in size and sha256 is skipped with a warning. One writer per output folder.
Loading never runs code from the file: a state that needs more than tensors and plain values is
refused (kernels search all of /kaggle/input, where anyone's files may lie).
"""
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rcic import __version__
from rcic import portable, search, versions
from rcic.atomic import fsync_dir, fsync_file, write_synced
from rcic.checkpoint_names import MANIFEST, TMP_PREFIX, folder_name, step_of
from rcic.errors import UserError

FORMAT = 1
STATE = "state.pt"
_CHUNK = 1 << 20

log = logging.getLogger("rcic")


class CheckpointRef:
    """A verified checkpoint folder and its manifest."""

    def __init__(self, path, manifest):
        self.path = Path(path)
        self.manifest = manifest

    step = property(lambda self: self.manifest["step"])
    epoch = property(lambda self: self.manifest["epoch"])
    recipe_hash = property(lambda self: self.manifest["recipe_hash"])
    done = property(lambda self: self.manifest["done"])
    created = property(lambda self: self.manifest["created"])
    package_version = property(lambda self: self.manifest["package_version"])
    info = property(lambda self: self.manifest["info"])
    # Checkpoints written before versions were recorded have none: nothing to compare.
    versions = property(lambda self: self.manifest.get("versions", {}))

    def __repr__(self):
        return f"CheckpointRef({str(self.path)!r}, step={self.step}, done={self.done})"


# ---------------------------------------------------------------- saving

def save_checkpoint(out_dir, state, *, step, epoch, recipe_hash, done=False, extra_files=None,
                    info=None, keep=1):
    """Commit `state` (and `extra_files`: {name: bytes or str}) as ``out_dir/ckpt-{step:09d}``.

    Keeps the newest `keep` checkpoints of this recipe in `out_dir` (the new one included).
    A full disk or an unwritable folder raises UserError; what was committed before is untouched.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: the new checkpoint is always kept")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not _is_plain_name(name) or name in (STATE, MANIFEST):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than "
                             f"{STATE} and {MANIFEST}")
    portable.check_portable(state)
    out_dir = Path(out_dir)

    def write(tmp):
        files = {STATE: _write_state(tmp / STATE, state)}
        for name, data in extra_files.items():
            files[name] = _write_file(tmp / name, data.encode() if isinstance(data, str) else data)
        return {
            "format": FORMAT, "step": int(step), "epoch": int(epoch), "recipe_hash": recipe_hash,
            "package_version": __version__, "created": time.time(), "done": bool(done),
            "files": files, "info": dict(info or {}), "versions": versions.environment(),
        }

    return _commit_new(out_dir, int(step), keep, write)


def copy_checkpoint(ref, out_dir, keep=1):
    """Carry a checkpoint into `out_dir` (e.g. a finished recipe's final one into a new stage's
    output), committed like a save and verified against its manifest before the commit."""
    out_dir = Path(out_dir)
    final = out_dir / ref.path.name
    if final.exists() and final.resolve() == ref.path.resolve():
        return final

    def write(tmp):
        for name in ref.manifest["files"]:
            shutil.copyfile(ref.path / name, tmp / name)
            fsync_file(tmp / name)
        problem = _files_problem(tmp, ref.manifest, hashes=True)
        if problem:
            raise UserError(f"checkpoint {ref.path} changed while it was copied to {out_dir} "
                            f"({problem}): copy it again from an intact source")
        return ref.manifest

    return _commit_new(out_dir, ref.step, keep, write)


def _commit_new(out_dir, step, keep, write):
    """Run `write(tmp_folder) -> manifest` in a temporary folder, then commit and prune."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    except OSError as err:
        raise _save_error(out_dir, err) from err
    try:
        manifest = write(tmp)
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)
        final = _rename_into_place(tmp, out_dir / folder_name(step))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _save_error(out_dir, err) from err
        raise
    _prune(out_dir, final, step, manifest["recipe_hash"], keep)
    return final


def _rename_into_place(tmp, final):
    aside = None
    if os.path.lexists(final):
        # rename() cannot replace a non-empty folder. The aside name still reads as a
        # checkpoint of this step, so the old one stays discoverable until the new one is in.
        aside = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        _remove(aside)
    return final


def _prune(out_dir, new, step, recipe_hash, keep):
    """Remove interrupted saves, and this recipe's older checkpoints beyond `keep`.

    Checkpoints of other recipes, of later steps, or with unreadable manifests are left alone:
    they are not ours to judge here."""
    older = []
    for entry in os.scandir(out_dir):
        path = Path(entry.path)
        if entry.name == new.name or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith(TMP_PREFIX):
            _remove(path)
            continue
        found = step_of(entry.name)
        if found is None or found > step:
            continue
        try:
            if json.loads((path / MANIFEST).read_text())["recipe_hash"] != recipe_hash:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        older.append((found, entry.name, path))
    # Same-step folders are replaced versions (``.old-*`` leftovers): never worth keeping.
    older.sort(reverse=True)
    kept = [o for o in older if o[0] < step][:keep - 1]
    for item in older:
        if item not in kept:
            _remove(item[2])


def _remove(path):
    """Delete a checkpoint folder so that a kill midway leaves no half-deleted checkpoint: first
    rename it to a temporary name (which discovery ignores and the next commit clears)."""
    try:
        if not path.name.startswith(TMP_PREFIX):
            trash = path.with_name(f"{TMP_PREFIX}removing-{secrets.token_hex(4)}")
            os.rename(path, trash)
            path = trash
        shutil.rmtree(path)
    except OSError as err:
        log.warning("could not remove %s (%s); it does no harm", path, err.strerror or err)


def _save_error(out_dir, err):
    return UserError(f"could not save a checkpoint in {out_dir}: {err.strerror or err}; "
                     "any checkpoint committed before is intact: free disk space or choose another --out")


class _HashingWriter:
    """What torch.save writes into: hashes the bytes on their way to the file, and keeps the
    first OS error, which torch otherwise replaces with a vague RuntimeError while unwinding."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.error = None

    def write(self, data):
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(data)
        return written

    def flush(self):
        self.file.flush()


def _write_state(path, state):
    def write(f):
        writer = _HashingWriter(f)
        try:
            torch.save(state, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error
            raise
        return writer.sha256.hexdigest()

    sha256 = write_synced(path, write)
    return {"sha256": sha256, "bytes": path.stat().st_size}


def _write_file(path, data):
    write_synced(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ---------------------------------------------------------------- finding

def find_checkpoints(roots, recipe_hash=None):
    """Every valid checkpoint under `roots` (searched recursively; missing roots are fine),
    newest first by step, then creation time. With `recipe_hash`, only that recipe's."""
    return [ref for ref in _candidates(roots, recipe_hash) if _verified(ref)]


def _candidates(roots, recipe_hash):
    """Checkpoints whose manifests read well and whose files have the right sizes, newest first."""
    refs = []
    for folder in _checkpoint_folders(roots):
        manifest, problem = _read_manifest(folder)
        if problem is None:
            problem = _files_problem(folder, manifest, hashes=False)
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", folder, problem)
        elif recipe_hash is None or manifest["recipe_hash"] == recipe_hash:
            refs.append(CheckpointRef(folder, manifest))
    refs.sort(key=lambda ref: (ref.step, ref.created), reverse=True)
    return refs


def _verified(ref):
    problem = _files_problem(ref.path, ref.manifest, hashes=True)
    if problem is not None:
        log.warning("skipping checkpoint %s: %s", ref.path, problem)
    return problem is None


def _checkpoint_folders(roots):
    """Folders named ckpt-* at any depth under `roots` (see rcic.search for how)."""
    for folder, _ in search.walk(roots, skip=lambda name: name.startswith(TMP_PREFIX)):
        if step_of(folder.name) is not None:
            yield folder


def _read_manifest(folder):
    """(manifest, None) or (None, why it is not a checkpoint)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST} (an interrupted copy, or not a checkpoint)"
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} cannot be read ({err})"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST} is not an object"
    if manifest.get("format") != FORMAT:
        return None, (f"{MANIFEST} has format {manifest.get('format')!r}; rcic {__version__} "
                      f"reads format {FORMAT}: use the rcic version that wrote it")
    types = {"step": int, "epoch": int, "recipe_hash": str, "package_version": str,
             "created": (int, float), "done": bool, "files": dict, "info": dict}
    for key, kind in types.items():
        if not isinstance(manifest.get(key), kind):
            return None, f"{MANIFEST} lacks a valid {key!r}"
    if not isinstance(manifest.get("versions", {}), dict):
        return None, f"{MANIFEST} has a malformed 'versions'"
    if STATE not in manifest["files"]:
        return None, f"{MANIFEST} lists no {STATE}"
    for name, entry in manifest["files"].items():
        if not _is_plain_name(name) or not isinstance(entry, dict) \
                or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            return None, f"{MANIFEST} has a malformed entry for {name!r}"
    return manifest, None


def _files_problem(folder, manifest, hashes):
    """Why the files in `folder` do not match `manifest`, or None when they do."""
    for name, entry in manifest["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if hashes and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 (damaged or altered)"
    return None


def _sha256(path):
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _is_plain_name(name):
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name and "\0" not in name


# ---------------------------------------------------------------- loading

def load_state(ref):
    """The dict saved in `ref` (on the CPU), to resume from. Refuses checkpoints written by a
    newer rcic, and any whose state is more than tensors and plain values (nothing in it runs).
    Says once when this environment's versions differ from those that wrote it."""
    if _release(ref.package_version) > _release(__version__):
        raise UserError(f"checkpoint {ref.path} was written by rcic {ref.package_version}, "
                        f"this is {__version__}: upgrade rcic (pip install -U rcic)")
    try:
        state = portable.load(ref.path / STATE)
    except portable.RefusedFile as err:
        raise UserError(f"checkpoint {ref.path} refused: its {STATE} is not only tensors and "
                        f"plain values ({err}); nothing in it was run: delete the folder or "
                        f"resume from another one (one written before rcic stored only plain "
                        f"values resumes only under the rcic that wrote it)") from None
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"checkpoint {ref.path} cannot be loaded ({first_line}): "
                        "delete it or resume from another folder") from err
    _notice_other_versions(ref)
    return state


_noticed = set()


def _notice_other_versions(ref):
    """One warning per checkpoint when its versions differ from these (from rank 0 alone when
    every GPU's process resumes it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() > 0:
        return
    changes = versions.differences(ref.versions)
    if changes and ref.path not in _noticed:
        _noticed.add(ref.path)
        log.warning("resuming %s under other versions than wrote it (%s): the continuation is "
                    "exact only up to those differences", ref.path, versions.describe(changes))


def _release(version):
    """(0, 3) from "0.3.0" or "0.3.0.dev1": release numbers only, trailing zeros dropped."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    numbers = [int(part) for part in match[0].split(".")] if match else [0]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)
