"""One kind of error for everything a user can fix, and the wrapper that reports it.

Every console script runs through `cli_main`: a `UserError` becomes one line on stderr
("rcic-stage: error: <what>, <where>: <what to do>") and exit status 2, never a traceback.
"""
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix. The message names what is wrong, where, and the fix."""


def refuse_nonempty(folder, what="output folder", fix="choose a new --out or delete it first"):
    """Refuse a folder that already holds something (or is a file): nothing there is touched."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{what} {folder} exists and is not empty: {fix}")


def one_line(err):
    """The message of a UserError, also when a DataLoader worker raised it: torch re-raises
    it in the main process with the worker's traceback in front of the original line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def cli_main(prog, run, argv=None):
    """Run `run(argv)` and turn a UserError into one clear line and exit status 2."""
    try:
        return run(argv) or 0
    except UserError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
