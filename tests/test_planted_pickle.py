"""Loading never runs code: a checkpoint or weights.pt someone else made, found where rcic
searches (a --resume-from folder, a predict folder, /kaggle/input), is refused and nothing in it
runs. The planted files are real rcic files with one extra object whose unpickling would create
a marker file, as a file made to run code would run anything else."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcic.checkpoint import find_checkpoints, load_state
from rcic.config import load_recipe
from rcic.errors import UserError
from rcic.weights import read_weights
from helpers import stage, stage_here

REPO = Path(__file__).resolve().parent.parent


class WritesMarker:
    """Unpickling this calls open(marker, "w"): code chosen by whoever made the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A real stage output: a checkpoint, weights.pt and stage.json."""
    out = tmp_path_factory.mktemp("trained") / "stage"
    stage_here(tiny_data, out, "--steps", "2")
    return out


def plant_checkpoint(trained, folder, marker, recipe=None):
    """A copy of the trained checkpoint whose state also holds a WritesMarker, with a manifest
    that matches it (whoever plants a file writes its manifest too). With `recipe`, the manifest
    claims that recipe, so that a stage of that recipe picks it."""
    source = find_checkpoints(trained)[0]
    target = folder / source.path.name
    shutil.copytree(source.path, target)
    state = torch.load(target / "state.pt", weights_only=True)
    state["history"].append({"note": WritesMarker(marker)})
    torch.save(state, target / "state.pt")
    data = (target / "state.pt").read_bytes()
    manifest = json.loads((target / "MANIFEST.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if recipe is not None:
        manifest["recipe_hash"] = recipe.training_hash()
        manifest["info"]["recipe"] = recipe.to_dict()
    (target / "MANIFEST.json").write_text(json.dumps(manifest))
    (folder / "stage.json").write_text(json.dumps({"done": False}))
    return target


def plant_weights(trained, folder, marker):
    folder.mkdir(parents=True, exist_ok=True)
    blob = torch.load(trained / "weights.pt", weights_only=True)
    blob["meta"]["note"] = WritesMarker(marker)
    torch.save(blob, folder / "weights.pt")
    (folder / "stage.json").write_text(json.dumps({"done": True}))
    return folder / "weights.pt"


def assert_refused(result, path, marker):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0], result.stderr
    assert "io.open" in lines[0]              # it names what the file asked for
    assert not marker.exists()


def test_the_planted_files_run_code_when_loaded_unsafely(trained, tmp_path):
    """The control: without the weights-only load, these files do run their code."""
    checkpoint = plant_checkpoint(trained, tmp_path / "c", tmp_path / "marker-c")
    weights = plant_weights(trained, tmp_path / "w", tmp_path / "marker-w")
    torch.load(checkpoint / "state.pt", weights_only=False)
    torch.load(weights, weights_only=False)
    assert (tmp_path / "marker-c").exists() and (tmp_path / "marker-w").exists()


def test_library_loads_refuse_with_one_line(trained, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = plant_checkpoint(trained, tmp_path / "c", marker)
    with pytest.raises(UserError, match=f"checkpoint {checkpoint} refused: .*io.open") as err:
        load_state(find_checkpoints(tmp_path / "c")[0])
    assert "\n" not in str(err.value)
    weights = plant_weights(trained, tmp_path / "w", marker)
    with pytest.raises(UserError, match=f"weights file {weights} refused: .*io.open"):
        read_weights(weights)
    assert not marker.exists()


def test_rcic_stage_refuses_a_planted_checkpoint_in_its_resume_search(tiny_data, trained, tmp_path):
    marker = tmp_path / "marker"
    inputs = tmp_path / "input" / "someone-elses-notebook"
    checkpoint = plant_checkpoint(trained, inputs, marker)
    result = stage(tiny_data, tmp_path / "out", "--resume-from", str(tmp_path / "input"),
                   check=False)
    assert_refused(result, checkpoint, marker)


def test_rcic_predict_refuses_a_planted_weights_file_in_its_folder(tiny_data, trained, tmp_path):
    marker = tmp_path / "marker"
    weights = plant_weights(trained, tmp_path / "downloaded", marker)
    out = tmp_path / "submission.csv"
    result = subprocess.run(["rcic-predict", "--data", str(tiny_data), "--checkpoint",
                             str(tmp_path / "downloaded"), "--out", str(out), "--tta", "1"],
                            capture_output=True, text=True)
    assert_refused(result, weights, marker)
    assert not out.exists()


def run_kernel(script, tiny_data, tmp_path):
    inputs = tmp_path / "input"
    (inputs / "competitions").mkdir(parents=True, exist_ok=True)
    (inputs / "competitions" / "rxrx1").symlink_to(tiny_data, target_is_directory=True)
    env = dict(os.environ, RCIC_SKIP_INSTALL="1", RCIC_KAGGLE_INPUT=str(inputs),
               RCIC_KAGGLE_WORKING=str(tmp_path / "working"))
    (tmp_path / "working").mkdir()
    return subprocess.run([sys.executable, str(REPO / "kernels" / script)], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


def test_submission_kernel_refuses_a_planted_weights_file_under_its_input(tiny_data, trained,
                                                                          tmp_path):
    marker = tmp_path / "marker"
    weights = plant_weights(trained, tmp_path / "input" / "notebooks" / "a-fork", marker)
    result = run_kernel("submit_kernel.py", tiny_data, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(weights) in result.stderr and "refused" in result.stderr
    assert not marker.exists() and not (tmp_path / "working" / "submission.csv").exists()


def test_stage_kernel_refuses_a_planted_checkpoint_under_its_input(tiny_data, trained, tmp_path):
    marker = tmp_path / "marker"
    # Planted for the recipe the kernel runs: a manifest says whatever its maker wants.
    checkpoint = plant_checkpoint(trained, tmp_path / "input" / "notebooks" / "a-fork", marker,
                                  recipe=load_recipe(None, []))
    result = run_kernel("stage_kernel.py", tiny_data, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(checkpoint) in result.stderr and "refused" in result.stderr
    assert not marker.exists()
