"""rcic-chain local: a 3-stage chain of the rendered kernel scripts, each in its own process with
only its declared inputs, reading the images from cache kernels' output expanded onto local
disk, ends in a valid submission whose weights equal one uninterrupted run on the PNGs.

Slow-ish (five Python processes that import torch): about a minute of CPU.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rcic.data.layout import RxRx1
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


def test_three_stage_local_chain_matches_an_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    # Relative paths, as in the README's command (`rcic-chain local` hands --out and --config
    # over as given): the kernels run in their own working folders and must still find theirs.
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    lines = []
    result = run_local_chain(3, "3m", Path("chain"), recipe=Path("recipe.yaml"), data=tiny_data,
                             steps_per_stage=4, cache_size=16, echo=lines.append)
    assert [k["name"] for k in result["kernels"]] == ["cache-train", "cache-test", "stage-01",
                                                      "stage-02", "stage-03", "submit"]
    assert all(k["status"] == 0 for k in result["kernels"])
    runs = tmp_path / "chain" / "runs"
    kernels = tmp_path / "chain" / "kernels"

    # The cache kernels run on a CPU and leave one split each, zlib-compressed, as output.
    sites = RxRx1(tiny_data).sites["split"].value_counts()
    for split in ("train", "test"):
        meta = json.loads((kernels / f"cache-{split}" / "kernel-metadata.json").read_text())
        assert meta["enable_gpu"] is False and "machine_shape" not in meta
        manifest = json.loads((runs / f"cache-{split}" / "working" / f"cache-{split}-16px" /
                               "CACHE.json").read_text())
        assert (manifest["split"], manifest["format"], manifest["n_sites"]) == (
            split, "zlib", sites[split])

    # Each stage continued where the previous one stopped; the last finished the recipe.
    reports = [json.loads((runs / f"stage-0{k}" / "working" / "stage.json").read_text())
               for k in (1, 2, 3)]
    assert [r["global_step"] for r in reports] == [4, 8, 12]
    assert [r["done"] for r in reports] == [False, False, True]
    # Each expanded the train cache onto its scratch disk, inside its budget, and said so.
    for k, r in enumerate(reports, 1):
        assert r["cache"]["expanded"] and r["cache"]["sites"] == sites["train"]
        assert 0 < r["cache"]["seconds"] < r["seconds_used"]
        assert r["cache"]["to"].startswith(str(runs / f"stage-0{k}" / "scratch"))
        log = (runs / f"stage-0{k}" / "kernel.log").read_text()
        assert "cache expanded in" in log and "s of them expanding the cache" in log
    assert "cache expanded in" in (runs / "submit" / "kernel.log").read_text()

    # Each kernel saw only its declared inputs: the bundle, the data, the previous kernel.
    def inputs(kernel):
        root = runs / kernel / "input"
        return sorted(str(p.relative_to(root)) for p in [*root.glob("*/*"), *root.glob("*/*/*")]
                      if p.parent.name != "recursion-cellular-image-classification")
    bundle_and_data = ["competitions/recursion-cellular-image-classification",
                       "datasets/local", "datasets/local/rcic-package"]
    assert inputs("cache-train") == inputs("cache-test") == bundle_and_data
    train_cache = "notebooks/local/rcic-local-cache-train"
    assert inputs("stage-01") == bundle_and_data + ["notebooks/local", train_cache]
    test_cache = "notebooks/local/rcic-local-cache-test"
    for kernel, previous, cache in (("stage-02", "stage-01", train_cache),
                                    ("stage-03", "stage-02", train_cache),
                                    ("submit", "stage-03", test_cache)):
        assert inputs(kernel) == bundle_and_data + [
            "notebooks/local", *sorted([cache, f"notebooks/local/rcic-local-{previous}"])]

    # The closing table: per stage what it trained, then the submission's accuracy.
    table = result["table"]
    assert [l.split()[0] for l in table[1:7]] == [
        "cache-train", "cache-test", "stage-01", "stage-02", "stage-03", "submit"]
    assert [l.split()[1:3] for l in table[3:6]] == [["4", "4/12"], ["4", "8/12"],
                                                    ["4", "12/12"]]
    assert table[-1].startswith("submission accuracy: ")

    # A valid submission, scored against the embedded answer key by rcic-predict.
    assert check_submission(result["submission"], tiny_data) == 16
    assert "accuracy --plates assign" in (runs / "submit" / "kernel.log").read_text()

    # The same 12 steps in one process, decoding the PNGs, give bit-identical weights.
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
