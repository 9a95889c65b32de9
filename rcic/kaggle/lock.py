"""One driver per chain folder: an OS lock on DIR/.rcic-chain.lock.

`fcntl.flock` belongs to the open file, so the kernel releases it when the process ends however
it ends (SIGKILL, a closed laptop lid, a dropped SSH session): there is never a stale lock to
clean up, unlike a pid file.
"""
import contextlib
import fcntl
from pathlib import Path

from rcic.errors import UserError

LOCK_FILE = ".rcic-chain.lock"


@contextlib.contextmanager
def exclusive(chain_dir, command):
    path = Path(chain_dir) / LOCK_FILE
    try:
        handle = open(path, "a")
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}): {command} keeps its record in "
                        f"{chain_dir}; make the folder writable") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another rcic-chain push or submit is running on {chain_dir} (it "
                            f"holds {path}): let it finish or stop it, then run {command} "
                            f"again") from None
        yield
