"""Writing files that a kill at any moment leaves whole: the old version or the new, never half.

`write_atomic(path, content)` writes into a temporary file beside `path` (same folder, hence
same file system), fsyncs it, renames it over `path` (atomic on POSIX) and fsyncs the folder so
the rename itself survives a power cut. A write that fails removes its temporary file; a killed
process may leave one, named `.<name>.partial-<pid>`, which no reader ever takes for the file.

`write_synced` and `fsync_dir` are the two halves for callers that commit a whole folder at once
instead (checkpoint.py writes its files into a temporary folder and renames the folder).
"""
import errno
import os
from pathlib import Path

PARTIAL = ".partial-"     # in the name of every temporary file written here


def partial_path(path):
    """The temporary name `path` is written under by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")


def write_synced(path, content):
    """Write `content` to `path` and fsync it. `content`: bytes, str (UTF-8), or a function
    that writes into the open binary file; its return value is returned."""
    with open(path, "wb") as f:
        if callable(content):
            result = content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
            result = None
        f.flush()
        os.fsync(f.fileno())
    return result


def write_atomic(path, content):
    """Replace `path` by `content` (as for write_synced) in one step; returns what a writer
    function returned. An error (OSError of a full disk, or the writer's own) propagates after
    the temporary file is removed, and leaves what was at `path` untouched."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        result = write_synced(tmp, content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return result


def fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Make the entries of folder `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # this file system cannot sync folders; nothing to do
            raise
    finally:
        os.close(fd)
