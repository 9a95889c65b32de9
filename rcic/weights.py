"""The small inference-only file every stage leaves behind: `weights.pt`.

It holds the model's weights (the EMA copy when the recipe keeps one), the recipe, and what a
predictor needs to map outputs back to siRNAs. A checkpoint holds far more (optimizer, RNG
states, data position); the submission kernel only needs this.
"""
import os
from pathlib import Path

import torch

from rcic import search
from rcic.config import from_dict
from rcic.errors import UserError

WEIGHTS_NAME = "weights.pt"


def save_weights(path, model, recipe, meta):
    """Write atomically: a kernel killed mid-write must not leave a half file to be found."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": 1, "model": model.state_dict(), "recipe": recipe.to_dict(),
                "meta": dict(meta)}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(path, device="cpu"):
    """(model, recipe, meta) from a weights file, the model in eval mode on `device`."""
    from rcic.models import create_model
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        state, recipe, meta = blob["model"], from_dict(blob["recipe"], str(path)), blob["meta"]
    except (OSError, RuntimeError, KeyError, EOFError, TypeError) as err:
        raise UserError(f"weights file {path} cannot be read ({type(err).__name__}): it is "
                        f"truncated or not an rcic weights file; use the weights.pt of a stage")
    model = create_model(recipe.model, meta["num_classes"], len(meta["cell_types"]),
                         with_pretrained=False)
    model.load_state_dict(state)
    return model.to(device).eval(), recipe, meta


def find_weights(roots):
    """Every weights.pt under the roots, searched recursively, newest step first."""
    found = [folder / WEIGHTS_NAME for folder, files in search.walk(roots) if WEIGHTS_NAME in files]
    def step(p):
        try:
            return torch.load(p, map_location="cpu", weights_only=False)["meta"].get("step", 0)
        except Exception:   # an unreadable file sorts last; load_weights reports it clearly
            return -1
    return sorted(found, key=step, reverse=True)
