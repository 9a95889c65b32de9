"""What a checkpoint or weights file may hold, and the one way rcic reads them back.

Files cross environments (a stage trained at home continues on Kaggle's image, whose pandas,
numpy and torch differ) and folders (kernels search all of /kaggle/input, where a forked
notebook or dataset may have put a file someone else made). So a saved file holds only torch
tensors and plain Python values: nothing whose unpickling depends on another library's version,
and nothing a safe unpickler must refuse. Reading uses torch's weights-only unpickler, which
never calls code named in the file: a file that needs more is refused, not run.
"""
import pickle
import re
from collections import OrderedDict

import torch

# Values stored as they are. Exact types: numpy's float64 is a float subclass, but it pickles
# as a numpy object that a weights-only load refuses.
_PLAIN = (type(None), bool, int, float, str, bytes)


class RefusedFile(Exception):
    """A file holds an object that a weights-only load will not build. The message names it."""


def check_portable(value, where="state"):
    """Raise TypeError naming the first value under `value` that is neither a tensor nor plain
    (dict, list, tuple of str/int/float/bool/None/bytes). Called before saving: a state that
    would not load elsewhere is a bug here, not a file to find out about later."""
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{where} has a key of type {type(key).__qualname__}: "
                                f"keys must be plain values")
            check_portable(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_portable(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a "
                    f"checkpoint holds only tensors and plain Python values (convert it)")


def save(value, file, where="state"):
    """torch.save after check_portable: what is written, any environment reads back safely."""
    check_portable(value, where)
    torch.save(value, file)


def load(path, mmap=False):
    """torch.load with the weights-only unpickler, on the CPU. A file that names any other
    Python object raises RefusedFile (naming that object) before anything in it runs; a damaged
    file, or one that is no torch file at all, raises what torch raises for it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch wraps the unpickler's reason in paragraphs of advice to load the file unsafely:
        # keep the reason only. Newer torch says "global: GLOBAL x", older "class x".
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
        if reason is None:
            raise
        named = re.match(r"Unsupported (?:global: GLOBAL|class) (\S+)", reason[1])
        if named is None:   # not a pickle a safe load reads: damaged, or no torch file at all
            raise pickle.UnpicklingError(reason[1].strip()) from None
        raise RefusedFile(f"it names the Python object {named[1].rstrip('.')}") from None
