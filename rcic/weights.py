"""The small inference-only file every stage leaves behind: `weights.pt`.

It holds the model's weights (the EMA copy when the recipe keeps one), the recipe, and what a
predictor needs to map outputs back to siRNAs. A checkpoint holds far more (optimizer, RNG
states, data position); the submission kernel only needs this.
"""
import io
import pickle
from pathlib import Path

from rcic import portable, search
from rcic.atomic import write_atomic
from rcic.config import from_dict
from rcic.errors import UserError

WEIGHTS_NAME = "weights.pt"


def save_weights(path, model, recipe, meta):
    """Write atomically: a kernel killed mid-write must not leave a half file to be found."""
    path = Path(path)
    # Serialised in memory first, so a full disk surfaces as Python's OSError (ENOSPC) with
    # its name, not as torch's opaque zip-writer error.
    buffer = io.BytesIO()
    portable.save({"format": 1, "model": model.state_dict(), "recipe": recipe.to_dict(),
                   "meta": dict(meta)}, buffer, where="weights")
    try:
        write_atomic(path, buffer.getbuffer())
    except OSError as err:
        raise UserError(f"could not write {path} ({err.strerror}); the checkpoint beside it is "
                        f"intact: free disk space or choose another --out") from err


def read_weights(path, mmap=False):
    """The saved dict {format, model, recipe, meta}; one clear line if it is not one, or if it
    holds more than tensors and plain values (refused: nothing in it runs).
    mmap=True reads no tensor data: cheap when only the meta is wanted."""
    try:
        blob = portable.load(path, mmap=mmap)
        blob["model"], blob["recipe"], blob["meta"]
        return blob
    except portable.RefusedFile as err:
        raise UserError(f"weights file {path} refused: it is not only tensors and plain values "
                        f"({err}); nothing in it was run: delete it and use the weights.pt of "
                        f"a stage") from None
    except (OSError, RuntimeError, KeyError, EOFError, TypeError, pickle.UnpicklingError) as err:
        raise UserError(f"weights file {path} cannot be read ({type(err).__name__}): it is "
                        f"truncated or not an rcic weights file; use the weights.pt of a stage")


def read_meta(path):
    """The meta of a weights file, or {} when it cannot be read (load_weights says why)."""
    try:
        return read_weights(path, mmap=True)["meta"]
    except UserError:
        return {}


def load_weights(path, device="cpu"):
    """(model, recipe, meta) from a weights file, the model in eval mode on `device`."""
    from rcic.models import create_model
    path = Path(path)
    blob = read_weights(path)
    state, recipe, meta = blob["model"], from_dict(blob["recipe"], str(path)), blob["meta"]
    model = create_model(recipe.model, meta["num_classes"], len(meta["cell_types"]),
                         with_pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"weights file {path} does not fit the model its own recipe describes "
                        f"({first}): it was altered or written by another tool; use the "
                        f"weights.pt of a stage")
    return model.to(device).eval(), recipe, meta


def find_weights(roots):
    """Every weights.pt under the roots, searched recursively, newest step first (an
    unreadable file sorts last; load_weights reports it clearly)."""
    found = [folder / WEIGHTS_NAME for folder, files in search.walk(roots) if WEIGHTS_NAME in files]
    return sorted(found, key=lambda p: read_meta(p).get("step", -1), reverse=True)
