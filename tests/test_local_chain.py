"""rcic-chain local: a 3-stage chain of the rendered kernel scripts, each in its own process with
only its declared inputs, ends in a valid submission whose weights equal one uninterrupted run.

Slow-ish (five Python processes that import torch): about a minute of CPU.
"""
import json
import subprocess
import sys
import time

import pytest
import torch

from rcic.errors import UserError
from rcic.kaggle.local import run_local_chain, run_script
from rcic.submission import check_submission

RECIPE = """name: tiny-chain
data:
  image_size: 16
  batch_size: 8
model:
  backbone: tiny
train:
  epochs: 3
  checkpoint_every_steps: 5
"""


def test_three_stage_local_chain_matches_an_uninterrupted_run(tmp_path, tiny_data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    lines = []
    result = run_local_chain(3, "3m", tmp_path / "chain", recipe=recipe, data=tiny_data,
                             steps_per_stage=4, echo=lines.append)
    assert [k["name"] for k in result["kernels"]] == ["stage-01", "stage-02", "stage-03",
                                                      "submit"]
    assert all(k["status"] == 0 for k in result["kernels"])
    runs = tmp_path / "chain" / "runs"

    # Each stage continued where the previous one stopped; the last finished the recipe.
    reports = [json.loads((runs / f"stage-0{k}" / "working" / "stage.json").read_text())
               for k in (1, 2, 3)]
    assert [r["global_step"] for r in reports] == [4, 8, 12]
    assert [r["done"] for r in reports] == [False, False, True]

    # Each kernel saw only its declared inputs: the bundle, the data, the previous kernel.
    def inputs(kernel):
        root = runs / kernel / "input"
        return sorted(str(p.relative_to(root)) for p in [*root.glob("*/*"), *root.glob("*/*/*")]
                      if p.parent.name != "recursion-cellular-image-classification")
    bundle_and_data = ["competitions/recursion-cellular-image-classification",
                       "datasets/local", "datasets/local/rcic-package"]
    assert inputs("stage-01") == bundle_and_data
    for kernel, previous in (("stage-02", "stage-01"), ("stage-03", "stage-02"),
                             ("submit", "stage-03")):
        assert inputs(kernel) == bundle_and_data + [
            "notebooks/local", f"notebooks/local/rcic-local-{previous}"]

    # A valid submission, scored against the embedded answer key by rcic-predict.
    assert check_submission(result["submission"], tiny_data) == 16
    assert "accuracy --plates assign" in (runs / "submit" / "kernel.log").read_text()

    # The same 12 steps in one process give bit-identical weights.
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-c",
                    "import sys; from rcic.cli.stage import main; sys.exit(main(sys.argv[1:]))",
                    "--config", str(recipe), "--data", str(tiny_data), "--out", str(full),
                    "--budget", "3m", "--resume-from", "--quiet"],
                   check=True, capture_output=True, cwd=tmp_path)
    chained = torch.load(runs / "stage-03" / "working" / "weights.pt", weights_only=False)
    alone = torch.load(full / "weights.pt", weights_only=False)
    assert chained["model"].keys() == alone["model"].keys()
    for name, tensor in alone["model"].items():
        assert torch.equal(chained["model"][name], tensor), name


def test_a_kernel_past_its_limit_is_killed_without_warning(tmp_path):
    script = tmp_path / "hang.py"
    # It ignores SIGTERM and leaves a child behind: only a SIGKILL of the group stops both.
    script.write_text("import signal, subprocess, sys, time\n"
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "print('started', flush=True)\n"
                      "time.sleep(60)\n")
    lines = []
    start = time.monotonic()
    status, seconds, killed = run_script(script, tmp_path, tmp_path, 1.5, tmp_path / "log",
                                         lines.append)
    assert killed and status == -9
    assert 1.5 <= seconds < 10 and time.monotonic() - start < 10
    assert lines == ["started"] and (tmp_path / "log").read_text() == "started\n"


def test_local_chain_refuses_a_used_folder_and_bad_budgets(tmp_path, tiny_data):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_local_chain(1, "1m", tmp_path / "used", data=tiny_data)
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a duration"):
        run_local_chain(1, "soon", tmp_path / "new", data=tiny_data)
